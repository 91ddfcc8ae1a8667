"""Polygons of a class map, polygonised block by block through Dask, with the pieces cut by block borders dissolved.

``polygons.parquet`` (:func:`write_polygons`): GeoParquet, one row per polygon (a 4-connected region of one class),
in the mosaic's CRS::

    class, class_id      class name and index
    area_m2              the polygon's area (its pixels x the pixel area)
    job, kind, model, code_version, checkpoint, checkpoint_sha256, time_start, time_end   provenance
    geometry             Polygon (holes where other classes or no data are enclosed)

How: every block of the ``(y, x)`` uint8 class map is polygonised on its own with ``rasterio.features.shapes``
(4-connectivity, no-data 255 masked out, so it gets no polygons) in a Dask task, in *pixel* coordinates: vertices
are integers, so the edges that two neighbouring blocks share have bit-identical coordinates on both sides. A
polygon that does not reach an inner block border is final. The others (cut pieces) are dissolved: pieces of one
class whose boundaries share a segment (not just a corner point: that would be 8-connectivity) are linked, and each
connected group is unioned with shapely. The result is the polygonisation of the whole map at once (tests compare
them on a real map of several blocks), while no task sees more than one block. Finally the geometries are mapped to
the grid CRS with the grid transform.

Memory: the class map is read one batch of blocks at a time; what is held is the polygons themselves (the cut
pieces until they are dissolved). A noisy map of a large region can have millions of one-pixel polygons:
``min_area_m2`` drops polygons smaller than that (the default 0 keeps everything).
"""

from __future__ import annotations

import logging
from typing import Any

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from affine import Affine
from rasterio.features import shapes
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.mosaic.areas import pixel_area_m2
from pipeline.mosaic.stitch import open_mosaic
from pipeline.mosaic.tables import provenance_columns, write_geoparquet
from pipeline.palette import CLASS_NODATA

log = logging.getLogger(__name__)

POLYGONS = "polygons.parquet"
_BATCH_PIXELS = 64 * 2**20  # class-map pixels per batch of block tasks
_EMPTY = (np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=object), np.zeros(0, dtype=bool))


def _block_pieces(
    block: np.ndarray, origin: tuple[int, int], shape: tuple[int, int], nodata: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Polygons of one ``(h, w)`` block in pixel coordinates of the whole map, as ``(col, -row)``.

    (Rows are negated so that no block, not even the one at the origin, is polygonised with the identity transform,
    which rasterio warns about; a thread-safe way to silence it does not exist.)

    Returns:
        ``(class ids (n,) uint8, polygons (n,) object, cut (n,) bool)``; ``cut`` marks polygons that reach a block
        border inside the map (they may continue in the neighbouring block).
    """
    mask = block != nodata
    if not mask.any():
        return _EMPTY
    r0, c0 = origin
    (h, w), (height, width) = block.shape, shape
    found = shapes(np.ascontiguousarray(block, dtype=np.uint8), mask=mask, connectivity=4,
                   transform=Affine(1, 0, c0, 0, -1, -r0))  # fmt: skip
    ids, geoms = zip(*((v, shapely.geometry.shape(g)) for g, v in found))
    ids, geoms = np.array(ids, dtype=np.uint8), np.array(geoms, dtype=object)
    left, bottom, right, top = shapely.bounds(geoms).T
    cut = (
        ((left <= c0) & (c0 > 0)) | ((right >= c0 + w) & (c0 + w < width))
        | ((top >= -r0) & (r0 > 0)) | ((bottom <= -(r0 + h)) & (r0 + h < height))
    )  # fmt: skip
    return ids, geoms, cut


def dissolve_cut_pieces(ids: np.ndarray, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union the pieces of one class that share a boundary segment (regions cut apart by block borders).

    Args:
        ids: ``(n,)`` class of each piece.
        geoms: ``(n,)`` polygons with exactly shared edges (pixel coordinates) and disjoint interiors.

    Returns:
        ``(class ids, polygons)`` of the dissolved regions.
    """
    n = len(geoms)
    if n == 0:
        return ids, geoms
    left, right = shapely.STRtree(geoms).query(geoms, predicate="touches")
    pair = (left < right) & (ids[left] == ids[right])
    left, right = left[pair], right[pair]
    edge = shapely.relate_pattern(geoms[left], geoms[right], "F***1****")  # boundaries meet along a segment
    left, right = left[edge], right[edge]
    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(n, n))
    n_groups, group = connected_components(graph, directed=False)
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(group[order]) != 0])
    members = np.split(order, starts[1:])
    merged = [geoms[m[0]] if len(m) == 1 else shapely.union_all(geoms[m]) for m in members]
    out_ids, out_geoms = [], []
    for m, geom in zip(members, merged):
        parts = shapely.get_parts(geom)  # one Polygon; parts only if GEOS ever returned a MultiPolygon
        out_ids.extend([ids[m[0]]] * len(parts))
        out_geoms.extend(parts)
    log.debug("dissolved %d cut pieces into %d polygons (%d groups)", n, len(out_geoms), n_groups)
    return np.array(out_ids, dtype=np.uint8), np.array(out_geoms, dtype=object)


