"""Dask stitching of a tile store into a seamless, georeferenced Zarr v3 mosaic.

The mosaic is a lazy Dask array chunked by output blocks: every block task knows only the (few) done tiles that
intersect it, reads just their overlapping parts from the tile store, and returns ``sum(w * x) / sum(w)`` with the
blending weights of :mod:`pipeline.mosaic.blend`; nothing of the size of the whole mosaic is ever materialised.

Mosaic layout (``mosaic.zarr``, opens with ``xr.open_zarr(url, decode_coords="all")``)::

    data     (band, y, x) float32   blended model output; ``band`` coordinate = the tile store's channel names;
                                    NaN where no done tile has a valid pixel
    valid    (y, x) uint8           1 where at least one done tile covered the pixel
    classes  (y, x) uint8           class products only (``product == "classes"`` in the tile store: segmentation,
                                    change): argmax over ``band`` (255 = no data)
    x, y                            pixel-centre coordinates in the grid CRS (from the grid transform)
    spatial_ref                     CRS (``rio.write_crs``) and GeoTransform
    attrs                           kind, product, channels, class_names, class_colors, tile_size, overlap, margin,
                                    context_radius, blend, grid, provenance, tiles_url, n_tiles

What the channels mean comes from the tile store's ``product`` attribute, never from the kind's name.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from pipeline.infer.store import TileStore, open_tile_store
from pipeline.mosaic.blend import accumulate, clip_window, normalise, open_sides, tile_weights
from pipeline.palette import CLASS_NODATA
from pipeline.storage import store_path

log = logging.getLogger(__name__)

MOSAIC_VAR = "data"
_BLOCK_BYTES = 32 * 2**20  # float64 accumulator budget of one block task: what bounds the stage's memory
_MIN_SIDE = 128  # blocks are not made smaller than this; beyond it the bands are split


def block_side(n_bands: int, chunks: int) -> int:
    """The block side for ``n_bands``: ``chunks``, halved while a block's accumulator exceeds the budget.

    All bands of a pixel stay in one block (and one Zarr chunk) down to :data:`_MIN_SIDE`: a 128-channel embedding
    gets 128 px blocks (8 MB float32 Zarr chunks), a class map keeps 512 px. Peak memory of the stage is then
    (threads x one block task) whatever the area (``benchmarks/bench_scale.py``).
    """
    side = chunks
    while side > _MIN_SIDE and 8 * n_bands * side * side > _BLOCK_BYTES:
        side //= 2
    return side


def _tiles_by_block(
    store: TileStore, ychunks: tuple[int, ...], xchunks: tuple[int, ...]
) -> dict[tuple[int, int], list[tuple[int, int, int]]]:
    """``{(block row, block col): [(tile index, row, col), ...]}`` for the done tiles intersecting each block."""
    ybounds, xbounds = np.cumsum((0, *ychunks)), np.cumsum((0, *xchunks))
    out: dict[tuple[int, int], list[tuple[int, int, int]]] = defaultdict(list)
    s = store.tile_size
    for index in store.done.tolist():
        r, c = (int(v) for v in store.origins[index])
        # blocks i with ybounds[i] < r + s and ybounds[i + 1] > r
        i0, i1 = np.searchsorted(ybounds, r, "right") - 1, np.searchsorted(ybounds, r + s, "left")
        j0, j1 = np.searchsorted(xbounds, c, "right") - 1, np.searchsorted(xbounds, c + s, "left")
        for i in range(max(i0, 0), min(i1, len(ychunks))):
            for j in range(max(j0, 0), min(j1, len(xchunks))):
                out[i, j].append((index, r, c))
    return out


def _blend_block(data, valid, taper: tuple, tiles, bands: slice, window: tuple[slice, slice]) -> np.ndarray:
    """``(b, h, w)`` float32 blended values of one output block (NaN where uncovered).

    ``taper`` is ``(tile_size, overlap, margin, grid shape)``; ``tiles`` is ``(k, 3)`` ``(index, row, col)``.
    """
    h, w = (s.stop - s.start for s in window)
    size, overlap, margin, shape = taper
    acc = np.zeros((bands.stop - bands.start, h, w))
    wsum = np.zeros((h, w))
    for index, r, c in tiles.tolist():
        weight = tile_weights(size, overlap, margin, open_sides((r, c), size, shape))
        sl = clip_window((r, c), size, window)
        if sl is None:
            continue
        tr, tc, wr, wc = sl
        values = data[index, bands, tr, tc].astype(np.float64)  # only the part inside this block
        accumulate(acc, wsum, values, weight[tr, tc], valid[index, tr, tc], (wr, wc))
    return normalise(acc, wsum)


def _valid_block(valid, tiles, window: tuple[slice, slice]) -> np.ndarray:
    """``(h, w)`` uint8: 1 where any of ``tiles`` has a valid pixel."""
    h, w = (s.stop - s.start for s in window)
    wsum = np.zeros((h, w))
    for index, r, c in tiles.tolist():
        sl = clip_window((r, c), valid.shape[1], window)
        if sl is not None:
            tr, tc, wr, wc = sl
            mask = valid[index, tr, tc]
            accumulate(wsum, wsum, None, np.ones(mask.shape), mask, (wr, wc))
    return (wsum > 0).astype(np.uint8)


def _graph_array(name, func, chunks, dtype, per_block) -> da.Array:
    """A Dask array whose block ``key`` is ``func(*per_block(key, window))``; one small task per output block."""
    dsk = {}
    starts = [np.cumsum((0, *c))[:-1] for c in chunks]
    for key in np.ndindex(*(len(c) for c in chunks)):
        window = tuple(slice(int(starts[d][k]), int(starts[d][k] + chunks[d][k])) for d, k in enumerate(key))
        dsk[(name, *key)] = (func, *per_block(key, window))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return da.Array(graph, name, chunks=chunks, meta=np.empty((0,) * len(chunks), dtype=dtype))


def class_map(values: da.Array) -> da.Array:
    """``(y, x)`` uint8 argmax over bands of a ``(band, y, x)`` array; 255 where all bands are NaN.

    A single-band output is read as a probability of the positive class and thresholded at 0.5.
    """
    if values.shape[0] > CLASS_NODATA:
        raise ValueError(f"{values.shape[0]} classes do not fit a uint8 class map")

    def _argmax(v: np.ndarray) -> np.ndarray:
        nodata = np.isnan(v).all(axis=0)
        if v.shape[0] == 1:
            cls = (v[0] >= 0.5).astype(np.uint8)
        else:
            cls = np.argmax(np.where(np.isnan(v), -np.inf, v), axis=0).astype(np.uint8)
        cls[nodata] = CLASS_NODATA
        return cls

    return values.rechunk({0: -1}).map_blocks(_argmax, drop_axis=0, dtype=np.uint8)


def mosaic_dataset(store: TileStore, chunks: int = 512, *, blend: bool = True) -> xr.Dataset:
    """The lazy mosaic of ``store`` as an ``xr.Dataset`` (see the module docstring for the layout)."""
    height, width = store.shape
    n_bands = len(store.channels)
    side = block_side(n_bands, chunks)
    ychunks = da.core.normalize_chunks(side, (height,))[0]
    xchunks = da.core.normalize_chunks(side, (width,))[0]
    band_chunk = max(1, min(n_bands, _BLOCK_BYTES // (8 * max(ychunks) * max(xchunks))))
    bchunks = da.core.normalize_chunks(band_chunk, (n_bands,))[0]
    bstarts = np.cumsum((0, *bchunks))

    data, valid = store.group["data"], store.group["valid"]
    taper = (store.tile_size, store.overlap if blend else 0, store.margin if blend else 0, (height, width))
    by_block = _tiles_by_block(store, ychunks, xchunks)

    def blocks(key) -> np.ndarray:  # (k, 3) (index, row, col)
        return np.array(by_block.get(key, []), dtype=np.int64).reshape(-1, 3)

    token = tokenize(store.url, chunks, blend, store.done.tolist(), store.origins.tolist())

    def values_args(key, window):
        b = slice(int(bstarts[key[0]]), int(bstarts[key[0] + 1]))
        return data, valid, taper, blocks(key[1:]), b, window[1:]

    values = _graph_array(f"mosaic-{token}", _blend_block, (bchunks, ychunks, xchunks), np.float32, values_args)
    mask = _graph_array(
        f"mosaic-valid-{token}", _valid_block, (ychunks, xchunks), np.uint8,
        lambda key, window: (valid, blocks(key), window),
    )  # fmt: skip

    t = store.transform
    coords = {
        "band": np.array(store.channels, dtype=object),
        "y": t.f + t.e * (np.arange(height) + 0.5),
        "x": t.c + t.a * (np.arange(width) + 0.5),
    }
    variables = {
        MOSAIC_VAR: (("band", "y", "x"), values, {"long_name": store.kind}),
        "valid": (("y", "x"), mask, {"long_name": "valid", "flag_values": [0, 1]}),
    }
    if store.product == "classes":
        variables["classes"] = (("y", "x"), class_map(values), {"long_name": "classes", "nodata": CLASS_NODATA})
    ds = xr.Dataset(variables, coords=coords)
    ds.attrs = {
        "kind": store.kind,
        "product": store.product,
        "channels": store.channels,
        **({"class_names": store.class_names, "class_colors": store.class_colors} if store.class_names else {}),
        "tile_size": store.tile_size,
        "overlap": store.overlap,
        "margin": store.margin,
        "context_radius": store.context_radius,
        "blend": blend,
        "grid": {"crs": store.crs, "transform": list(t)[:6], "height": height, "width": width},
        "provenance": store.provenance,
        "tiles_url": store.url,
        "n_tiles": {"total": len(store.origins), "done": len(store.done)},
    }
    ds = ds.rio.write_crs(store.crs)
    return ds.rio.write_transform(t)


def stitch_tiles(tiles_url: str, out_url: str, chunks: int = 512, *, blend: bool = True) -> str:
    """Stitch the done tiles of ``tiles_url`` into a Zarr v3 mosaic at ``out_url``.

    Args:
        tiles_url: the inference stage's ``tiles.zarr`` (local path or fsspec URL).
        out_url: where to write ``mosaic.zarr`` (overwritten).
        chunks: largest output block side in pixels, also the mosaic's Zarr chunk size in ``y`` and ``x``; outputs
            with many channels get smaller blocks (:func:`block_side`).
        blend: cosine-taper blending (default); ``False`` gives flat weights, i.e. a plain average of overlaps.

    Returns:
        ``out_url``.
    """
    store = open_tile_store(tiles_url)
    ds = mosaic_dataset(store, chunks, blend=blend)
    log.info(
        "stitching %d/%d tiles of %s into a %s mosaic %s",
        len(store.done), len(store.origins), tiles_url, "x".join(map(str, ds[MOSAIC_VAR].shape)), out_url,
    )  # fmt: skip
    ds.to_zarr(store_path(out_url), zarr_format=3, consolidated=False, mode="w")
    return out_url


def open_mosaic(mosaic_url: str) -> xr.Dataset:
    """Open a mosaic lazily with its CRS (``decode_coords="all"``)."""
    return xr.open_zarr(store_path(mosaic_url), decode_coords="all", consolidated=False)
