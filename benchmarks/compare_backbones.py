"""Two backbones side by side on the fine-tuning recipes: one markdown table from two ``finetune_recipes`` outputs.

    python benchmarks/compare_backbones.py --old outputs/finetune-bench --new outputs/finetune-bench-v1pool3k \
        --out benchmarks/finetune_backbones.md

Each output folder holds the results of ``benchmarks/finetune_recipes.py --out DIR`` run with one committed
checkpoint; the random-init rows (which do not depend on the checkpoint) are read from ``--old``. Per recipe and
test set: the headline metric in % with its 95 % bootstrap interval for the full recipe (``pretrained``), its
frozen-backbone variant, random init, and the frozen-feature probes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_recipe_table import RECIPES
from finetune_recipes import collect


def _cell(found: dict, recipe: str, variant: str, yaml: str) -> str:
    for r in found["runs"]:
        if r["recipe"] == recipe and r["variant"] == variant:
            for t in r["tests"]:
                if t["yaml"] == yaml:
                    return f"{100 * t['value']:.1f} ({100 * t['low']:.1f}-{100 * t['high']:.1f})"
    return "-"


def _probe(found: dict, recipe: str, yaml: str, backbone: str) -> dict[str, str]:
    """``{probe kind and modalities: value (CI)}``; the kind drops the probe's settings (C differs per backbone)."""
    out = {}
    for p in found["probes"]:
        if p["recipe"] == recipe and p["yaml"] == yaml and p["backbone"] == backbone:
            key = f"{p['probe'].split(' (')[0]} ({'+'.join(m.upper() for m in p['modalities'])})"
            out[key] = f"{100 * p['value']:.1f} ({100 * p['low']:.1f}-{100 * p['high']:.1f})"
    return out


def compare(old: dict, new: dict) -> str:
    """The markdown table (rows: recipe x test set; columns: each variant for the old and the new backbone)."""
    lines = ["| recipe: test set | metric | full, old | full, new | frozen, old | frozen, new | random init |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    probe_lines = ["| recipe: test set | probe | old | new | random init |", "|---|---|---|---|---|"]
    for name, recipe in RECIPES.items():
        for test in recipe.tests:
            metric = next((t["metric"] for r in new["runs"] + old["runs"] if r["recipe"] == name
                           for t in r["tests"] if t["yaml"] == test.yaml), None)  # fmt: skip
            if metric is None:
                continue
            runs = (("pretrained", old), ("pretrained", new), ("frozen", old), ("frozen", new), ("random", old))
            cells = [_cell(f, name, v, test.yaml) for v, f in runs]
            lines.append(f"| {name}: {test.label} | {metric} | " + " | ".join(cells) + " |")
            newp = _probe(new, name, test.yaml, "pretrained")
            randp = _probe(old, name, test.yaml, "random")
            for label, value in _probe(old, name, test.yaml, "pretrained").items():
                probe_lines.append(f"| {name}: {test.label} | {label} | {value} | {newp.get(label, '-')} | "
                                   f"{randp.get(label, '-')} |")  # fmt: skip
    return "\n".join(lines) + "\n\nFrozen-feature probes:\n\n" + "\n".join(probe_lines) + "\n"


def main() -> int:
    """Print (and optionally write) the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", default="outputs/finetune-bench", help="results with the previous checkpoint")
    p.add_argument("--new", default="outputs/finetune-bench-v1pool3k", help="results with the new checkpoint")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args()
    text = compare(collect(Path(args.old)), collect(Path(args.new)))
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
