"""A Zarr cube (``skypipe cube build``) plus labels in any CRS: segmentation windows over one scene.

The labels are placed on the grid of the cube's finest modality (:mod:`.cubelabels`); coarser modality groups must
nest in it (an integer pixel ratio, aligned origins: what the cube builder writes). A sample is a window of ``size``
finest pixels with every modality over the same ground and the dates of ``time`` (or the ``num_dates`` most valid;
random valid ones when training). Pixels the cube marks invalid (``valid`` = 0: nodata, cloud) are NaN, hence
invalid in the sample.

Splits: a cube is one scene, so the seeded split is always spatial: blocks of ``split.block`` px, or, without a
block, blocks of one window (so windows of different splits never share labelled pixels).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import zarr

from pipeline.cube.layout import cube_modalities, modality_arrays, open_modality
from pipeline.modalities import ModalitySpec
from pipeline.train.cubes import read_window

from .cubelabels import Grid, raster_labels, vector_labels
from .geometry import View, layer_box
from .readers import DataBandError, DataReadError
from .source import ArrayLabel, Scene, WindowedSource, missing_modalities, plan_outputs
from .spec import CubeDataSpec
from .splits import BlockSplit, seeded_rule


@dataclass
class ZarrLayer:
    """One modality group of the cube, read window by window (Zarr handles opened lazily per process)."""

    url: str
    group: str
    bands: list[int]
    times: list[int]
    doy: list[int]
    ratio: float
    offset: tuple[int, int]
    num_dates: int

    @cached_property
    def arrays(self) -> tuple[zarr.Array, zarr.Array]:
        """The group's ``data`` and ``valid`` arrays."""
        return modality_arrays(self.url, self.group)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("arrays", None)
        return state

    def _dates(self, frac: np.ndarray, rng: np.random.Generator | None) -> list[int]:
        """Positions in ``times``: all, the most valid (time order), or random valid ones when training."""
        k = self.num_dates
        if k >= len(frac):
            return list(range(len(frac)))
        best = sorted(np.argsort(-frac, kind="stable")[:k].tolist())
        if rng is None:
            return best
        valid = np.flatnonzero(frac > 0)
        return sorted(rng.choice(valid, k, replace=False).tolist()) if len(valid) >= k else best

    def read(self, view: View, rng: np.random.Generator | None) -> tuple[np.ndarray, list[int]]:
        """(num_dates, C, n, n) of the view's box; invalid pixels (and padding dates) NaN."""
        y0, x0, n = layer_box(view, self.ratio)
        y0, x0 = y0 + self.offset[0], x0 + self.offset[1]
        data, valid = self.arrays
        v = read_window(valid, (self.times,), y0, x0, n, n, 0.0) > 0  # (T_all, n, n)
        sel = self._dates(v.reshape(len(v), -1).mean(1), rng)
        x = np.full((self.num_dates, len(self.bands), n, n), np.nan, dtype=np.float32)
        block = read_window(data, ([self.times[i] for i in sel], self.bands), y0, x0, n, n, np.nan)
        x[: len(sel)] = np.where(v[sel][:, None], block, np.nan)
        doy = [self.doy[i] for i in sel] + [0] * (self.num_dates - len(sel))
        return x, doy


def _in_time(times: np.ndarray, rng: Any) -> np.ndarray:
    """Positions of ``times`` inside the spec's time range (bare dates cover whole days)."""
    if rng is None:
        return np.arange(len(times))

    def edge(v: dt.date | dt.datetime, end: bool) -> np.datetime64:
        if isinstance(v, dt.datetime):
            return np.datetime64(v.replace(tzinfo=None), "ns")
        return np.datetime64(v, "ns") + (np.timedelta64(1, "D") if end else np.timedelta64(0, "D"))

    t = times.astype("datetime64[ns]")
    lo, hi = edge(rng.start, False), edge(rng.end, True)
    return np.flatnonzero((t >= lo) & ((t < hi) if not isinstance(rng.end, dt.datetime) else (t <= hi)))


@dataclass(frozen=True)
class _Group:
    name: str
    bands: list[int]
    grid: Grid
    gsd: float
    times: list[int]
    doy: list[int]


