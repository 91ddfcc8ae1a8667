"""The labelled source every adapter returns, and the pieces they share: layers, scenes and the sample builder.

A *scene* is what one file set covers (an image, a chip, a change pair, a cube) on a *reference grid* (its label's
grid or finest modality's). It has one *layer* per (period, modality) that reads physical values for a view, and
either pixel labels (a label layer on the reference grid) or one target (a class, a multi-hot vector). A source maps
a sample index to a scene and a box on it, plans the view (augmented when training and given an ``rng``), and
builds the sample of :mod:`pipeline.finetune.sample`: every layer cut through the same view, normalised with the
model's :class:`~pipeline.modalities.ModalitySpec`, labels resized with nearest neighbour to the finest modality's
output grid.

Output grid [ours]: a modality's source GSD is snapped to the nearest GSD its model spec accepts
(:meth:`~pipeline.modalities.ModalitySpec.nearest_resolution`; LEVIR's 0.5 m -> 0.625 m); ``size`` is the side in
pixels of the finest modality at its output GSD, so a sample covers ``size * gsd`` metres, which must be a whole
number of 10 m grid cells (the model fuses modalities on that grid).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

import numpy as np
import torch
from affine import Affine

from pipeline.finetune.sample import IGNORE, Sample
from pipeline.modalities import GRID_GSD, ModalitySpec
from pipeline.train.sources import modality_entry

from .geometry import View, crop, finish, layer_box, plan_view, window_origins
from .labels import class_counts
from .readers import read_window, to_units
from .splits import SPLIT_INDEX, BlockSplit

TASK_PERIODS = {"classification": 1, "multilabel": 1, "segmentation": 1, "regression": 1, "change": 2}


class Layer(Protocol):
    """One (period, modality) of a scene: ``ratio`` layer pixels per reference pixel, and a reader."""

    ratio: float

    def read(self, view: View, rng: np.random.Generator | None) -> tuple[np.ndarray, list[int]]:
        """(T, C, n, n) float32 physical values (NaN = invalid) of the view's box on this layer, and T days of year."""
        ...


class LabelLayer(Protocol):
    """Pixel labels on the reference grid, already mapped (class index / IGNORE, or float / NaN)."""

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """(h, w) mapped labels of the box; outside the scene: IGNORE (NaN for regression)."""
        ...


@dataclass
class ArrayLayer:
    """An in-memory (T, C, H, W) layer in physical units (a decoded image)."""

    x: np.ndarray
    doy: list[int]
    ratio: float = 1.0

    def read(self, view: View, rng: np.random.Generator | None) -> tuple[np.ndarray, list[int]]:
        """The view's box (NaN outside the image)."""
        return crop(self.x, *layer_box(view, self.ratio), fill=math.nan).astype(np.float32, copy=False), self.doy


@dataclass
class RasterLayer:
    """Bands of a raster file read window by window, converted to the modality's units."""

    path: str
    bands: list[int]
    ratio: float
    doy: int = 0
    nodata: float | None = None
    scale: float = 1.0
    offset: float = 0.0

    def read(self, view: View, rng: np.random.Generator | None) -> tuple[np.ndarray, list[int]]:
        """The view's box as (1, C, n, n) (NaN outside the raster and at nodata)."""
        y0, x0, n = layer_box(view, self.ratio)
        raw = read_window(self.path, self.bands, y0, x0, n, n)
        return to_units(raw, self.nodata, self.scale, self.offset)[None], [self.doy]


@dataclass
class ArrayLabel:
    """Mapped pixel labels held in memory (a reprojected or rasterised label, a decoded mask)."""

    labels: np.ndarray
    fill: float = IGNORE

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """The box (``fill`` outside)."""
        H, W = self.labels.shape
        out = np.full((h, w), self.fill, dtype=self.labels.dtype)
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y0 + h, H), max(x0, 0), min(x0 + w, W)
        if cy0 < cy1 and cx0 < cx1:
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = self.labels[cy0:cy1, cx0:cx1]
        return out


@dataclass
class Scene:
    """One image / chip / pair / cube: its reference grid, layers, and pixel labels or one target."""

    key: str
    shape: tuple[int, int]
    layers: dict[tuple[int, str], Layer]
    side: float
    label: LabelLayer | None = None
    target: Any = None
    georef: tuple[str, Affine] | None = None
    quantum: float = 1.0


@dataclass(frozen=True)
class Output:
    """A modality's output: the model's spec, the GSD of the sample's pixels, and the side in pixels."""

    spec: ModalitySpec
    gsd: float
    size: int


