"""Object boxes over images: what the detection formats (``dota``, ``voc``, ``vector_boxes``) share.

A detection scene is a :class:`~.source.Scene` whose ``target`` is its :class:`Objects`: oriented boxes in the
scene's reference pixels (:mod:`pipeline.geometry.boxes`' convention), class indices and an ``ignore`` flag
(difficult objects). :class:`BoxSource` cuts every scene into overlapping chips of the sample footprint (large
images become many training samples), and builds each sample's label by pushing the boxes through the same view as
the pixels: crop, resampling to the output GSD, zoom, flips and 90-degree rotations act on the box corners as on
the image (:func:`view_boxes`). A box cut by the chip's border becomes the minimum-area rectangle of its visible
part; one with less than ``min_visible`` of its area inside is an *ignore* box (the model is neither asked to find
nor penalised for it).

Output GSD [ours]: every image is resampled to one GSD per dataset, the model's supported HR GSD nearest the
median of the images' GSDs (a batch must share one GSD); ``size`` px at that GSD is the sample footprint.

Splits: explicit (sample keys are image keys) or seeded by image; with ``split.block`` each image is cut into blocks
of ``block`` image pixels assigned to splits (:class:`~.splits.BlockSplit`): an object belongs to the split of the
block under its centre (objects within ``gap`` of another split's block to none), the chips of a split are centred
on its blocks (tiling blocks larger than a chip), and the objects of other splits seen in a chip are ignore boxes,
so neither found nor penalised. ``select`` restricts a dataset to some of its images before any split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch

from pipeline.finetune.sample import Sample
from pipeline.geometry.boxes import obb_to_polygons, polygons_to_obb, rects_to_obb
from pipeline.modalities import ModalitySpec
from pipeline.train.sources import modality_entry

from .geometry import View, crop, finish, layer_box, plan_view
from .labels import LabelValueError
from .readers import DataReadError, read_rgb, rgb_indices
from .source import LabelledSource, Scene, plan_outputs, split_index
from .splits import BlockSplit, membership, seeded_rule

log = logging.getLogger(__name__)

SKIP_REASONS = ("degenerate", "outside")
"""Objects left out of a dataset, counted and reported: zero area, or entirely outside their image."""


@dataclass
class Objects:
    """A scene's objects: ``(N, 5)`` boxes in reference pixels, ``(N,)`` class ids, ``(N,)`` ignore flags."""

    boxes: np.ndarray
    classes: np.ndarray
    ignore: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 5)
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        self.ignore = np.asarray(self.ignore, dtype=bool).reshape(-1)

    def __len__(self) -> int:
        return len(self.classes)

    def subset(self, keep: np.ndarray) -> Objects:
        """The objects where ``keep``."""
        return Objects(self.boxes[keep], self.classes[keep], self.ignore[keep])