class CubeLabelled(WindowedSource):
    """Windows of a Zarr cube with labels on its finest grid (label: int64 (H, W), IGNORE where unlabelled)."""

    task = "segmentation"

    def __init__(self, spec: CubeDataSpec, split: str, model_specs: Mapping[str, ModalitySpec], train: bool,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__(spec, split, train)
        url = spec.path
        try:
            present = cube_modalities(url)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError) as err:
            raise DataReadError(f"no Zarr cube at {url} ({err})") from None
        names = list(spec.modalities or [m for m in present if m in model_specs])
        absent = [m for m in names if m not in present]
        if absent or not names:
            raise DataReadError(f"{url}: cube has modalities {present}; asked for {names or 'any the model takes'}")
        missing_modalities(names, model_specs, url)
        self.modalities = tuple(names)
        groups = [self._group(url, m, model_specs[m], spec) for m in names]
        ref = min(groups, key=lambda g: g.gsd)
        if spec.vector_labels:
            labels, self.labels = vector_labels(spec.labels, spec.class_column, spec.name_column, ref.grid,
                                                spec.classes, spec.label_nodata)  # fmt: skip
        else:
            labels, self.labels = raster_labels(spec.labels, spec.label_band, ref.grid, spec.classes,
                                                spec.label_nodata)  # fmt: skip
        self.classes = list(self.labels.names)
        self.outputs = plan_outputs(model_specs, {g.name: g.gsd for g in groups}, spec.size, url)
        side = spec.size * min(o.gsd for o in self.outputs.values()) / ref.gsd
        layers = {}
        for g in groups:
            ratio = ref.gsd / g.gsd
            t, r = g.grid.transform, ref.grid.transform
            off = ((t.f - r.f) / -t.e, (r.c - t.c) / t.a)
            if abs(1 / ratio - round(1 / ratio)) > 1e-6 or any(abs(o - round(o)) > 1e-3 for o in off):
                raise DataReadError(f"{url}/{g.name}: its {g.gsd:g} m grid does not nest in {ref.name}'s {ref.gsd:g} m")
            k = len(g.times) if spec.num_dates is None else spec.num_dates
            k = k if model_specs[g.name].temporal else 1
            layers[(0, g.name)] = ZarrLayer(url, g.name, g.bands, g.times, g.doy, ratio,
                                            (round(off[0]), round(off[1])), k)  # fmt: skip
        quantum = max(1 / layer.ratio for layer in layers.values())
        self.scenes = [Scene("cube", ref.grid.shape, layers, side, ArrayLabel(labels),  # type: ignore[arg-type]
                             georef=(ref.grid.crs, ref.grid.transform), quantum=quantum)]  # fmt: skip
        rule = seeded_rule(spec, seed)
        assert rule is not None  # the spec refuses explicit splits for cubes
        block = rule.block or max(1, round(side))
        self.blocks = BlockSplit([ref.grid.shape], block, rule.gap, rule.fractions, rule.seed or 0)
        self.index([True], spec.min_labelled)
        self.stats.extra["source_gsd"] = {g.name: g.gsd for g in groups}
        self.stats.extra["dates"] = {g.name: len(g.times) for g in groups}

    @staticmethod
    def _group(url: str, name: str, spec: ModalitySpec, data: CubeDataSpec) -> _Group:
        ds = open_modality(url, name)
        bands = [str(b) for b in ds["band"].values]
        if any(b not in bands for b in spec.bands):
            raise DataBandError(f"{url}/{name}", name, spec.bands, tuple(bands))
        if ds.rio.crs is None:
            raise DataReadError(f"{url}/{name}: the cube group has no CRS (spatial_ref)")
        transform = ds.rio.transform()
        times = ds["time"].values
        keep = _in_time(times, data.time)
        if len(keep) == 0 and not spec.temporal:
            keep = np.arange(len(times))  # a single acquisition (HR basemap) is used whatever its date
        if len(keep) == 0:
            raise DataReadError(f"{url}/{name}: no date of the cube in the time range {data.time}")
        doy = pd.DatetimeIndex(times[keep]).dayofyear.tolist()
        grid = Grid(ds.rio.crs.to_wkt(), transform, (int(ds.sizes["y"]), int(ds.sizes["x"])))
        return _Group(name, [bands.index(b) for b in spec.bands], grid, abs(transform.a), keep.tolist(), doy)
