"""Mosaic quality metrics."""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import xarray as xr


def _border_pairs(origins: np.ndarray, tile_size: int, length: int, axis: int, zones: bool) -> np.ndarray:
    """``(length - 1,)`` bool: pair ``(p - 1, p)`` is a border pair along ``axis``.

    Border pairs straddle a tile edge; with ``zones`` also every pair inside an overlap zone (pixels covered by more
    than one tile along this axis), where blending moves from one tile to the next.
    """
    starts = origins[:, axis]
    edges = np.concatenate([starts, starts + tile_size])
    border = np.zeros(length - 1, dtype=bool)
    border[np.unique(edges[(edges > 0) & (edges < length)]) - 1] = True
    if zones:
        cover = np.zeros(length, dtype=int)
        for s in np.unique(starts):
            cover[max(s, 0) : max(min(s + tile_size, length), 0)] += 1
        shared = cover > 1
        border |= shared[1:] & shared[:-1]
    return border


def seam_score(mosaic: Any, tile_origins: np.ndarray, tile_size: int, *, zones: bool = False) -> float:
    """How much stronger the jumps across tile borders are than between neighbours inside tiles.

    The score is ``mean |x[p] - x[p - 1]|`` over neighbouring pixel pairs that straddle a tile edge (rows and
    columns where some tile starts or ends), divided by the same mean over all other neighbouring pairs, averaged
    over bands and ignoring NaN. A seamless mosaic of a natural image or a smooth field scores about 1; visible
    seams (per-tile offsets, edge artefacts of a CNN/ViT) push it well above 1.

    Blending with a margin moves a seam off the tile edges into the overlap zone, as a ramp; ``zones=True`` counts
    every pair inside an overlap zone as a border pair, which catches such ramps. A model's own periodic structure
    (window borders of a Swin stage on an aligned grid) also raises the score: compare with the same score of an
    untiled run when there is one.

    Args:
        mosaic: ``(H, W)`` or ``(C, H, W)`` numpy / Dask / xarray array (Dask inputs are reduced lazily).
        tile_origins: ``(N, 2)`` (row, col) of each tile's top-left pixel on the mosaic grid.
        tile_size: tile side in pixels.
        zones: count whole overlap zones as borders (see above), not only the tile edge lines.

    Returns:
        the border/interior ratio (NaN if either set of pairs is empty).
    """
    x = mosaic.data if isinstance(mosaic, xr.DataArray) else mosaic  # keep Dask arrays lazy
    if x.ndim == 2:
        x = x[None]
    origins = np.asarray(tile_origins).reshape(-1, 2)
    sums = {"border": 0.0, "inside": 0.0}
    counts = {"border": 0.0, "inside": 0.0}
    for axis in (1, 2):  # rows (y), then columns (x)
        n = x.shape[axis]
        diff = abs(x[(slice(None),) * axis + (slice(1, None),)] - x[(slice(None),) * axis + (slice(None, -1),)])
        border = _border_pairs(origins, tile_size, n, axis - 1, zones)  # pair (p-1, p) is diff index p-1
        shape = [1, 1, 1]
        shape[axis] = n - 1
        for name, sel in (("border", border), ("inside", ~border)):
            d = diff * sel.reshape(shape)
            finite = ~np.isnan(diff) & sel.reshape(shape)
            sums[name] += np.nansum(np.where(finite, d, 0.0))
            counts[name] += finite.sum()
    (sums, counts) = dask.compute(sums, counts)  # one pass over a Dask-backed mosaic; no-op for numpy
    b, i = (float(sums[k]) / float(counts[k]) if counts[k] else np.nan for k in ("border", "inside"))
    return b / i if i else np.nan