def plan_outputs(model_specs: Mapping[str, ModalitySpec], source_gsd: Mapping[str, float], size: int,
                 where: str) -> dict[str, Output]:  # fmt: skip
    """Each modality's output GSD (snapped to what the model accepts) and side, for ``size`` px of the finest.

    Raises:
        ValueError: the sample does not cover whole 10 m grid cells, or a coarser modality whole pixels.
    """
    gsd = {m: model_specs[m].nearest_resolution(g) for m, g in source_gsd.items()}
    fine = min(gsd.values())
    cells = size * fine / GRID_GSD
    if abs(cells - round(cells)) > 1e-6 or round(cells) < 1:
        step = Fraction(GRID_GSD / fine).limit_denominator(10_000).numerator
        raise ValueError(
            f"{where}: size {size} px at {fine:g} m covers {size * fine:g} m, not a whole number of "
            f"{GRID_GSD:g} m grid cells; use a multiple of {step:g} px"
        )
    out = {}
    for m, g in gsd.items():
        n = size * fine / g
        if abs(n - round(n)) > 1e-6:
            raise ValueError(f"{where}: size {size} px at {fine:g} m is {n:g} px of {m!r} at {g:g} m; not whole")
        out[m] = Output(model_specs[m], g, round(n))
    return out


def missing_modalities(wanted: list[str], model_specs: Mapping[str, ModalitySpec], where: str) -> None:
    """Raise when the data gives modalities the model does not have."""
    missing = [m for m in wanted if m not in model_specs]
    if missing:
        raise ValueError(f"{where}: the data has modalities {missing} the model does not take {sorted(model_specs)}")


@dataclass
class Stats:
    """Label statistics of a source: class counts (pixels or samples), or value moments for regression."""

    counts: np.ndarray | None = None
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    extra: dict[str, Any] = field(default_factory=dict)

    def add_values(self, v: np.ndarray) -> None:
        """Accumulate finite regression values."""
        v = v[np.isfinite(v)].astype(np.float64)
        if v.size:
            self.count += int(v.size)
            self.total += float(v.sum())
            self.total_sq += float((v * v).sum())
            self.low, self.high = min(self.low, float(v.min())), max(self.high, float(v.max()))


class LabelledSource:
    """Labelled samples of one dataset split, as dicts of :mod:`pipeline.finetune.sample`.

    Attributes:
        task: ``classification``, ``multilabel``, ``segmentation``, ``change`` or ``regression``.
        classes: class names (index = class), None for regression.
        colors: ``#rrggbb`` per class, or None (the shared palette).
        modalities: model modalities of every sample.
        periods: 1, or 2 for change.
        label_nodata: raw label values read as IGNORE.
        outputs: per modality the output GSD and side.

    """

    task: str
    classes: list[str] | None
    colors: list[str] | None
    modalities: tuple[str, ...]
    label_nodata: tuple[float, ...]
    outputs: dict[str, Output]

    def __init__(self, spec: Any, split: str, train: bool) -> None:
        self.spec, self.split, self.train = spec, split, train
        self.size = spec.size
        self.colors = list(spec.colors) if spec.colors is not None else None
        self.label_nodata = tuple(float(v) for v in spec.label_nodata)
        self.stats = Stats()
        self.outputs = {}

    @property
    def periods(self) -> int:
        """Number of time periods of a sample (2 for change)."""
        return TASK_PERIODS[self.task]

    def __len__(self) -> int:
        raise NotImplementedError

    def locate(self, index: int) -> tuple[int, Scene, float | None, float | None]:
        """(scene index, scene, box top, box left) of sample ``index``; a None box = the centred footprint."""
        raise NotImplementedError

    def mask(self, scene: int, y0: int, x0: int, h: int, w: int) -> np.ndarray | None:
        """(h, w) pixels of the box labelled in this split (a blocked split), None = all."""
        return None

    def get(self, index: int, rng: np.random.Generator | None = None) -> Sample:
        """Sample ``index``; augmented when the source is for training and ``rng`` is given, else deterministic."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a source of {len(self)}")
        i, scene, top, left = self.locate(index)
        rng = rng if self.train else None
        jitter: float | None = scene.side / 2  # a window moves around its place; an image's footprint anywhere
        if top is None or left is None:
            top, left, jitter = (scene.shape[0] - scene.side) / 2, (scene.shape[1] - scene.side) / 2, None
        view = plan_view(scene.shape, top, left, scene.side, rng, self.spec.scale, jitter, scene.quantum)
        periods: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in range(self.periods)]
        for (p, m), layer in scene.layers.items():
            x, doy = layer.read(view, rng)
            out = self.outputs[m]
            periods[p][m] = modality_entry(finish(x, view, out.size), out.spec, out.gsd, doy=doy)
        if scene.label is None:
            return {"periods": periods, "label": torch.as_tensor(scene.target)}
        y0, x0, n = layer_box(view, 1.0)
        lab = scene.label.read(y0, x0, n, n)
        keep = self.mask(i, y0, x0, n, n)
        if keep is not None:
            lab = np.where(keep, lab, np.nan if self.task == "regression" else IGNORE)
        label = finish(lab, view, self.size, nearest=True)
        return {"periods": periods, "label": label.float() if self.task == "regression" else label.long()}

    def window_georef(self, index: int) -> tuple[str, Affine] | None:
        """CRS (WKT) and pixel transform of sample ``index``'s label grid (unaugmented), None without georeference."""
        _, scene, top, left = self.locate(index)
        if scene.georef is None:
            return None
        crs, transform = scene.georef
        if top is None or left is None:
            top, left = (scene.shape[0] - scene.side) / 2, (scene.shape[1] - scene.side) / 2
        return crs, transform @ Affine.translation(left, top) @ Affine.scale(scene.side / self.size)

    def describe(self) -> dict[str, Any]:
        """Provenance: format, path, split, task, number of samples, classes and their counts, output grids."""
        counts = self.stats.counts
        d: dict[str, Any] = {
            "format": self.spec.format, "path": self.spec.path, "split": self.split, "task": self.task,
            "samples": len(self), "classes": self.classes, "modalities": list(self.modalities),
            "periods": self.periods, "size": self.size, "gsd": {m: o.gsd for m, o in self.outputs.items()},
            "scale": list(self.spec.scale), "weight": self.spec.weight, "label_nodata": list(self.label_nodata),
        }  # fmt: skip
        if counts is not None and self.classes is not None:
            d["class_counts"] = {c: int(n) for c, n in zip(self.classes, counts)}
        return d | self.stats.extra


