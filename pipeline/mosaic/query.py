"""Similarity search in an embedding archive: cosine similarity of every location to a query point or vector."""

from __future__ import annotations

import json
import logging

import numpy as np
import xarray as xr
from rasterio.warp import transform as transform_coords

from pipeline.mosaic.archive import Archive, open_archive
from pipeline.mosaic.cog import dataarray_to_cog
from pipeline.mosaic.quicklook import colour_ramp, decimate, save_png

log = logging.getLogger(__name__)


def cosine_similarity(emb: xr.DataArray, vector: np.ndarray) -> xr.DataArray:
    """Lazy ``(y, x)`` float32 cosine similarity of every pixel of a ``(band, y, x)`` array to ``vector`` ``(C,)``.

    NaN where the embedding is missing (or zero).
    """
    vector = np.asarray(vector, dtype=np.float64).reshape(-1)
    if vector.shape[0] != emb.sizes["band"]:
        raise ValueError(f"query vector has {vector.shape[0]} values, the embeddings {emb.sizes['band']} channels")
    norm = np.linalg.norm(vector)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("the query vector is zero or not finite")
    q = xr.DataArray((vector / norm).astype(np.float32), dims="band")
    dot = xr.dot(emb, q, dim="band")
    length = np.sqrt(xr.dot(emb, emb, dim="band"))
    sim = (dot / length.where(length > 0)).astype(np.float32)
    sim.attrs = {"long_name": "cosine_similarity"}
    return sim


def vector_at(emb: xr.DataArray, x: float, y: float) -> np.ndarray:
    """The ``(C,)`` embedding of the pixel containing ``(x, y)`` (grid CRS); raises if outside or empty."""
    half_x, half_y = (abs(float(emb[d][1] - emb[d][0])) / 2 if emb.sizes[d] > 1 else np.inf for d in ("x", "y"))
    xs, ys = emb["x"].values, emb["y"].values
    if not (xs.min() - half_x <= x <= xs.max() + half_x and ys.min() - half_y <= y <= ys.max() + half_y):
        raise ValueError(f"query point ({x}, {y}) lies outside the mosaic")
    vec = np.asarray(emb.sel(x=x, y=y, method="nearest").values, dtype=np.float32)
    if not np.isfinite(vec).all():
        raise ValueError(f"no embedding at query point ({x}, {y}) (no data there)")
    return vec


def query_archive(
    archive_url: str,
    out_prefix: str,
    *,
    lonlat: tuple[float, float] | None = None,
    xy: tuple[float, float] | None = None,
    vector: np.ndarray | None = None,
    mosaic: str | None = None,
) -> list[str]:
    """Write cosine-similarity maps (COG ``{prefix}.tif`` + PNG ``{prefix}.png``) for one query.

    Args:
        archive_url: an embedding archive (:mod:`pipeline.mosaic.archive`).
        out_prefix: output path prefix; with several mosaics the files are ``{prefix}_{name}.tif/.png``.
        lonlat: query point in degrees (WGS84); its embedding is taken from the mosaic that contains it.
        xy: query point in the CRS of the mosaic(s).
        vector: query embedding ``(C,)``.
        mosaic: restrict the maps (and the point lookup) to this mosaic (default: all).

    Returns:
        the written file paths.
    """
    if sum(v is not None for v in (lonlat, xy, vector)) != 1:
        raise ValueError("give exactly one of lonlat, xy or vector")
    archive = open_archive(archive_url)
    names = [mosaic] if mosaic else archive.names
    query = None if vector is None else np.asarray(vector, dtype=np.float32)
    point = None
    if query is None:
        query, point = _point_vector(archive, names, lonlat, xy)
    out = []
    for name in names:
        emb = archive.embeddings(name)
        sim = cosine_similarity(emb, query).rio.write_crs(emb.rio.crs).rio.write_transform(emb.rio.transform())
        prefix = out_prefix if len(names) == 1 else f"{out_prefix}_{name}"
        tags = {"query": json.dumps({"lonlat": lonlat, "xy": xy, "point": point, "mosaic": name}),
                "provenance": json.dumps(archive.provenance)}  # fmt: skip
        tif = dataarray_to_cog(sim, f"{prefix}.tif", descriptions=["cosine_similarity"], tags=tags)
        # PNG from the written COG's decimated pixels: the similarity is computed once
        png = save_png(colour_ramp(_decimated_band(tif)), f"{prefix}.png")
        out += [tif, png]
        log.info("similarity map of %s: %s, %s", name, tif, png)
    return out


def _decimated_band(tif: str, max_size: int = 1024) -> np.ndarray:
    import rioxarray

    arr = rioxarray.open_rasterio(tif, masked=True, chunks={"y": 512, "x": 512})
    return decimate(arr.isel(band=0), max_size).values


def _point_vector(
    archive: Archive, names: list[str], lonlat: tuple[float, float] | None, xy: tuple[float, float] | None
) -> tuple[np.ndarray, list[float]]:
    """The embedding at a query point and the point in its mosaic's CRS."""
    problems = []
    for name in names:
        emb = archive.embeddings(name)
        if lonlat is not None:
            xs, ys = transform_coords("EPSG:4326", emb.rio.crs, [lonlat[0]], [lonlat[1]])
            x, y = xs[0], ys[0]
        else:
            x, y = xy
        try:
            return vector_at(emb, x, y), [x, y]
        except ValueError as err:
            problems.append(f"{name}: {err}")
    where = f"lon/lat {lonlat}" if lonlat is not None else f"x/y {xy}"
    raise ValueError(f"no embedding for query point {where} in {archive.url} ({'; '.join(problems)})")
