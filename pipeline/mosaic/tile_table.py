"""An archive's ``tiles.parquet``: one GeoParquet row per done tile with its pooled vector and provenance."""

from __future__ import annotations

import json
from typing import Any

import fsspec
import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyproj
import shapely

DESCRIBE = ("model", "code_version", "checkpoint", "checkpoint_sha256", "preprocessing")
"""The provenance fields every table row repeats."""


def canonical(value: Any) -> str:
    """``value`` as sorted-key JSON: equal settings give equal strings."""
    return json.dumps(value, sort_keys=True)


def tile_table(store: Any, mosaic_name: str, table_crs: str | None) -> pa.Table:
    """GeoParquet-ready Arrow table of the done tiles' pooled vectors (geometry as WKB in ``table_crs``)."""
    done = store.done
    prov = store.provenance
    vectors = np.asarray(store.group["pooled"][:], dtype=np.float32)[done]  # (M, C)
    bounds = np.array([store.footprint_bounds(i) for i in done.tolist()]).reshape(-1, 4)
    geoms = shapely.box(bounds[:, 0], bounds[:, 1], bounds[:, 2], bounds[:, 3])
    grid_crs = pyproj.CRS.from_user_input(store.crs)
    if table_crs is not None and not grid_crs.equals(pyproj.CRS.from_user_input(table_crs)):
        geoms = gpd.GeoSeries(geoms, crs=grid_crs).to_crs(table_crs).values  # one table, one CRS
    start, end = [*(prov.get("time") or []), None, None][:2]
    n = len(done)
    cols = {
        "tile_id": done,
        "mosaic": [mosaic_name] * n,
        "row": store.origins[done, 0],
        "col": store.origins[done, 1],
        "time_start": [start] * n,
        "time_end": [end] * n,
        **{k: [None if prov.get(k) is None else str(prov.get(k))] * n for k in DESCRIBE[:-1]},
        "preprocessing": [canonical(prov.get("preprocessing"))] * n,
        "grid_crs": [grid_crs.to_string()] * n,
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
        "geometry": pa.array(shapely.to_wkb(geoms), pa.binary()),
    }
    return pa.table({k: v if isinstance(v, pa.Array) else pa.array(v, type=_col_type(k)) for k, v in cols.items()})


def _col_type(name: str) -> pa.DataType:
    return pa.int64() if name in ("tile_id", "row", "col") else pa.string()


def _geo_metadata(table: pa.Table, crs: str) -> dict[bytes, bytes]:
    geoms = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
    col = {
        "encoding": "WKB",
        "geometry_types": sorted({g.geom_type for g in geoms}) if len(geoms) else [],
        "crs": pyproj.CRS.from_user_input(crs).to_json_dict(),
        "bbox": [float(v) for v in shapely.total_bounds(geoms)] if len(geoms) else [],
    }
    meta = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": col}}
    return {b"geo": json.dumps(meta).encode()}


def write_table(url: str, table: pa.Table, crs: str) -> None:
    """Write ``table`` as GeoParquet at ``url``, atomically (readers never see half a table)."""
    table = table.replace_schema_metadata(_geo_metadata(table, crs))
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path + ".tmp", "wb") as f:
        pq.write_table(table, f, compression="zstd")
    fs.mv(path + ".tmp", path)  # readers never see half a table


def read_table(url: str) -> pa.Table:
    """The Arrow table of a tile table file."""
    with fsspec.open(url, "rb") as f:
        return pq.read_table(f)
