"""The cube's pixel grids: one projected CRS, a 10 m grid, and HR grids nested exactly inside it.

Every modality of a cube shares the bounds of the 10 m grid (``GRID_GSD``). Its edges sit on multiples of the
coarsest modality resolution in the target CRS, so Sentinel-2 / Sentinel-1 products that already live on the
UTM 10 m lattice are read on their native pixels (no resampling), and every finer grid divides it exactly.

HR imagery is tokenised by the model with 4x4 patches and its tokens are merged 2x2 up to three times before
they meet the 10 m tokens, so an HR pixel must be ``10 m / (4 * 2**n)`` for ``n`` in 0..3 [ours]. The native HR
GSD is snapped to the nearest of those in log space and the HR grid reuses the 10 m origin with an integer ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from affine import Affine
from odc.geo.geobox import GeoBox
from pyproj import CRS, Transformer

from pipeline.modalities import GRID_GSD, HR, HR_GSDS, SENTINEL_GSDS

__all__ = [
    "HR_GSDS", "SENTINEL_GSDS", "CubeGrid", "native_gsd", "normalize_crs", "region_grid", "snap_hr_gsd", "utm_crs",
]  # fmt: skip


def utm_crs(lon: float, lat: float) -> str:
    """The UTM zone (WGS84, EPSG:326xx north / 327xx south) containing ``lon, lat``."""
    zone = min(int((lon + 180.0) // 6.0) + 1, 60)
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


def normalize_crs(crs: str | int) -> str:
    """``EPSG:<code>`` for anything pyproj understands; only projected CRSs in metres are accepted."""
    parsed = CRS.from_user_input(crs)
    if not parsed.is_projected:
        raise ValueError(f"crs {crs!r} is not a projected CRS; the cube grid needs metres (e.g. a UTM zone)")
    unit = parsed.axis_info[0].unit_name if parsed.axis_info else "metre"
    if unit not in ("metre", "meter"):
        raise ValueError(f"crs {crs!r} has axis unit {unit!r}; the cube grid needs metres")
    epsg = parsed.to_epsg()
    return f"EPSG:{epsg}" if epsg else parsed.to_wkt()


def snap_hr_gsd(gsd: float) -> float:
    """The allowed HR GSD (see :data:`HR_GSDS`) nearest to ``gsd`` in log space."""
    return HR.nearest_resolution(gsd)


@dataclass(frozen=True)
class CubeGrid:
    """The cube's 10 m reference grid: bounds (left, bottom, right, top) in ``crs`` metres."""

    crs: str
    bounds: tuple[float, float, float, float]
    resolution: float = GRID_GSD

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the 10 m grid in pixels."""
        left, bottom, right, top = self.bounds
        return round((top - bottom) / self.resolution), round((right - left) / self.resolution)

    def geobox(self, resolution: float | None = None) -> GeoBox:
        """The grid at ``resolution`` (default 10 m) with exactly these bounds; the ratio must be an integer."""
        res = self.resolution if resolution is None else float(resolution)
        left, bottom, right, top = self.bounds
        width, height = (right - left) / res, (top - bottom) / res
        if abs(width - round(width)) > 1e-9 or abs(height - round(height)) > 1e-9:
            raise ValueError(f"resolution {res} m does not divide the grid bounds {self.bounds} into whole pixels")
        return GeoBox((round(height), round(width)), Affine(res, 0.0, left, 0.0, -res, top), self.crs)

    def to_dict(self) -> dict:
        """Plain data for Zarr attributes."""
        return {"crs": self.crs, "bounds": list(self.bounds), "resolution": self.resolution, "shape": list(self.shape)}


def region_grid(
    bbox_lonlat: tuple[float, float, float, float], crs: str | int | None = None, snap: float = GRID_GSD
) -> CubeGrid:
    """The 10 m grid covering a WGS84 ``bbox_lonlat`` in ``crs`` (default: UTM zone of the bbox centre).

    Bounds are the bbox transformed to ``crs`` (edges densified, so the projected box contains the whole
    region) and snapped outwards to multiples of ``snap`` metres (the coarsest modality resolution).
    """
    minx, miny, maxx, maxy = bbox_lonlat
    target = normalize_crs(crs) if crs is not None else utm_crs((minx + maxx) / 2, (miny + maxy) / 2)
    to_target = Transformer.from_crs("EPSG:4326", target, always_xy=True)
    t = np.linspace(0.0, 1.0, 21)
    lon = np.concatenate(
        [minx + (maxx - minx) * t, np.full_like(t, maxx), maxx - (maxx - minx) * t, np.full_like(t, minx)]
    )
    lat = np.concatenate(
        [np.full_like(t, miny), miny + (maxy - miny) * t, np.full_like(t, maxy), maxy - (maxy - miny) * t]
    )
    xs, ys = to_target.transform(lon, lat)
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
        raise ValueError(f"region {bbox_lonlat} cannot be projected to {target}")
    snap = float(snap)
    left, right = math.floor(xs.min() / snap) * snap, math.ceil(xs.max() / snap) * snap
    bottom, top = math.floor(ys.min() / snap) * snap, math.ceil(ys.max() / snap) * snap
    return CubeGrid(crs=target, bounds=(left, bottom, right, top))


def native_gsd(transform: list[float] | tuple[float, ...], crs: str | int, target_crs: str) -> float:
    """Ground pixel size in metres of a source grid (``proj:transform`` + ``proj:code``) measured in ``target_crs``.

    Geographic sources (EPSG:4326, like Sen1Floods11) have degree pixels; this measures one pixel's diagonal
    at the grid origin after projecting, so a 8.98e-5 deg pixel comes out at about 10 m.
    """
    a, b, c, d, e, f = (float(v) for v in list(transform)[:6])
    src = CRS.from_user_input(crs)
    if src.equals(CRS.from_user_input(target_crs)):
        return math.sqrt(abs(a * e - b * d))
    tr = Transformer.from_crs(src, target_crs, always_xy=True)
    x0, y0 = tr.transform(c, f)
    x1, y1 = tr.transform(c + a, f + d)
    x2, y2 = tr.transform(c + b, f + e)
    return math.sqrt(abs((x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)))
