"""Random geo-windows over the valid data of a Zarr cube (layout of :mod:`pipeline.cube.layout`).

One sample is one place: a square window of ``size`` x ``size`` pixels of the 10 m grid, read from every
modality group of the cube over the same footprint (HR from its finer, aligned grid: ``size * 10 / gsd`` pixels),
with ``num_dates`` dates per modality, each date's day of year, its validity mask, and values normalised with the
model's :class:`~pipeline.modalities.ModalitySpec` (bands reordered to the model's order).

Where windows come from: the 10 m grid is cut into ``size`` x ``size`` cells and a cell is a candidate when at
least one date of every requested modality is valid on >= ``min_valid`` of it (computed once, block-wise, from the
``valid`` arrays). A sample picks a candidate cell, jitters the window by up to half a cell (staying inside the
grid), and draws its dates among those valid on >= ``min_valid`` of the window, in time order. Windows with
fewer valid dates are padded with invalid dates (``valid`` False, zeros), which the fusion masks out.

A sample's GCPL ``region`` is the cell (:func:`pipeline.ssl.regions.region_id`) of its window's centre, taken
from the cube's CRS and the window's pixel bounds on the 10 m grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import rioxarray  # noqa: F401  (registers the .rio accessor: the group's CRS)
import torch
import xarray as xr
import zarr

from pipeline.modalities import GRID_GSD, ModalitySpec, get_modality
from pipeline.ssl.regions import DEFAULT_NUM_REGIONS, check_num_regions, region_id

from .sources import Sample, lonlat, modality_entry, region_tensor


def read_window(arr: zarr.Array, lead: tuple, y0: int, x0: int, h: int, w: int, fill: float) -> np.ndarray:
    """``arr[lead + (y0:y0+h, x0:x0+w)]`` (orthogonal selection) with pixels outside the array = ``fill``."""
    H, W = arr.shape[-2:]
    lead_shape = tuple(len(i) if isinstance(i, list) else len(range(*i.indices(n)))
                       for i, n in zip(lead, arr.shape))  # fmt: skip
    out = np.full((*lead_shape, h, w), fill, dtype=np.float32)
    cy0, cy1, cx0, cx1 = max(y0, 0), min(y0 + h, H), max(x0, 0), min(x0 + w, W)
    if cy0 < cy1 and cx0 < cx1:
        block = arr.get_orthogonal_selection((*lead, slice(cy0, cy1), slice(cx0, cx1)))
        out[..., cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = block
    return out


class _Group:
    """One modality group, opened lazily per process (zarr handles are not shared across DataLoader workers)."""

    def __init__(self, url: str, name: str, spec: ModalitySpec) -> None:
        ds = xr.open_zarr(url, group=name, consolidated=False, decode_coords="all")
        bands = [str(b) for b in ds["band"].values]
        missing = [b for b in spec.bands if b not in bands]
        if missing:
            raise ValueError(f"{url}/{name}: cube lacks model bands {missing} (has {bands})")
        self.url, self.name, self.spec = url, name, spec
        self.band_index = [bands.index(b) for b in spec.bands]
        x, y = ds["x"].values, ds["y"].values
        self.gsd = float(abs(x[1] - x[0])) if len(x) > 1 else spec.gsd
        self.left, self.top = float(x[0]) - self.gsd / 2, float(y[0]) + self.gsd / 2  # outer edges
        self.shape = (int(ds.sizes["y"]), int(ds.sizes["x"]))
        self.doy = pd.DatetimeIndex(ds["time"].values).dayofyear.to_numpy().astype(np.int64)
        self.crs = ds.rio.crs.to_wkt() if ds.rio.crs is not None else None

    @cached_property
    def arrays(self) -> tuple[zarr.Array, zarr.Array]:
        g = zarr.open_group(self.url, mode="r", zarr_format=3)
        return g[f"{self.name}/data"], g[f"{self.name}/valid"]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("arrays", None)
        return state


class CubeSource:
    """Random windows of all requested modalities of a cube, same footprint, normalised for the model.

    Args:
        url: cube path or fsspec URL.
        size: window side in 10 m grid pixels.
        modalities: groups to read (default: every group the cube lists that the model knows).
        num_dates: dates per sample per time-series modality; a single-acquisition modality (``temporal`` False,
            e.g. HR) takes 1 unless given in ``dates_per_modality``.
        min_valid: minimum valid fraction of a date within a window (and of a candidate cell).
        specs: modality specs to normalise with (default: the model defaults).
        num_regions: GCPL regions of the job (a sample's ``region`` is the cell of its window's centre).

    """

    def __init__(self, url: str, size: int = 16, modalities: Sequence[str] | None = None, num_dates: int = 4,
                 min_valid: float = 0.5, dates_per_modality: dict[str, int] | None = None,
                 specs: dict[str, ModalitySpec] | None = None,
                 num_regions: int = DEFAULT_NUM_REGIONS) -> None:  # fmt: skip
        self.url = str(url)
        try:
            root = zarr.open_group(self.url, mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise FileNotFoundError(f"no Zarr cube at {self.url}") from err
        names = list(modalities or root.attrs.get("modalities") or [k for k, _ in root.groups()])
        specs = specs or {}
        self.groups = {n: _Group(self.url, n, specs.get(n) or get_modality(n)) for n in names}
        grids = [g for g in self.groups.values() if abs(g.gsd - GRID_GSD) < 1e-3 * GRID_GSD]
        if not grids:
            raise ValueError(f"{self.url}: windows are cut on the {GRID_GSD:g} m grid; no group of {names} is on it")
        self.ref = grids[0]
        if self.ref.crs is None:
            raise ValueError(f"{self.url}/{self.ref.name}: the cube group has no CRS (spatial_ref)")
        check_num_regions(num_regions)
        self.size, self.min_valid, self.num_regions = size, min_valid, num_regions
        self.num_dates = {n: (num_dates if g.spec.temporal else 1) for n, g in self.groups.items()}
        self.num_dates |= dates_per_modality or {}
        self.modalities = tuple(names)
        self.cells = self._candidate_cells()
        if len(self.cells) == 0:
            raise ValueError(f"{self.url}: no {size} x {size} window with >= {min_valid:.0%} valid data in {names}")

    def _offset(self, g: _Group) -> tuple[int, int, int]:
        """(scale, row offset, col offset) of group ``g``'s pixels relative to the 10 m reference grid."""
        r = round(self.ref.gsd / g.gsd)
        return r, round((g.top - self.ref.top) / g.gsd), round((self.ref.left - g.left) / g.gsd)

    def _candidate_cells(self) -> np.ndarray:
        """(N, 2) (row, col) of grid cells where every modality has a date valid on >= ``min_valid``."""
        H, W = self.ref.shape
        ny, nx = H // self.size, W // self.size
        ok = np.ones((ny, nx), dtype=bool)
        for g in self.groups.values():
            r, oy, ox = self._offset(g)
            s = self.size * r
            valid = g.arrays[1]
            best = np.zeros((ny, nx))
            for t in range(valid.shape[0]):  # one date at a time keeps memory at one (y, x) plane
                v = read_window(valid, ([t],), oy, ox, ny * s, nx * s, 0.0)[0]
                best = np.maximum(best, v.reshape(ny, s, nx, s).mean(axis=(1, 3)))
            ok &= best >= self.min_valid
        return np.argwhere(ok)

    def __len__(self) -> int:
        return len(self.cells)

    def window(self, index: int, rng: np.random.Generator | None) -> tuple[int, int]:
        """Top-left (row, col) on the 10 m grid of the window of cell ``index`` (jittered when ``rng`` is given)."""
        H, W = self.ref.shape
        cy, cx = (int(v) * self.size for v in self.cells[index])
        if rng is not None:
            j = self.size // 2
            cy, cx = cy + int(rng.integers(-j, j + 1)), cx + int(rng.integers(-j, j + 1))
        return min(max(cy, 0), H - self.size), min(max(cx, 0), W - self.size)

    def region(self, y0: int, x0: int) -> int:
        """GCPL region of the window with top-left 10 m grid pixel ``(y0, x0)``: the cell of its centre."""
        half = self.size * self.ref.gsd / 2
        x = self.ref.left + x0 * self.ref.gsd + half
        y = self.ref.top - y0 * self.ref.gsd - half
        return region_id(*lonlat(self.ref.crs, x, y), self.num_regions)

    def _dates(self, frac: np.ndarray, n: int, rng: np.random.Generator | None) -> list[int]:
        good = np.flatnonzero(frac >= self.min_valid)
        if len(good) > n:
            good = np.sort(rng.choice(good, n, replace=False)) if rng is not None else good[:n]
        return [int(t) for t in good]

    def get(self, index: int, rng: np.random.Generator | None = None) -> Sample:
        """The window of candidate cell ``index``: random jitter, dates and flips from ``rng`` (None: centred)."""
        y0, x0 = self.window(index, rng)
        flips = (rng.random() < 0.5, rng.random() < 0.5, int(rng.integers(0, 4))) if rng is not None else None
        sample: Sample = {}
        for name, g in self.groups.items():
            r, oy, ox = self._offset(g)
            s = self.size * r
            py, px = oy + y0 * r, ox + x0 * r  # window origin in this group's pixels
            data, valid = g.arrays
            v = read_window(valid, (slice(None),), py, px, s, s, 0.0) > 0  # (T_all, s, s)
            dates = self._dates(v.reshape(len(v), -1).mean(1), self.num_dates[name], rng)
            T = self.num_dates[name]
            x = np.zeros((T, g.spec.num_bands, s, s), dtype=np.float32)
            vv = np.zeros((T, s, s), dtype=bool)
            doy = np.zeros(T, dtype=np.int64)
            if dates:
                block = read_window(data, (dates, g.band_index), py, px, s, s, np.nan)
                x[: len(dates)], vv[: len(dates)], doy[: len(dates)] = block, v[dates], g.doy[dates]
            entry = modality_entry(x, g.spec, g.gsd, doy=doy, valid=vv)
            if flips is not None:
                for key in ("x", "valid"):
                    t = entry[key].flip(-1) if flips[0] else entry[key]
                    t = t.flip(-2) if flips[1] else t
                    entry[key] = torch.rot90(t, flips[2], dims=(-2, -1)).contiguous()
            sample[name] = entry
        sample["region"] = region_tensor(self.region(y0, x0))
        return sample
