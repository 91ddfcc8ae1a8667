"""Area per class of a class map: pixel counts with Dask, block by block, times the pixel's ground area.

Outputs of a class product's job (:func:`write_areas`)::

    areas.csv    class_id, class, pixels, area_km2, share    one row per class (zero-area classes included);
                                                             share = fraction of the mapped area (no data excluded)
    areas.json   {"classes": [the same rows], "mapped_pixels", "mapped_km2", "nodata_pixels", "pixel_area_m2",
                  "crs", "provenance": {job, kind, model, ...}}

Only the ``(256,)`` count vector of each block is ever held, so a class map of any size costs one pass over its
chunks. Areas are exact pixel areas of the (projected) grid, no reprojection: ``pixels x |a e|`` in m2.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import pyproj
from affine import Affine

from pipeline import storage
from pipeline.mosaic.stitch import open_mosaic
from pipeline.mosaic.tables import provenance_columns
from pipeline.palette import CLASS_NODATA

AREAS_CSV = "areas.csv"
AREAS_JSON = "areas.json"
_COLUMNS = ["class_id", "class", "pixels", "area_km2", "share"]


def pixel_area_m2(crs: Any, transform: Affine) -> float:
    """Ground area of one pixel of a projected grid, in m2 (the CRS's linear unit converted to metres).

    Raises:
        ValueError: a geographic CRS (pixels of unequal area; jobs always run on a projected grid).
    """
    crs = pyproj.CRS.from_user_input(crs)
    if not crs.is_projected:
        raise ValueError(f"class areas need a projected grid, not {crs.name!r} (pixels of a lon/lat grid differ)")
    metres = crs.axis_info[0].unit_conversion_factor
    return abs(transform.a * transform.e - transform.b * transform.d) * metres**2


def class_pixel_counts(classes: da.Array | np.ndarray) -> np.ndarray:
    """``(256,)`` int64: pixels of each value of a ``(y, x)`` uint8 class map (index 255: no data)."""
    arr = da.asarray(classes)
    if arr.dtype != np.uint8:
        raise ValueError(f"a class map is uint8, not {arr.dtype}")

    def count(block: np.ndarray) -> np.ndarray:
        return np.bincount(block.ravel(), minlength=256).astype(np.int64)[None, None]

    per_block = arr.map_blocks(count, new_axis=2, chunks=(1, 1, 256), dtype=np.int64)
    return np.asarray(per_block.sum(axis=(0, 1)).compute())


@dataclass
class AreaTable:
    """Pixels, km2 and share of the mapped area of every class."""

    rows: list[dict[str, Any]]  # class_id, class, pixels, area_km2, share
    pixel_area_m2: float
    nodata_pixels: int
    meta: dict[str, Any] = field(default_factory=dict)  # crs, provenance

    @property
    def mapped_pixels(self) -> int:
        """Pixels with a class."""
        return sum(int(r["pixels"]) for r in self.rows)

    @property
    def mapped_km2(self) -> float:
        """Area with a class, km2."""
        return self.mapped_pixels * self.pixel_area_m2 / 1e6

    def frame(self) -> pd.DataFrame:
        """The rows as a DataFrame (the CSV's columns)."""
        return pd.DataFrame(self.rows, columns=_COLUMNS)

    def to_json(self) -> dict[str, Any]:
        """What ``areas.json`` holds."""
        return {
            "classes": self.rows, "mapped_pixels": self.mapped_pixels, "mapped_km2": self.mapped_km2,
            "nodata_pixels": self.nodata_pixels, "pixel_area_m2": self.pixel_area_m2, **self.meta,
        }  # fmt: skip

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> AreaTable:
        """The table of an ``areas.json``."""
        meta = {k: v for k, v in obj.items() if k in ("crs", "provenance")}
        return cls(list(obj["classes"]), float(obj["pixel_area_m2"]), int(obj["nodata_pixels"]), meta)

    def lines(self) -> list[str]:
        """Summary lines: km2, pixels and share per class, then the mapped total."""
        width = max([6, *(len(str(r["class"])) for r in self.rows)])
        lines = [f"{'class':<{width}}  {'km2':>12}  {'pixels':>12}  {'share':>7}"]
        for r in self.rows:
            lines.append(
                f"{r['class']:<{width}}  {r['area_km2']:>12.4f}  {r['pixels']:>12,}  {100 * r['share']:6.1f} %"
            )
        lines.append(f"{'mapped':<{width}}  {self.mapped_km2:>12.4f}  {self.mapped_pixels:>12,}")
        return lines


def class_areas(counts: np.ndarray, class_names: list[str], pixel_area: float) -> AreaTable:
    """The area table of a ``(256,)`` pixel count vector (:func:`class_pixel_counts`).

    Every named class gets a row (zero included); values beyond the names (none from the mosaic's argmax) get
    ``class_<i>`` rows so that the rows always add up to the mapped area.
    """
    counts = np.asarray(counts, dtype=np.int64)
    seen = np.flatnonzero(counts[:CLASS_NODATA])
    n = max(len(class_names), int(seen[-1]) + 1 if len(seen) else 0)
    mapped = int(counts[:CLASS_NODATA].sum())
    rows = [
        {
            "class_id": i,
            "class": class_names[i] if i < len(class_names) else f"class_{i}",
            "pixels": int(counts[i]),
            "area_km2": int(counts[i]) * pixel_area / 1e6,
            "share": int(counts[i]) / mapped if mapped else 0.0,
        }
        for i in range(n)
    ]
    return AreaTable(rows, float(pixel_area), int(counts[CLASS_NODATA]))


def mosaic_areas(mosaic_url: str, *, job: str | None = None) -> AreaTable:
    """The area table of a class mosaic's ``classes`` map (``product == "classes"`` in its attributes)."""
    ds = open_mosaic(mosaic_url)
    if ds.attrs.get("product") != "classes" or "classes" not in ds:
        raise ValueError(f"{mosaic_url} is not a class mosaic (product {ds.attrs.get('product')!r}): no class areas")
    transform = Affine(*ds.attrs["grid"]["transform"][:6])
    crs = ds.attrs["grid"]["crs"]
    names = list(ds.attrs.get("class_names") or [str(b) for b in ds["band"].values])
    table = class_areas(class_pixel_counts(ds["classes"].data), names, pixel_area_m2(crs, transform))
    provenance = provenance_columns(ds.attrs.get("provenance") or {}, kind=str(ds.attrs.get("kind")), job=job)
    table.meta = {"crs": pyproj.CRS.from_user_input(crs).to_string(), "provenance": provenance}
    return table


def write_areas(mosaic_url: str, csv_url: str, json_url: str, *, job: str | None = None) -> AreaTable:
    """Write the area table of a class mosaic as CSV and JSON (each atomically); returns it."""
    table = mosaic_areas(mosaic_url, job=job)
    buffer = io.StringIO()
    table.frame().to_csv(buffer, index=False)
    storage.write_bytes(csv_url, buffer.getvalue().encode())
    storage.write_json(json_url, table.to_json(), indent=2)
    return table


def read_areas(json_url: str) -> AreaTable:
    """The table stored in an ``areas.json``."""
    return AreaTable.from_json(storage.read_json(json_url))
