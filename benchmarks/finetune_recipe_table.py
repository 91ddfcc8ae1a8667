"""The recipes, test sets and variants of benchmarks/finetune_recipes.py (issue 10), as data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODES = ("frozen", "partial", "full", "lora")


@dataclass(frozen=True)
class Variant:
    """A change to a recipe: the backbone, the adaptation mode, the modalities, the scale augmentation."""

    name: str
    what: str
    random: bool = False
    adapt: dict[str, Any] = field(default_factory=dict)
    modalities: tuple[str, ...] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    head: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TestSet:
    """A test data-spec YAML (split ``test``); ``positive`` names the class whose IoU is reported with its CI."""

    label: str
    yaml: str
    positive: str | None = None


@dataclass(frozen=True)
class Recipe:
    """A shipped recipe, what it is scored on, its variants and which frozen probe applies."""

    name: str
    tests: tuple[TestSet, ...]
    extra: tuple[Variant, ...] = ()
    probe: str | None = None  # "classification" | "multilabel"

    @property
    def path(self) -> Path:
        return ROOT / "jobs" / f"finetune-{self.name}.yaml"


BASE = (Variant("pretrained", "pre-trained checkpoint"), Variant("random", "random init", random=True))
DENSE_FROZEN = (
    Variant("frozen", "pre-trained, frozen backbone (decoder only)", adapt={"mode": "frozen"}),
    Variant("frozen-random", "random init, frozen backbone (decoder only)", random=True, adapt={"mode": "frozen"}),
)
RECIPES = {
    r.name: r
    for r in (
        Recipe(
            "rsscn7",
            (
                TestSet("test", "rsscn7-test.yaml"),
                TestSet("test, zoom x2", "rsscn7-zoom2.yaml"),
                TestSet("test, zoom x0.5", "rsscn7-zoom05.yaml"),
            ),
            extra=(
                Variant("noscale", "pre-trained, no scale augmentation", data={"scale": [1.0, 1.0]}),
                Variant(
                    "gsd-0.625",
                    "pre-trained, centre 320 px on 256 px at 0.625 m (val only: the test sets are seen at 0.3125 m)",
                    data={"gsd": 0.5},
                ),
                Variant("mean-pool", "pre-trained, mean-pooling head", head={"pooling": "mean"}),
            ),
            probe="classification",
        ),
        Recipe(
            "bigearthnet",
            (TestSet("test", "bigearthnet-test.yaml"),),
            extra=(
                Variant("s2", "pre-trained, S2 only", modalities=("s2",)),
                Variant("s2-random", "random init, S2 only", random=True, modalities=("s2",)),
            ),
            probe="multilabel",
        ),
        Recipe(
            "sen1floods11",
            (
                TestSet("Sen1Floods11 S1+S2 test blocks", "sen1floods11-test.yaml", "water"),
                TestSet("SMAGNet S1 test blocks", "smagnet-test.yaml", "water"),
            ),
            extra=DENSE_FROZEN,
        ),
        Recipe(
            "slovenia",
            (
                TestSet("test blocks, dates of training", "slovenia-test.yaml"),
                TestSet("test blocks, another date (11 July)", "slovenia-july.yaml"),
            ),
            extra=DENSE_FROZEN,
        ),
        Recipe(
            "levir",
            (
                TestSet("LEVIR-CD test blocks", "levir-test.yaml", "change"),
                TestSet("DSIFN-CD test blocks", "dsifn-test.yaml", "change"),
            ),
            extra=DENSE_FROZEN,
        ),
    )
}


def variants(recipe: Recipe) -> dict[str, Variant]:
    """The variants of a recipe: pretrained, random, the other adaptation modes (RSSCN7), the recipe's extras."""
    from pipeline.finetune.spec import load_finetune

    out = {v.name: v for v in BASE}
    if recipe.probe == "classification":
        mode = load_finetune(recipe.path).adapt.mode
        out |= {m: Variant(m, f"pre-trained, adapt {m}", adapt={"mode": m}) for m in MODES if m != mode}
    return out | {v.name: v for v in recipe.extra}