@dataclass
class Skipped:
    """Objects left out while reading a dataset, per reason, with the first few places (file and line/object)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        """Count one object left out for ``reason`` at ``where``."""
        self.counts[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where} ({reason})")


def polygons_to_objects(polys: np.ndarray, classes: list[int], ignore: list[bool], shape: tuple[int, int],
                        where: list[str], skipped: Skipped) -> Objects:  # fmt: skip
    """Polygons ``(N, K, 2)`` in image pixels -> their minimum-area rectangles (see :func:`geometries_to_objects`)."""
    if not len(polys):
        return Objects(np.zeros((0, 5)), [], [])
    hulls = shapely.convex_hull(shapely.multipoints(np.asarray(polys, dtype=np.float64)))
    return geometries_to_objects(hulls, classes, ignore, shape, where, skipped)


def geometries_to_objects(geoms: np.ndarray, classes: list[int], ignore: list[bool], shape: tuple[int, int],
                          where: list[str], skipped: Skipped) -> Objects:  # fmt: skip
    """Shapely geometries in image pixels -> the minimum-area rectangles of their convex hulls, cut to the image.

    Degenerate geometries (no area) and geometries entirely outside the ``shape`` = (H, W) image are left out and
    counted in ``skipped``; one partly outside is cut to the image first.
    """
    if not len(geoms):
        return Objects(np.zeros((0, 5)), [], [])
    h, w = shape
    hulls = shapely.convex_hull(np.asarray(geoms, dtype=object))
    area = shapely.area(hulls)
    inside = shapely.intersection(hulls, shapely.box(0, 0, w, h))
    kept_area = shapely.area(inside)
    keep = np.zeros(len(hulls), dtype=bool)
    for i in range(len(hulls)):
        if not area[i] > 0:
            skipped.add("degenerate", where[i])
        elif not kept_area[i] > 0:
            skipped.add("outside", where[i])
        else:
            keep[i] = True
    boxes = np.zeros((len(hulls), 5))
    if keep.any():
        boxes[keep] = rects_to_obb(shapely.minimum_rotated_rectangle(inside[keep]))
    return Objects(boxes[keep], np.asarray(classes, dtype=np.int64)[keep], np.asarray(ignore, dtype=bool)[keep])


def class_index(names: list[str], name: str, where: str) -> int:
    """Index of class ``name``; an unknown name is an error naming the place and the known classes."""
    try:
        return names.index(name)
    except ValueError:
        raise LabelValueError(f"{where}: class {name!r} is not among the classes {names}; declare it in the data "
                              "spec's classes (or fix the label)") from None  # fmt: skip


def orient_points(pts: np.ndarray, view: View, size: float) -> np.ndarray:
    """``(..., 2)`` points (x, y) in a ``size`` px sample, moved as :func:`~.geometry.orient` moves its pixels."""
    x, y = pts[..., 0].copy(), pts[..., 1].copy()
    if view.flip_x:
        x = size - x
    if view.flip_y:
        y = size - y
    for _ in range(view.rot % 4):  # torch.rot90 over (y, x): the pixel at (y, x) goes to (size - x, y)
        x, y = y, size - x
    return np.stack([x, y], -1)


def view_boxes(objects: Objects, view: View, size: int, min_visible: float) -> dict[str, torch.Tensor]:
    """The detection label of a sample: ``objects`` (reference pixels) as seen through ``view`` at ``size`` px.

    Boxes wholly inside the sample are moved exactly; boxes cut by its border become the minimum-area rectangle of
    their visible part, ignored when less than ``min_visible`` of them is visible; boxes outside are dropped.
    """
    y0, x0, n = layer_box(view, 1.0)
    corners = (obb_to_polygons(objects.boxes) - np.array([x0, y0])) * (size / n)  # (N, 4, 2) sample pixels
    corners = orient_points(corners, view, size)
    full = objects.boxes[:, 2] * objects.boxes[:, 3] * (size / n) ** 2
    polys = shapely.polygons(corners) if len(corners) else np.zeros(0, dtype=object)
    visible = shapely.intersection(polys, shapely.box(0, 0, size, size))
    frac = shapely.area(visible) / np.maximum(full, 1e-12) if len(corners) else np.zeros(0)
    keep = frac > 1e-6
    whole = keep & (frac >= 1 - 1e-6)
    boxes = np.zeros((len(corners), 5))
    if whole.any():
        boxes[whole] = polygons_to_obb(corners[whole])
    cut = keep & ~whole
    if cut.any():
        boxes[cut] = rects_to_obb(shapely.minimum_rotated_rectangle(visible[cut]))
    ignore = objects.ignore | (frac < min_visible)
    return {"boxes": torch.from_numpy(boxes[keep]).float(), "classes": torch.from_numpy(objects.classes[keep]),
            "ignore": torch.from_numpy(ignore[keep])}  # fmt: skip


@lru_cache(maxsize=8)
def _decoded_rgb(path: str, version: tuple[int, int]) -> np.ndarray:
    """``(3, H, W)`` R, G, B of an image file (cached per path and modification)."""
    from pipeline.modalities import HR

    return read_rgb(Path(path), HR)


@dataclass
class CachedImageLayer:
    """An RGB image file, decoded once per process (chips of a large PNG would otherwise decode it every time)."""

    path: Path
    spec: ModalitySpec
    ratio: float = 1.0

    def image(self) -> np.ndarray:
        """``(C, H, W)`` float32 in the model's band order."""
        try:
            st = self.path.stat()
        except OSError as err:
            raise DataReadError(f"{self.path}: cannot read the image ({err})") from None
        return _decoded_rgb(str(self.path), (st.st_mtime_ns, st.st_size))[rgb_indices(self.path, self.spec)]

    def read(self, view: View, rng: np.random.Generator | None) -> tuple[np.ndarray, list[int]]:
        """The view's box as ``(1, C, n, n)`` (NaN outside the image)."""
        return crop(self.image()[None], *layer_box(view, self.ratio), fill=math.nan), [0]


