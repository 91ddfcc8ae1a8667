"""The fields and rules every fine-tuning data format shares (see :mod:`.spec` for the formats and an example)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pipeline.errors import UserError

SplitName = Literal["train", "val", "test"]
SPLITS: tuple[str, str, str] = ("train", "val", "test")
_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")


class DataSpecError(UserError):
    """An invalid data spec; the message names the source, each offending field and the bad value."""


def _absolute(value: str, info: ValidationInfo) -> str:
    """``value`` as an absolute path, relative to the caller's ``base_dir`` (URLs are kept as they are)."""
    value = os.path.expandvars(os.path.expanduser(value))
    if "://" in value:
        return value
    base = Path((info.context or {}).get("base_dir") or Path.cwd())
    path = Path(value)
    return str((path if path.is_absolute() else base / path).resolve())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitSpec(_Strict):
    """A seeded split.

    Attributes:
        seed: seed of the assignment; ``None`` = the task's seed (the ``seed`` given to ``open_dataset``).
        fractions: shares of train, val and test (summing to 1); a split with share 0 is empty.
        block: cut each scene into ``block`` x ``block`` px blocks (pixels of the finest modality) and assign blocks,
            not samples, to splits: a spatially blocked split for single scenes.
        gap: pixels within ``gap`` px (Chebyshev distance) of a block of another split are unlabelled, so labelled
            pixels of two splits never touch.

    """

    seed: int | None = None
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    block: int | None = Field(None, gt=0)
    gap: int = Field(0, ge=0)

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or not math.isclose(sum(v), 1.0, abs_tol=1e-6):
            raise ValueError(f"fractions [train, val, test] must be >= 0 and sum to 1, got {list(v)} (sum {sum(v):g})")
        if v[0] <= 0:
            raise ValueError(f"the train fraction must be positive, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _gap_needs_block(self) -> SplitSpec:
        if self.gap and self.block is None:
            raise ValueError("gap is the margin between blocks of a spatially blocked split: set block too")
        if self.block is not None and 2 * self.gap >= self.block:
            raise ValueError(f"gap {self.gap} must be less than half the block {self.block}, or no pixel is labelled")
        return self


SplitRef = str | list[str]
"""An explicit split: a sub-folder of ``path``, a ``.txt`` file of sample keys, or glob pattern(s) of sample keys."""


class _DataBase(_Strict):
    """Fields every format has.

    Attributes:
        path: root folder (or the cube); absolute after validation.
        classes: class names (index = position), or for label rasters a mapping ``raw label value -> name``
            (index = position in the mapping); default from the data.
        colors: ``#rrggbb`` per class (class maps and quicklooks); default the shared palette.
        label_nodata: raw label values meaning "unlabelled"; mapped to IGNORE (-1).
        size: sample side in pixels of the finest modality (at the model's GSD).
        gsd: declared ground sampling distance in metres of the finest source pixels, for data without a
            georeference (default: the georeference, else the modality's nominal GSD).
        scale: train-time zoom range: a random-resized crop with a zoom factor drawn log-uniformly from it
            (2 = twice as close); the sample keeps the declared GSD, as a user's image of unknown zoom would.
        weight: sampling weight of this dataset when a task has several.
        train, val, test: explicit splits (see :data:`SplitRef`).
        split: a seeded (optionally spatially blocked) split instead of explicit ones.

    """

    path: str = Field(min_length=1)
    classes: list[str] | dict[int, str] | None = None
    colors: list[str] | None = None
    label_nodata: list[float] = Field(default_factory=list)
    size: int = Field(64, gt=0, le=8192)
    gsd: float | None = Field(None, gt=0)
    scale: tuple[float, float] = (1.0, 1.0)
    weight: float = Field(1.0, ge=0)
    train: SplitRef | None = None
    val: SplitRef | None = None
    test: SplitRef | None = None
    split: SplitSpec | None = None

    pixel_labels: ClassVar[bool] = False
    """Whether the format's labels are rasters (a spatially blocked split needs pixels)."""
    one_scene: ClassVar[str | None] = None
    """For formats that are one scene: how to split it instead (explicit splits are refused)."""

    @field_validator("path")
    @classmethod
    def _abs(cls, v: str, info: ValidationInfo) -> str:
        return _absolute(v, info)

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str] | dict[int, str] | None) -> list[str] | dict[int, str] | None:
        names = list(v.values()) if isinstance(v, dict) else v
        if names is not None:
            if not names:
                raise ValueError("classes must not be empty")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"class names must be unique, repeated: {dup}")
        return v

    @field_validator("colors")
    @classmethod
    def _colors(cls, v: list[str] | None) -> list[str] | None:
        bad = [c for c in v or [] if not _COLOR.match(c)]
        if bad:
            raise ValueError(f"colors are '#rrggbb' strings, got {bad}")
        return v

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"scale is a zoom range [min, max] with 0 < min <= max, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> _DataBase:
        explicit = [s for s in SPLITS if getattr(self, s) is not None]
        if explicit and self.one_scene:
            raise ValueError(f"{self.format} is one scene: use {self.one_scene}, not explicit {explicit}")
        if explicit and self.split is not None:
            raise ValueError(f"give explicit splits ({', '.join(explicit)}) or a seeded split, not both")
        if self.split is not None and self.split.block is not None and not self.pixel_labels:
            raise ValueError(f"split.block (a spatially blocked split) needs pixel labels; {self.format!r} has none")
        if self.colors is not None and self.classes is not None and len(self.colors) != len(self.classes):
            raise ValueError(f"{len(self.colors)} colors for {len(self.classes)} classes")
        both = sorted(set(self.label_nodata) & set(self.classes)) if isinstance(self.classes, dict) else []
        if both:
            raise ValueError(f"label values {both} are both classes and label_nodata")
        return self

    format: str


def absolute_labels(cls: Any, v: str, info: ValidationInfo) -> str:
    """Field validator of a ``labels`` file path: absolute, relative to the caller's ``base_dir``."""
    return _absolute(v, info)
