"""Overlap blending weights for stitching tiles into a mosaic.

Each tile's pixels are weighted by a separable cosine taper: flat (1) in the tile centre, falling over ``overlap``
pixels at every inner edge, optionally to exactly zero over the outermost ``margin`` pixels, where a model's
outputs suffer from the tile edge. Two tiles that overlap by exactly ``overlap`` pixels have tapers that sum to one
across the overlap (``sin^2 t + cos^2 t = 1``), and for any other arrangement the mosaic divides by the accumulated
weight, so the weights of all tiles covering a pixel always sum to one. Sides on the grid edge have no neighbour and
are not tapered; without a margin the taper never reaches zero either.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def taper_1d(size: int, overlap: int, margin: int = 0, open_start: bool = False, open_end: bool = False) -> np.ndarray:
    """Weight profile of one tile side: ``margin`` zeros, a cosine ramp, then flat, at both ends.

    Args:
        size: tile side length in pixels.
        overlap: pixels shared with the neighbouring tile; clamped to ``size // 2``. ``0`` gives all ones.
        margin: pixels at each inner edge given zero weight (edge effects of the model); clamped to
            ``overlap // 2``. The ramp spans the ``overlap - 2 * margin`` pixels in between.
        open_start: the start of this side lies on the grid edge: no neighbour there, so no taper (all ones).
        open_end: the same for the end.

    Returns:
        ``(size,)`` float64 weights in ``[0, 1]``; for a pixel ``d`` pixels from a tapered end,
        ``w[d] = sin^2(pi/2 * (d - margin + 0.5) / (overlap - 2 margin))`` on the ramp, so
        ``w[d] + w[overlap - 1 - d] == 1``. Without margin the weights never reach zero.
    """
    overlap = min(int(overlap), size // 2)
    margin = min(int(margin), overlap // 2)
    w = np.ones(size, dtype=np.float64)
    if overlap <= 0:
        return w
    ramp_len = overlap - 2 * margin
    idx = np.arange(size)
    for d, is_open in ((idx, open_start), (idx[::-1], open_end)):  # distance from the start / from the end
        if is_open:
            continue
        part = np.ones(size)
        part[d < margin] = 0.0
        on_ramp = (d >= margin) & (d < overlap - margin)
        part[on_ramp] = np.sin(0.5 * np.pi * (d[on_ramp] - margin + 0.5) / ramp_len) ** 2
        w = np.minimum(w, part)
    return w


@lru_cache(maxsize=64)
def tile_weights(
    tile_size: int, overlap: int, margin: int = 0, open_sides: tuple[bool, bool, bool, bool] = (False,) * 4
) -> np.ndarray:
    """Separable 2-D taper of one tile: ``(S, S)`` float64 (read-only, shared through a cache).

    Args:
        tile_size: tile side ``S``.
        overlap: taper width (see :func:`taper_1d`).
        margin: zero-weight band at inner edges.
        open_sides: ``(top, bottom, left, right)``: which sides lie on the grid edge (no taper there).
    """
    top, bottom, left, right = open_sides
    out = np.outer(taper_1d(tile_size, overlap, margin, top, bottom), taper_1d(tile_size, overlap, margin, left, right))
    out.flags.writeable = False
    return out


def open_sides(origin: tuple[int, int], tile_size: int, shape: tuple[int, int]) -> tuple[bool, bool, bool, bool]:
    """``(top, bottom, left, right)``: which sides of a tile reach or cross the edge of a ``shape`` grid."""
    r, c = (int(v) for v in origin)
    return r <= 0, r + tile_size >= shape[0], c <= 0, c + tile_size >= shape[1]


def clip_window(origin: tuple[int, int], tile_size: int, window: tuple[slice, slice]) -> tuple[slice, ...] | None:
    """Intersection of a tile with a window of the output grid.

    Args:
        origin: ``(row, col)`` of the tile's top-left pixel on the output grid.
        tile_size: tile side ``S``.
        window: ``(rows, cols)`` slices (with explicit start/stop) of the output grid.

    Returns:
        ``(tile_rows, tile_cols, win_rows, win_cols)``: slices into the ``(S, S)`` tile and into the window array,
        or ``None`` if they do not intersect.
    """
    out = []
    for o, win in zip(origin, window):
        lo, hi = max(int(o), win.start), min(int(o) + tile_size, win.stop)
        if lo >= hi:
            return None
        out.append((slice(lo - o, hi - o), slice(lo - win.start, hi - win.start)))
    (tr, wr), (tc, wc) = out
    return tr, tc, wr, wc


def accumulate(
    acc_CHW: np.ndarray,
    wsum_HW: np.ndarray,
    values_Chw: np.ndarray | None,
    weight_hw: np.ndarray,
    valid_hw: np.ndarray,
    dst: tuple[slice, slice],
) -> None:
    """Add the part of one tile that falls in a window into the window's running sums, in place.

    The caller crops the tile with :func:`clip_window` first, so only that part is ever read from storage.

    Args:
        acc_CHW: ``(C, H, W)`` float64 weighted sum of the window (untouched if ``values_Chw`` is ``None``).
        wsum_HW: ``(H, W)`` float64 accumulated weight of the window.
        values_Chw: ``(C, h, w)`` tile values of the cropped part, or ``None`` to accumulate weights only.
        weight_hw: ``(h, w)`` blending weights of the cropped part (from :func:`tile_weights`).
        valid_hw: ``(h, w)`` mask; pixels where it is 0 get zero weight (their values are ignored, even NaN).
        dst: ``(rows, cols)`` slices of the window that the cropped part covers.
    """
    w = weight_hw * (valid_hw > 0)
    if values_Chw is not None:
        acc_CHW[(slice(None), *dst)] += np.where(w > 0, values_Chw, 0.0) * w
    wsum_HW[dst] += w


def normalise(acc_CHW: np.ndarray, wsum_HW: np.ndarray) -> np.ndarray:
    """Weighted mean ``acc / wsum``: ``(C, h, w)`` float32, NaN where no tile had weight."""
    with np.errstate(invalid="ignore", divide="ignore"):
        out = acc_CHW / wsum_HW[None]
    out[:, wsum_HW <= 0] = np.nan
    return out.astype(np.float32)


def normalised_weights(
    origins: np.ndarray,
    tile_size: int,
    overlap: int,
    shape: tuple[int, int],
    *,
    blend: bool = True,
    margin: int = 0,
) -> np.ndarray:
    """Per-tile normalised weights on a whole (small) grid; for tests and diagnostics.

    Args:
        origins: ``(N, 2)`` tile ``(row, col)`` origins.
        tile_size: tile side ``S``.
        overlap: taper width (ignored if ``blend`` is false: flat weights, a plain average).
        shape: ``(H, W)`` of the output grid.
        blend: taper (default) or flat weights.
        margin: zero-weight band at inner tile edges.

    Returns:
        ``(N, H, W)`` float64; sums to one over tiles wherever any tile covers, zero elsewhere.
    """
    window = (slice(0, shape[0]), slice(0, shape[1]))
    per_tile = np.zeros((len(origins), *shape))
    for i, origin in enumerate(origins):
        weight = tile_weights(tile_size, overlap if blend else 0, margin, open_sides(origin, tile_size, shape))
        sl = clip_window(tuple(origin), tile_size, window)
        if sl is not None:
            tr, tc, wr, wc = sl
            accumulate(per_tile, per_tile[i], None, weight[tr, tc], np.ones_like(weight[tr, tc]), (wr, wc))
    total = per_tile.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, per_tile / total, 0.0)