def chip_origins(extent: float, side: float, overlap: float) -> list[float]:
    """Origins along one axis of chips of ``side`` px over ``[0, extent)``, overlapping by ``overlap`` px or more.

    Chips are evenly spaced from edge to edge. An extent at most a tenth of a step longer than one chip gets one
    centred chip (the few pixels it misses at both ends are not worth a second, almost identical chip); a shorter
    one gets one centred, padded chip.
    """
    step = max(side - overlap, 1.0)
    n = math.ceil((extent - side) / step - 0.1) + 1
    if n <= 1:
        return [(extent - side) / 2]
    return np.linspace(0.0, extent - side, n).tolist()


class BoxSource(LabelledSource):
    """Chips of detection scenes; label: a dict of boxes, classes and ignore flags (:mod:`pipeline.finetune.sample`).

    Subclasses read their format into ``self.scenes`` (with :class:`Objects` targets and ``georef``/``gsd``) and call
    :meth:`index`.
    """

    task = "detection"
    modalities = ("hr",)
    scenes: list[Scene]
    blocks: BlockSplit | None = None

    def __init__(self, spec: Any, split: str, train: bool) -> None:
        super().__init__(spec, split, train)
        self.skipped = Skipped()

    @property
    def periods(self) -> int:
        """One period: detection looks at one image."""
        return 1

    def plan(self, model_specs: Mapping[str, ModalitySpec], gsds: list[float]) -> float:
        """The dataset's output GSD (see the module docstring) and ``self.outputs``; returns that GSD."""
        if "hr" not in model_specs:
            raise ValueError(f"{self.spec.path}: detection images are the 'hr' modality; the model takes only "
                             f"{sorted(model_specs)}")  # fmt: skip
        hr = model_specs["hr"]
        gsd = hr.nearest_resolution(float(np.median(gsds))) if gsds else hr.gsd
        self.outputs = plan_outputs({"hr": hr}, {"hr": gsd}, self.spec.size, self.spec.path)
        self.stats.extra["source_gsd"] = {"hr": sorted({round(g, 6) for g in gsds})}
        return gsd

    def index(self, keys_in_split: np.ndarray, seed: int, patterns: list[str] | None, rule: Any = None) -> None:
        """Assign scenes (or blocks) to this split, keep its chips, and count its objects per class.

        ``rule`` overrides the spec's seeded split (a single scene is always split in blocks).
        """
        rule = rule if rule is not None else seeded_rule(self.spec, seed)
        keys = [s.key for s in self.scenes]
        in_split, self.blocks = membership(keys, self.split, rule, patterns, shapes=[s.shape for s in self.scenes])
        in_split &= keys_in_split
        split = split_index(self.split)
        counts = np.zeros(len(self.classes or ()), dtype=np.int64)
        self.windows: list[tuple[int, float, float]] = []
        self.objects: list[Objects] = []
        overlap = self.spec.overlap
        for i, scene in enumerate(self.scenes):
            objs: Objects = scene.target
            if self.blocks is not None and len(objs):  # objects of other splits (or in a gap) are ignored here
                mine = np.array([self.blocks.mask(i, split, *self._centre(scene, b), 1, 1)[0, 0] for b in objs.boxes])
                objs = Objects(objs.boxes, objs.classes, objs.ignore | ~mine)
            self.objects.append(objs)
            if not in_split[i]:
                continue
            counts += np.bincount(objs.classes[~objs.ignore], minlength=len(counts))[: len(counts)]
            ov = overlap * scene.side / self.spec.size
            for y0, x0, h, w in self._areas(i, scene, split):  # the whole image, or each of this split's blocks
                for top in chip_origins(h, scene.side, ov):
                    for left in chip_origins(w, scene.side, ov):
                        self.windows.append((i, y0 + top, x0 + left))
        self.stats.counts = counts
        self.stats.extra["scenes"] = len({w[0] for w in self.windows})
        self.stats.extra["objects"] = int(counts.sum())
        self.stats.extra["skipped_objects"] = dict(self.skipped.counts)
        if any(self.skipped.counts.values()):
            log.warning("%s: objects left out: %s, e.g. %s", self.spec.path, self.skipped.counts, self.skipped.examples)

    def _areas(self, i: int, scene: Scene, split: int) -> list[tuple[int, int, int, int]]:
        """``(top, left, height, width)`` of the parts of scene ``i`` chips cover: all of it, or the split's blocks."""
        H, W = scene.shape
        if self.blocks is None:
            return [(0, 0, H, W)]
        b = self.blocks.block
        rows, cols = np.nonzero(self.blocks.grids[i] == split)
        return [(r * b, c * b, min(b, H - r * b), min(b, W - c * b)) for r, c in zip(rows.tolist(), cols.tolist())]

    @staticmethod
    def _centre(scene: Scene, box: np.ndarray) -> tuple[int, int]:
        H, W = scene.shape
        return int(np.clip(box[1], 0, H - 1)), int(np.clip(box[0], 0, W - 1))

    def __len__(self) -> int:
        return len(self.windows)

    def locate(self, index: int) -> tuple[int, Scene, float | None, float | None]:
        """The chip's scene and box."""
        i, top, left = self.windows[index]
        return i, self.scenes[i], top, left

    def get(self, index: int, rng: np.random.Generator | None = None) -> Sample:
        """Chip ``index`` and its objects; augmented (zoom, jitter, flips, rotations) for training with ``rng``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a source of {len(self)}")
        i, scene, top, left = self.locate(index)
        rng = rng if self.train else None
        view = plan_view(scene.shape, top, left, scene.side, rng, self.spec.scale, scene.side / 2, scene.quantum)
        periods: list[dict[str, dict[str, torch.Tensor]]] = [{}]
        for (p, m), layer in scene.layers.items():
            x, doy = layer.read(view, rng)
            out = self.outputs[m]
            periods[p][m] = modality_entry(finish(x, view, out.size), out.spec, out.gsd, doy=doy)
        return {"periods": periods, "label": view_boxes(self.objects[i], view, self.size, self.spec.min_visible)}

    def describe(self) -> dict[str, Any]:  # noqa: D102
        return super().describe() | {"chip_overlap": self.spec.overlap, "min_visible": self.spec.min_visible}


def selected(keys: list[str], patterns: list[str] | None) -> list[str]:
    """The keys matching any of the data spec's ``select`` patterns (all without; a pattern matching none: error)."""
    if patterns is None:
        return keys
    from .splits import select

    hit = select(keys, patterns, "select")
    return [k for k, h in zip(keys, hit) if h]


def check_classes(names: list[str] | None, where: str) -> None:
    """Detection classes are names (a list), at least one."""
    if names is not None and not names:
        raise DataReadError(f"{where}: no object classes found; declare classes in the data spec")
