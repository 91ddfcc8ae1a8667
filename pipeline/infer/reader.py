"""Reading one inference tile from the Zarr cube into model inputs.

For every requested modality the reader takes all dates inside the job's time range (``periods``: one range, or a
before and an after range for change detection), the model's bands in the model's order (by name, from the cube's
``band`` coordinate), the tile's window on the modality's grid (a finer HR grid reads the same ground footprint at
its integer ratio), and returns numpy arrays ready to be stacked into :class:`~pipeline.model.ModalityInput`:
normalised with the model's own statistics, nodata zero-filled and marked in a per-pixel ``valid`` mask, day of
year of every date.

A tile that sticks out past the grid's far edges is cut to the part inside the grid (:attr:`TileInputs.extent`),
not padded: the model then sees the grid's edge exactly as an untiled run does (its window attention masks what
lies beyond an image), instead of a band of made-up zero pixels that would colour every mosaic's edge.

Decoded cube chunks are kept in a small LRU cache: neighbouring tiles overlap and share chunks, so a chunk is
decoded once per worker instead of once per tile that touches it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)

from pipeline.cube import layout
from pipeline.infer.tiling import Tile
from pipeline.modalities import GRID_GSD, ModalitySpec

log = logging.getLogger(__name__)

Period = tuple[datetime | date | str, datetime | date | str]


@dataclass(frozen=True)
class OutputGrid:
    """The cube's 10 m grid, which is also the inference output grid."""

    crs: str  # WKT
    transform: tuple[float, float, float, float, float, float]  # GDAL-affine a, b, c, d, e, f
    height: int
    width: int
    chunks: tuple[int, int]  # cube chunk (y, x) on the 10 m grid (locality of reads)

    def refined(self, ratio: int) -> OutputGrid:
        """The same extent with pixels ``ratio`` times finer (an HR output grid nested in the 10 m grid)."""
        if ratio == 1:
            return self
        a, b, c, d, e, f = self.transform
        return OutputGrid(self.crs, (a / ratio, b, c, d, e / ratio, f), self.height * ratio, self.width * ratio,
                          self.chunks)  # fmt: skip


@dataclass
class ModalityArrays:
    """One modality of one tile and one period: ``x`` (T, C, H, W) normalised, ``valid`` (T, H, W), ``doy`` (T,)."""

    x: np.ndarray
    valid: np.ndarray
    doy: np.ndarray
    gsd: float


@dataclass
class TileInputs:
    """Model inputs of one tile: one dict of modalities per period, and where any input was valid (S, S).

    ``extent`` (h, w) is the part of the tile inside the grid (the whole tile except at the grid's far edges); the
    model arrays cover only that part, ``valid`` the whole tile (False outside the grid).
    """

    tile: Tile
    periods: list[dict[str, ModalityArrays]]
    valid: np.ndarray
    extent: tuple[int, int]

    @property
    def all_nodata(self) -> bool:
        """True when no modality has a single valid pixel in the tile (nothing to run the model on)."""
        return not bool(self.valid.any())


