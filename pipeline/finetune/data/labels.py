"""Raw label values -> class indices (or regression values), with IGNORE for unlabelled pixels.

A label raster stores *raw values* (LEVIR: 0 / 255; land cover: 1, 2, 3, 4, 8); a model predicts *class indices*
0..K-1. :class:`LabelMap` is the one place that maps between them: declared classes (a list: raw values 0..K-1;
a mapping: raw value -> name, index = position), ``label_nodata`` values and NaN become IGNORE, and any other value
is an error that names the file and the values, so a mislabelled file never trains silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from pipeline.errors import UserError
from pipeline.finetune.sample import IGNORE


class LabelValueError(UserError):
    """Label values that are neither a declared class nor label nodata; the message names the file and values."""


def _name(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


@dataclass(frozen=True)
class LabelMap:
    """Raw label value of each class (index = position), the class names, and the raw values meaning unlabelled."""

    values: tuple[float, ...]
    names: tuple[str, ...]
    nodata: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.values) != len(self.names):
            raise ValueError(f"{len(self.values)} class values for {len(self.names)} names")

    @classmethod
    def build(cls, classes: list[str] | Mapping[int, str] | None, nodata: Iterable[float],
              found: Iterable[float] = (), named: Mapping[float, str] | None = None) -> LabelMap:  # fmt: skip
        """The map of a spec's ``classes``, or, without them, of the data.

        Args:
            classes: a list (raw values 0..K-1) or a mapping raw value -> name; None = from the data.
            nodata: raw values meaning unlabelled.
            found: raw values present in the data (used when ``classes`` is None).
            named: names the data itself gives its values (a raster tag, a vector name column).

        """
        nodata = tuple(float(v) for v in nodata)
        if isinstance(classes, Mapping):
            return cls(tuple(float(k) for k in classes), tuple(classes.values()), nodata)
        if classes is not None:
            return cls(tuple(float(i) for i in range(len(classes))), tuple(classes), nodata)
        values = sorted(({float(v) for v in found if np.isfinite(v)} | {float(v) for v in named or {}}) - set(nodata))
        if not values:
            raise LabelValueError("no labelled values in the data (every value is label_nodata); declare classes")
        return cls(tuple(values), tuple((named or {}).get(v) or _name(v) for v in values), nodata)

    def apply(self, raw: np.ndarray, where: str) -> np.ndarray:
        """Raw values -> int64 class indices; nodata / NaN -> IGNORE.

        Raises:
            LabelValueError: values outside the classes and nodata, naming ``where`` and the values.
        """
        raw = np.asarray(raw)
        values = np.asarray(self.values, dtype=np.float64)
        order = np.argsort(values)
        flat = raw.astype(np.float64, copy=False)
        pos = np.clip(np.searchsorted(values[order], flat), 0, len(values) - 1)
        known = values[order][pos] == flat
        unlabelled = ~np.isfinite(flat) | np.isin(flat, np.asarray(self.nodata, dtype=np.float64))
        bad = ~known & ~unlabelled
        if bad.any():
            shown = [_name(v) for v in np.unique(flat[bad])[:20]]
            raise LabelValueError(
                f"{where}: label values {shown} are not among the classes "
                f"{ {_name(v): n for v, n in zip(self.values, self.names)} } nor label_nodata "
                f"{[_name(v) for v in self.nodata]}; declare them in classes or label_nodata"
            )
        return np.where(known & ~unlabelled, order[pos], IGNORE).astype(np.int64)

    def index_of(self, raw: object, where: str) -> int:
        """Class index of one raw value (vector labels); IGNORE for nodata."""
        return int(self.apply(np.asarray([raw], dtype=np.float64), where)[0])


def parse_classes_tag(tag: str | None) -> dict[float, str]:
    """``"0=no data,1=cultivated land,2=forest"`` (a raster's ``classes`` tag) -> ``{0.0: "no data", ...}``."""
    out: dict[float, str] = {}
    for part in (tag or "").split(","):
        value, sep, name = part.partition("=")
        try:
            if sep:
                out[float(value.strip())] = name.strip()
        except ValueError:
            return {}
    return out


def regression_values(raw: np.ndarray, nodata: Iterable[float]) -> np.ndarray:
    """Continuous labels as float32 with NaN where unlabelled (``nodata`` values or non-finite)."""
    x = np.asarray(raw, dtype=np.float64)
    x = np.where(np.isin(x, np.asarray(list(nodata), dtype=np.float64)), np.nan, x)
    return x.astype(np.float32)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels per class (int64, length ``num_classes``) of a class-index array; IGNORE is not counted."""
    flat = labels[labels != IGNORE].ravel()
    return np.bincount(flat, minlength=num_classes)[:num_classes].astype(np.int64)