def polygonize(
    classes: da.Array | np.ndarray, transform: Affine, *, nodata: int = CLASS_NODATA, block: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Polygons of a ``(y, x)`` uint8 class map, block by block (see the module docstring).

    Args:
        classes: the class map; Dask arrays are polygonised per chunk, NumPy arrays are wrapped in one.
        transform: the grid's affine transform (pixel -> CRS).
        nodata: class value without polygons.
        block: block side in pixels (default: the array's chunks).

    Returns:
        ``(class ids (n,) uint8, polygons (n,) in CRS coordinates, pixel counts (n,) float64)``, sorted by class,
        then top to bottom, left to right.
    """
    arr = da.asarray(classes)
    if block is not None:
        arr = arr.rechunk((block, block))
    starts = [np.cumsum((0, *c))[:-1] for c in arr.chunks]
    delayed = arr.to_delayed()
    task = dask.delayed(_block_pieces, pure=True)
    tasks = [task(delayed[i, j], (int(starts[0][i]), int(starts[1][j])), arr.shape, nodata)
             for i, j in np.ndindex(*arr.numblocks)]  # fmt: skip
    per_batch = max(1, _BATCH_PIXELS // (max(arr.chunks[0]) * max(arr.chunks[1])))
    final: list[tuple[np.ndarray, np.ndarray]] = []
    cut: list[tuple[np.ndarray, np.ndarray]] = []
    for b in range(0, len(tasks), per_batch):
        for ids, geoms, is_cut in dask.compute(*tasks[b : b + per_batch]):
            final.append((ids[~is_cut], geoms[~is_cut]))
            cut.append((ids[is_cut], geoms[is_cut]))
    cut_ids, cut_geoms = (np.concatenate(x) for x in zip(*cut, _EMPTY[:2]))
    final.append(dissolve_cut_pieces(cut_ids, cut_geoms))
    ids, geoms = (np.concatenate(x) for x in zip(*final, _EMPTY[:2]))
    pixels = shapely.area(geoms)
    bounds = shapely.bounds(geoms).reshape(-1, 4)
    order = np.lexsort((bounds[:, 0], -bounds[:, 3], ids))  # class, top row, left column
    t = transform
    coeffs = np.array([[t.a, t.d], [-t.b, -t.e]])  # (col, -row) @ coeffs + (c, f) = t * (col, row)
    world = shapely.transform(geoms[order], lambda xy: xy @ coeffs + np.array([t.c, t.f]))
    return ids[order], world, pixels[order]


def class_polygons(
    mosaic_url: str, *, min_area_m2: float = 0.0, block: int | None = None, job: str | None = None
) -> gpd.GeoDataFrame:
    """The polygons of a class mosaic's ``classes`` map as a GeoDataFrame (columns in the module docstring).

    Args:
        mosaic_url: a mosaic whose attributes say ``product == "classes"``.
        min_area_m2: drop polygons smaller than this; the default 0 keeps every polygon, down to single pixels.
        block: block side of the polygonisation (default: the mosaic's chunks).
        job: job name for the provenance columns.

    Raises:
        ValueError: the mosaic is not a class product.
    """
    ds = open_mosaic(mosaic_url)
    if ds.attrs.get("product") != "classes" or "classes" not in ds:
        raise ValueError(f"{mosaic_url} is not a class mosaic (product {ds.attrs.get('product')!r}): no polygons")
    grid = ds.attrs["grid"]
    transform, crs = Affine(*grid["transform"][:6]), grid["crs"]
    names = list(ds.attrs.get("class_names") or [str(b) for b in ds["band"].values])
    ids, geoms, pixels = polygonize(ds["classes"].data, transform, block=block)
    area = pixels * pixel_area_m2(crs, transform)
    keep = area >= min_area_m2
    ids, geoms, area = ids[keep], geoms[keep], area[keep]
    columns: dict[str, Any] = {
        "class": [names[i] if i < len(names) else f"class_{i}" for i in ids.tolist()],
        "class_id": ids.astype(np.int32),
        "area_m2": area,
        **provenance_columns(ds.attrs.get("provenance") or {}, kind=str(ds.attrs.get("kind")), job=job),
    }
    frame = pd.DataFrame(columns, index=pd.RangeIndex(len(ids)))
    return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(geoms, crs=crs, index=frame.index), crs=crs)


def write_polygons(
    mosaic_url: str, out_url: str, *, min_area_m2: float = 0.0, block: int | None = None, job: str | None = None
) -> tuple[str, int]:
    """Write :func:`class_polygons` of a class mosaic as GeoParquet at ``out_url`` (one atomic write).

    Returns:
        ``out_url`` and the number of polygons.
    """
    table = class_polygons(mosaic_url, min_area_m2=min_area_m2, block=block, job=job)
    write_geoparquet(table, out_url)
    log.info("wrote %d class polygons to %s", len(table), out_url)
    return out_url, len(table)