def _as_datetime64(value: datetime | date | str, end: bool) -> np.datetime64:
    """Period bounds: a bare date covers its whole day (an end date is exclusive at the next midnight)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value) if "T" in value or " " in value else date.fromisoformat(value)
    if isinstance(value, datetime):
        value = value.replace(tzinfo=None)
        return np.datetime64(value, "ns") + (np.timedelta64(1, "ns") if end else np.timedelta64(0, "ns"))
    day = datetime(value.year, value.month, value.day) + (timedelta(days=1) if end else timedelta())
    return np.datetime64(day, "ns")


def day_of_year(dates: np.ndarray) -> np.ndarray:
    """1..366 for datetime64 values."""
    d = dates.astype("datetime64[D]")
    return (d - d.astype("datetime64[Y]")).astype(np.int64) + 1


def output_grid(cube_url: str, modalities: Sequence[str]) -> OutputGrid:
    """The 10 m grid of a cube: from its root ``grid`` attribute (bounds, shape) or else from a 10 m group."""
    from pyproj import CRS

    root_grid = (layout.root_attrs(cube_url) or {}).get("grid")
    chunks: tuple[int, int] | None = None
    for name in modalities:
        ds = layout.open_modality(cube_url, name)
        t = ds.rio.transform()
        ratio = max(round(GRID_GSD / abs(t.a)), 1)
        cy, cx = (ds["data"].encoding.get("chunks") or ds["data"].shape)[-2:]
        chunks = chunks or (max(cy // ratio, 1), max(cx // ratio, 1))
        if root_grid is None and abs(abs(t.a) - GRID_GSD) < 1e-9:
            return OutputGrid(ds.rio.crs.to_wkt(), (t.a, t.b, t.c, t.d, t.e, t.f), ds.sizes["y"], ds.sizes["x"], chunks)
    if root_grid is None or chunks is None:
        raise ValueError(f"{cube_url}: no 10 m modality among {list(modalities)} and no root 'grid' attribute")
    left, _, _, top = (float(v) for v in root_grid["bounds"])
    res = float(root_grid.get("resolution", GRID_GSD))
    h, w = (int(v) for v in root_grid["shape"])
    return OutputGrid(CRS.from_user_input(root_grid["crs"]).to_wkt(), (res, 0.0, left, 0.0, -res, top), h, w, chunks)


class _BlockCache:
    """Thread-safe LRU of decoded chunk blocks, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Drop every cached block."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:
        """The cached value of ``key``, or ``load()`` (cached when it fits; reads happen outside the lock)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load()
        with self._lock:
            if key not in self._items and value.nbytes <= self.max_bytes:
                self._items[key] = value
                self._bytes += value.nbytes
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
        return value


@dataclass
class _Block:
    """A decoded cube chunk over the used dates: data (T, C, ch, cw) and validity (T, ch, cw)."""

    data: np.ndarray
    valid: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.valid.nbytes


class _Group:
    """One modality group of the cube, with the date and band selection of the job."""

    def __init__(self, cube_url: str, spec: ModalitySpec, periods: Sequence[Period]) -> None:
        ds = layout.open_modality(cube_url, spec.name)
        self.name, self.spec = spec.name, spec
        cube_bands = [str(b) for b in ds["band"].values]
        missing = [b for b in spec.bands if b not in cube_bands]
        if missing:
            raise ValueError(
                f"{cube_url}/{spec.name}: the model needs bands {list(spec.bands)} in this order; the cube has "
                f"{cube_bands} (missing {missing})"
            )
        self.band_index = [cube_bands.index(b) for b in spec.bands]
        units = ds.attrs.get("units") or ds["data"].attrs.get("units")
        if units and units != spec.units:
            log.warning("%s: cube units %r differ from the model's %r", spec.name, units, spec.units)
        self.gsd = abs(float(ds.rio.transform().a))
        ratio = GRID_GSD / self.gsd
        if ratio < 1 or abs(ratio - round(ratio)) > 1e-6:
            raise ValueError(f"{cube_url}/{spec.name}: a {self.gsd} m grid does not nest in the 10 m grid")
        self.ratio = round(ratio)
        dates = ds["time"].values.astype("datetime64[ns]")
        self.selections: list[np.ndarray] = []
        for start, end in periods:
            lo, hi = _as_datetime64(start, end=False), _as_datetime64(end, end=True)
            self.selections.append(np.flatnonzero((dates >= lo) & (dates < hi)))
        if not spec.temporal and len(periods) == 1 and not len(self.selections[0]) and len(dates):
            self.selections[0] = np.arange(len(dates))  # [ours] a static basemap (HR) outside the range is kept
        self.dates = dates
        used = np.concatenate(self.selections) if self.selections else np.empty(0, int)
        self.t0, self.t1 = (int(used.min()), int(used.max()) + 1) if len(used) else (0, 0)
        self.data, self.valid = layout.modality_arrays(cube_url, spec.name)
        self.shape = self.data.shape[-2:]
        self.chunks = self.data.chunks[-2:]

    def block(self, cache: _BlockCache, by: int, bx: int) -> _Block:
        """Chunk block (by, bx) over the used dates, in the model's band order."""
        ch, cw = self.chunks
        ys, xs = slice(by * ch, (by + 1) * ch), slice(bx * cw, (bx + 1) * cw)

        def load() -> _Block:
            data = self.data[self.t0 : self.t1, :, ys, xs][:, self.band_index]  # (T, C, ch, cw)
            valid = self.valid[self.t0 : self.t1, ys, xs].astype(bool) & np.isfinite(data).all(axis=1)
            return _Block(np.ascontiguousarray(data, dtype=np.float32), valid)

        return cache.get((self.name, by, bx), load)

    def window(self, cache: _BlockCache, tile: Tile, extent: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Tile window over the used dates, cut to ``extent`` (h, w) grid pixels: data (T, C, h*r, w*r), valid."""
        rows, cols = tile.window(self.ratio)
        eh, ew = extent[0] * self.ratio, extent[1] * self.ratio
        nt, nb = self.t1 - self.t0, len(self.band_index)
        data = np.full((nt, nb, eh, ew), np.nan, dtype=np.float32)
        valid = np.zeros((nt, eh, ew), dtype=bool)
        (h, w), (ch, cw) = self.shape, self.chunks
        r0, r1 = max(rows.start, 0), min(rows.start + eh, h)
        c0, c1 = max(cols.start, 0), min(cols.start + ew, w)
        for by in range(r0 // ch, (r1 - 1) // ch + 1):
            for bx in range(c0 // cw, (c1 - 1) // cw + 1):
                b = self.block(cache, by, bx)
                y0, y1 = max(r0, by * ch), min(r1, (by + 1) * ch)
                x0, x1 = max(c0, bx * cw), min(c1, (bx + 1) * cw)
                src = (slice(y0 - by * ch, y1 - by * ch), slice(x0 - bx * cw, x1 - bx * cw))
                dst = (slice(y0 - rows.start, y1 - rows.start), slice(x0 - cols.start, x1 - cols.start))
                data[:, :, dst[0], dst[1]] = b.data[:, :, src[0], src[1]]
                valid[:, dst[0], dst[1]] = b.valid[:, src[0], src[1]]
        return data, valid


class CubeReader:
    """Reads tiles of the requested modalities from a Zarr cube (local path or fsspec URL).

    Args:
        cube_url: the cube.
        specs: the model's modality specs (band order, normalisation) of the modalities to read.
        periods: one (start, end) range, or two (before, after) for change detection.
        cache_bytes: budget of the decoded-chunk cache.

    A modality with no date in a period is left out of that period's inputs (the model fuses what is present);
    with two periods only modalities present in both are used, so both branches see the same inputs.
    """

    def __init__(
        self,
        cube_url: str,
        specs: Mapping[str, ModalitySpec],
        periods: Sequence[Period],
        cache_bytes: int = 1 << 30,
        grid_shape: tuple[int, int] | None = None,
    ) -> None:
        if not periods:
            raise ValueError("at least one time period is needed")
        self.cube_url = cube_url
        present = layout.cube_modalities(cube_url)
        absent = [m for m in specs if m not in present]
        if absent:
            raise ValueError(
                f"{cube_url} has no {absent} group (it has {present}); build the cube with these modalities "
                "(skypipe cube build) or drop them from the job's modalities"
            )
        if grid_shape is None:
            grid = output_grid(cube_url, list(specs))
            grid_shape = (grid.height, grid.width)
        self.grid_shape = grid_shape
        self.groups = [_Group(cube_url, spec, periods) for spec in specs.values()]
        self.n_periods = len(periods)
        used = [g for g in self.groups if all(len(s) for s in g.selections)]
        for g in self.groups:
            if g not in used:
                counts = [len(s) for s in g.selections]
                log.warning("%s: dates per period %s; not used (every period needs one)", g.name, counts)
        if not used:
            shown = [tuple(map(str, p)) for p in periods]
            raise ValueError(f"{cube_url}: no modality of {list(specs)} has a date in every period {shown}")
        self.groups = used
        self.cache = _BlockCache(cache_bytes)

    @property
    def modalities(self) -> list[str]:
        """Modalities actually read."""
        return [g.name for g in self.groups]

    @property
    def finest_ratio(self) -> int:
        """Pixels per 10 m grid cell of the finest modality read (1 for S2/S1 only; 16 for 0.625 m HR)."""
        return max(g.ratio for g in self.groups)

    def dates(self, period: int = 0) -> dict[str, list[str]]:
        """Dates used per modality in ``period`` (ISO strings)."""
        return {g.name: [str(d)[:19] for d in g.dates[g.selections[period]]] for g in self.groups}

    def extent(self, tile: Tile) -> tuple[int, int]:
        """(h, w): the part of ``tile`` inside the grid, in grid pixels."""
        H, W = self.grid_shape
        return min(tile.size, H - tile.row), min(tile.size, W - tile.col)

    def read(self, tile: Tile) -> TileInputs:
        """All modalities and periods of ``tile``; ``valid`` (S, S) is True where any input pixel was valid."""
        S = tile.size
        h, w = self.extent(tile)
        any_valid = np.zeros((S, S), dtype=bool)
        periods: list[dict[str, ModalityArrays]] = [{} for _ in range(self.n_periods)]
        for g in self.groups:
            data, valid = g.window(self.cache, tile, (h, w))  # (Tu, C, h*r, w*r), (Tu, h*r, w*r) over used dates
            x = g.spec.normalize(data, band_axis=-3)
            np.nan_to_num(x, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
            for p, sel in enumerate(g.selections):
                idx = sel - g.t0
                periods[p][g.name] = ModalityArrays(x[idx], valid[idx], day_of_year(g.dates[sel]), g.gsd)
                v = valid[idx].any(axis=0)
                if g.ratio > 1:
                    v = v.reshape(h, g.ratio, w, g.ratio).any(axis=(1, 3))
                any_valid[:h, :w] |= v
        return TileInputs(tile, periods, any_valid, (h, w))
