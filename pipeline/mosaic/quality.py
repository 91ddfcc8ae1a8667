"""Mosaic quality metrics."""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import xarray as xr


def _border_lines(origins: np.ndarray, tile_size: int, length: int, axis: int) -> np.ndarray:
    """Positions ``p`` (``1 <= p < length``) where a tile edge lies between pixel ``p - 1`` and ``p``."""
    starts = origins[:, axis]
    edges = np.concatenate([starts, starts + tile_size])
    return np.unique(edges[(edges > 0) & (edges < length)])


def seam_score(mosaic: Any, tile_origins: np.ndarray, tile_size: int) -> float:
    """How much stronger the jumps across tile borders are than between neighbours inside tiles.

    The score is ``mean |x[p] - x[p - 1]|`` over neighbouring pixel pairs that straddle a tile edge (rows and
    columns where some tile starts or ends), divided by the same mean over all other neighbouring pairs, averaged
    over bands and ignoring NaN. A seamless mosaic of a natural image or a smooth field scores about 1; visible
    seams (per-tile offsets, edge artefacts of a CNN/ViT) push it well above 1.

    Args:
        mosaic: ``(H, W)`` or ``(C, H, W)`` numpy / Dask / xarray array (Dask inputs are reduced lazily).
        tile_origins: ``(N, 2)`` (row, col) of each tile's top-left pixel on the mosaic grid.
        tile_size: tile side in pixels.

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
        border = np.zeros(n - 1, dtype=bool)
        border[_border_lines(origins, tile_size, n, axis - 1) - 1] = True  # pair (p-1, p) is diff index p-1
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
