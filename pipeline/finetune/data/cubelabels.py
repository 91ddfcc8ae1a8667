"""Labels in any CRS onto a cube's grid: label rasters reprojected (nearest), polygons rasterised.

Both come back as class indices on the grid of the cube's finest modality, IGNORE where unlabelled (label nodata,
outside the labels). Labels that do not overlap the cube are an error naming both extents, which catches the
classic mistakes (wrong file, a CRS-less file read as lon/lat, swapped axes) before any training.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

from pipeline.finetune.sample import IGNORE

from .labels import LabelMap, LabelValueError, parse_classes_tag
from .readers import DataReadError

VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg", ".parquet", ".geoparquet", ".shp", ".fgb")


class LabelExtentError(DataReadError):
    """Labels that do not overlap the cube; the message names both extents and CRSs."""


@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid: CRS (WKT or code), pixel transform, (H, W)."""

    crs: str
    transform: Affine
    shape: tuple[int, int]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(min x, min y, max x, max y) in the grid's CRS."""
        t, (h, w) = self.transform, self.shape
        xs, ys = (t.c, t.c + t.a * w), (t.f, t.f + t.e * h)
        return min(xs), min(ys), max(xs), max(ys)


def _short_crs(crs: Any) -> str:
    from pyproj import CRS

    c = CRS.from_user_input(crs)
    code = c.to_epsg()
    return f"EPSG:{code}" if code else c.name


def check_overlap(label_bounds: tuple[float, float, float, float], grid: Grid, path: str, label_crs: Any) -> None:
    """Raise :class:`LabelExtentError` when ``label_bounds`` (already in the grid's CRS) miss the grid."""
    a, b = label_bounds, grid.bounds
    if not all(np.isfinite(a)) or a[0] >= b[2] or a[2] <= b[0] or a[1] >= b[3] or a[3] <= b[1]:
        shown = ", ".join(f"{v:.6g}" for v in a)
        raise LabelExtentError(
            f"{path}: the labels ({_short_crs(label_crs)}) cover [{shown}] in the cube's {_short_crs(grid.crs)}, "
            f"which does not overlap the cube's extent [{', '.join(f'{v:.6g}' for v in b)}]"
        )


def raster_labels(path: str, band: int, grid: Grid, classes: Any, nodata: list[float]) -> tuple[np.ndarray, LabelMap]:
    """A label raster reprojected onto ``grid`` (nearest neighbour), mapped to class indices (int16, IGNORE).

    Without declared ``classes`` the classes are the values found on the grid (named by a ``classes`` tag such as
    ``"1=cultivated land,2=forest"`` when the raster has one).
    """
    import rasterio
    from rasterio.warp import Resampling, reproject, transform_bounds

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                if src.crs is None:
                    raise DataReadError(f"{path}: the label raster has no CRS; it cannot be placed on the cube")
                if band > src.count:
                    raise DataReadError(f"{path}: has {src.count} band(s), no label band {band}")
                check_overlap(transform_bounds(src.crs, grid.crs, *src.bounds), grid, path, src.crs)
                raw = src.read(band).astype(np.float64)
                src_crs, src_transform, src_nodata = src.crs, src.transform, src.nodata
                named = parse_classes_tag(src.tags().get("classes"))
    except rasterio.errors.RasterioIOError as err:
        raise DataReadError(f"{path}: cannot read the label raster ({err})") from None
    dst = np.full(grid.shape, np.nan, dtype=np.float64)
    reproject(
        raw, dst, src_transform=src_transform, src_crs=src_crs, src_nodata=src_nodata, dst_transform=grid.transform,
        dst_crs=grid.crs, dst_nodata=np.nan, resampling=Resampling.nearest,
    )  # fmt: skip
    found = np.unique(dst[np.isfinite(dst)]) if classes is None else ()
    labels = LabelMap.build(classes, nodata, found, named)
    return labels.apply(dst, path).astype(np.int16), labels


def _read_vectors(path: str) -> Any:
    import geopandas as gpd

    try:
        if Path(path).suffix.lower() in (".parquet", ".geoparquet"):
            return gpd.read_parquet(path)
        return gpd.read_file(path)
    except Exception as err:  # pyogrio / pyarrow raise many types: all mean "unreadable"
        raise DataReadError(f"{path}: cannot read the vector labels ({err})") from None


def vector_labels(path: str, class_column: str | None, name_column: str | None, grid: Grid, classes: Any,
                  nodata: list[float]) -> tuple[np.ndarray, LabelMap]:  # fmt: skip
    """Polygons rasterised onto ``grid`` (a pixel takes the class of the polygon over its centre), class indices.

    Numeric class columns map like raster values (``classes`` a list: values 0..K-1; a mapping: value -> name;
    none: the values found, named by ``name_column``); text class columns are class names (``classes``: a list of
    the names to use, in order; none: the names found, sorted).
    """
    import pandas as pd
    from rasterio.features import rasterize

    gdf = _read_vectors(path)
    if gdf.crs is None:
        raise DataReadError(f"{path}: the vector labels have no CRS; they cannot be placed on the cube")
    columns = [c for c in gdf.columns if c != gdf.geometry.name]
    for field, col in (("class_column", class_column), ("name_column", name_column)):
        if (field == "class_column" or col is not None) and col not in columns:
            raise DataReadError(f"{path}: {field} {col!r} is not a column of the vector labels {columns}")
    label_crs = gdf.crs
    gdf = gdf.to_crs(grid.crs)
    check_overlap(tuple(gdf.total_bounds), grid, path, label_crs)
    values = gdf[class_column]
    if pd.api.types.is_numeric_dtype(values):
        v = values.to_numpy(dtype=np.float64)
        named: dict[float, str] = {}
        for a, b in zip(v, gdf[name_column] if name_column is not None else ()):
            if np.isfinite(a):
                named.setdefault(float(a), str(b))
        labels = LabelMap.build(classes, nodata, v if classes is None else (), named)
        index = labels.apply(v, path)
    else:
        if isinstance(classes, dict):
            raise LabelValueError(f"{path}: {class_column!r} holds class names; give classes as a list of names")
        text = values.astype(str).to_numpy()
        names = list(classes) if classes is not None else sorted(set(text))
        bad = sorted(set(text) - set(names))
        if bad:
            raise LabelValueError(f"{path}: {class_column} values {bad[:20]} are not among the classes {names}")
        labels = LabelMap(tuple(float(i) for i in range(len(names))), tuple(names))
        index = np.array([names.index(t) for t in text], dtype=np.int64)
    shapes = [(geom, int(i)) for geom, i in zip(gdf.geometry, index) if geom is not None and not geom.is_empty]
    out = rasterize(shapes, out_shape=grid.shape, transform=grid.transform, fill=IGNORE, dtype="int16")
    return out, labels
