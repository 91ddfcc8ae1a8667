"""Print and write the result of a task metric (:mod:`pipeline.eval.metrics`): a text table, JSON and a PNG.

[ours] Figures are drawn with Pillow (already a dependency) rather than matplotlib, which the pipeline does not
otherwise need: a confusion matrix coloured by the fraction of each target row, or a bar chart of per-class AP for
multi-label results, with the class names on the axes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

_COUNT_KEYS = ("support", "classes_scored", "n_values")
_BLUE = (31, 119, 180)


def _fmt(name: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if name in _COUNT_KEYS:
        return f"{int(v)}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_report(result: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    """The text report of a ``compute()`` result (with ``result["ci"]`` from ``bootstrap_ci`` when one was done).

    A per-class table (``-`` where a value is undefined), then the overall numbers, then, when a bootstrap was done,
    ``<headline> <value>  (95% CI <low>-<high>)``, and as the last line exactly ``<headline> <value:.4f>``.

    Args:
        result: what a task metric's ``compute()`` returned.
        class_names: names to print instead of ``result["class_names"]`` (same order and count).
    """
    rows = dict(result.get("per_class") or {})
    if class_names is not None:
        if len(class_names) != len(rows):
            raise ValueError(f"{len(class_names)} class names for {len(rows)} classes in the result")
        rows = dict(zip((str(c) for c in class_names), rows.values()))
    lines = []
    if rows:
        cols = list(next(iter(rows.values())))
        width = max(len("class"), *(len(c) for c in rows))
        lines.append(f"{'class':<{width}}  " + "  ".join(f"{c:>9}" for c in cols))
        lines += [f"{c:<{width}}  " + "  ".join(f"{_fmt(k, row[k]):>9}" for k in cols) for c, row in rows.items()]
    name, overall = result["headline"], result["overall"]
    lines.append(f"{result['task']} over {result['n_samples']} samples: "
                 + "  ".join(f"{k} {_fmt(k, v)}" for k, v in overall.items() if k != name))  # fmt: skip
    value = overall[name]
    ci = result.get("ci")
    if ci:
        lines.append(f"bootstrap: {ci['n_resamples']} resamples of the {ci['n_samples']} samples (seed {ci['seed']}), "
                     f"percentile interval")  # fmt: skip
        lines.append(f"{name} {value:.4f}  ({ci['level'] * 100:g}% CI {ci['low']:.4f}-{ci['high']:.4f})")
    lines.append(f"{name} {value:.4f}")
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    """NaN (undefined) becomes null: JSON has no NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_report(path: str | Path, result: Mapping[str, Any]) -> list[Path]:
    """Write ``<path>.json`` and a figure next to it; returns the paths written.

    The figure is ``<path>_confusion.png`` when the result has a confusion matrix (classification, segmentation,
    change), ``<path>_ap.png`` (per-class AP bars) for multi-label results, none for regression. A ``.json`` suffix
    on ``path`` is dropped first, so ``report.json`` and ``report`` write the same files.
    """
    base = Path(path)
    if base.suffix == ".json":
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    out = base.with_name(base.name + ".json")
    out.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    written = [out]
    names = list(result.get("class_names") or [])
    if result.get("confusion_matrix") is not None:
        png = base.with_name(base.name + "_confusion.png")
        confusion_image(result["confusion_matrix"], names).save(png)
        written.append(png)
    elif names and all("ap" in row for row in result["per_class"].values()):
        png = base.with_name(base.name + "_ap.png")
        ap_image([result["per_class"][c]["ap"] for c in names], names, result["overall"].get("map")).save(png)
        written.append(png)
    return written


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _put(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: Any, fill: Any, anchor: str = "lt") -> None:
    """Draw ``text`` with its box anchored at ``xy`` (``l``/``m``/``r`` then ``t``/``m``), for any Pillow font."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    fx, fy = {"l": 0.0, "m": 0.5, "r": 1.0}[anchor[0]], {"t": 0.0, "m": 0.5}[anchor[1]]
    x, y = xy[0] - left - fx * (right - left), xy[1] - top - fy * (bottom - top)
    draw.text((round(x), round(y)), text, fill=fill, font=font)


def _compact(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{int(n)}"


def _shade(f: float) -> tuple[int, int, int]:
    return tuple(round(255 - f * (255 - c)) for c in _BLUE)  # type: ignore[return-value]


def confusion_image(cm: Sequence[Sequence[float]], class_names: Sequence[str]) -> Image.Image:
    """A K x K confusion matrix (rows: target, columns: prediction) coloured by the fraction of each row.

    Counts are written in the cells when they fit (abbreviated: ``12.3k``); class names label both axes.
    """
    k = len(cm)
    names = list(class_names) or [str(i) for i in range(k)]
    cell = max(14, min(56, 720 // max(k, 1)))
    font, small = _font(13), _font(max(8, min(12, cell // 4)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_size(probe, n, font)[0] for n in names) + 10
    title = "confusion matrix: rows target, columns prediction, colour = fraction of the row"
    title_w, line_h = _text_size(probe, title, font)
    left, top = label_w + 24, label_w + 2 * line_h + 16
    width = max(left + k * cell + 10, title_w + 20)
    img = Image.new("RGB", (width, top + k * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    _put(draw, (10, 6), title, font, "black")
    _put(draw, (left, 10 + line_h), "prediction", font, "black")
    axis = Image.new("RGBA", _text_size(probe, "target", font), (255, 255, 255, 0))
    _put(ImageDraw.Draw(axis), (0, 0), "target", font, "black")
    img.paste(rot := axis.rotate(90, expand=True), (4, top), rot)
    for j, name in enumerate(names):
        tw, th = _text_size(probe, name, font)
        label = Image.new("RGBA", (tw + 2, th + 4), (255, 255, 255, 0))
        _put(ImageDraw.Draw(label), (0, 0), name, font, "black")
        rot = label.rotate(90, expand=True)
        img.paste(rot, (left + j * cell + (cell - rot.width) // 2, top - rot.height - 4), rot)
        _put(draw, (left - 6, top + j * cell + cell // 2), name, font, "black", "rm")
    for i, row in enumerate(cm):
        total = sum(row)
        for j, v in enumerate(row):
            f = v / total if total else 0.0
            x, y = left + j * cell, top + i * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=_shade(f), outline=(200, 200, 200))
            if cell >= 28 and v:
                _put(draw, (x + cell // 2, y + cell // 2), _compact(v), small, "white" if f > 0.5 else "black", "mm")
    return img


def ap_image(ap: Sequence[float | None], class_names: Sequence[str], mean: float | None = None) -> Image.Image:
    """Horizontal bars of average precision per class; ``n/a`` for classes that could not be scored."""
    font = _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_size(probe, n, font)[0] for n in class_names) + 12
    bar_w, row_h = 400, 20
    title = "average precision per class" + (f" (mAP {mean:.4f})" if mean is not None and mean == mean else "")
    top = 32
    img = Image.new("RGB", (label_w + bar_w + 70, top + row_h * len(class_names) + 10), "white")
    draw = ImageDraw.Draw(img)
    _put(draw, (10, 8), title, font, "black")
    for i, (name, v) in enumerate(zip(class_names, ap)):
        y = top + i * row_h
        _put(draw, (label_w - 6, y + row_h // 2), name, font, "black", "rm")
        if v is None or math.isnan(v):
            _put(draw, (label_w + 4, y + row_h // 2), "n/a", font, (120, 120, 120), "lm")
            continue
        draw.rectangle((label_w, y + 3, label_w + round(v * bar_w), y + row_h - 3), fill=_BLUE)
        _put(draw, (label_w + round(v * bar_w) + 6, y + row_h // 2), f"{v:.3f}", font, "black", "lm")
    draw.line((label_w, top, label_w, top + row_h * len(class_names)), fill="black")
    return img