def split_index(split: str) -> int:
    """0, 1 or 2 for ``train``, ``val``, ``test``."""
    if split not in SPLIT_INDEX:
        raise ValueError(f"split must be one of {list(SPLIT_INDEX)}, got {split!r}")
    return SPLIT_INDEX[split]


class WindowedSource(LabelledSource):
    """Pixel-labelled scenes cut into windows of the sample footprint: the samples are (scene, window) pairs.

    Subclasses set ``scenes`` and call :meth:`index`, which keeps the windows of this split that hold labelled
    pixels and counts the labels. Deterministic samples are the windows themselves (tiling each scene; the last
    window of a row ends at the scene edge); training samples jitter a window by up to half its side and zoom it.
    """

    scenes: list[Scene]
    blocks: BlockSplit | None = None

    def index(self, in_split: list[bool], min_labelled: float = 0.0) -> None:
        """Windows of the scenes in this split (all scenes with blocks) with labelled pixels; label statistics."""
        regression = self.task == "regression"
        counts = np.zeros(len(self.classes or ()), dtype=np.int64)
        self.windows: list[tuple[int, float, float]] = []
        for i, scene in enumerate(self.scenes):
            if not in_split[i] or scene.label is None:
                continue
            H, W = scene.shape
            lab = scene.label.read(0, 0, H, W)
            labelled = np.isfinite(lab) if regression else lab != IGNORE
            keep = self.mask(i, 0, 0, H, W)
            if keep is not None:
                labelled &= keep
            if regression:
                self.stats.add_values(lab[labelled])
            else:
                counts += class_counts(np.where(labelled, lab, IGNORE), len(counts))
            for top in window_origins(H, scene.side):
                for left in window_origins(W, scene.side):
                    y0, x0, n = layer_box(View(top, left, scene.side), 1.0)
                    win = labelled[max(y0, 0) : y0 + n, max(x0, 0) : x0 + n]
                    if win.any() and win.sum() >= min_labelled * n * n:
                        self.windows.append((i, top, left))
        self.stats.counts = None if regression else counts
        self.stats.extra["scenes"] = len({w[0] for w in self.windows})

    def __len__(self) -> int:
        return len(self.windows)

    def locate(self, index: int) -> tuple[int, Scene, float | None, float | None]:
        """The window's scene and box."""
        i, top, left = self.windows[index]
        return i, self.scenes[i], top, left

    def mask(self, scene: int, y0: int, x0: int, h: int, w: int) -> np.ndarray | None:
        """Blocked split: pixels labelled in this split."""
        if self.blocks is None:
            return None
        return self.blocks.mask(scene, split_index(self.split), y0, x0, h, w)
