"""Partition of the cube's 10 m grid into overlapping inference tiles.

Tiles are ``size`` x ``size`` pixels of the 10 m output grid and step by ``size - overlap``. The last row and column
of tiles are shifted inward so that they end at the grid edge (they overlap their neighbour by more than
``overlap``). With ``align`` > 1 every tile origin is a multiple of ``align`` (the model's attention window), so all
tiles share one window grid and agree wherever they overlap; the last tile is then shifted inward only to the next
aligned position and may stick out by up to ``align - 1`` pixels. The reader pads what sticks out with nodata, as
for a grid smaller than one tile. A modality on a
finer grid (HR) reads the same ground footprint: ``ratio`` times as many pixels per side.

Tile ids are row-major indices over the tile rows and columns: a pure function of the grid shape and the tiling, so
a resumed run and the mosaic agree on them without any lookup.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    """One tile: its id (row of the tile store) and the top-left pixel on the 10 m output grid."""

    id: int
    row: int
    col: int
    size: int

    def window(self, ratio: int = 1) -> tuple[slice, slice]:
        """(rows, cols) slices of this tile on a grid ``ratio`` times finer than the 10 m grid (may exceed it)."""
        r, c, s = self.row * ratio, self.col * ratio, self.size * ratio
        return slice(r, r + s), slice(c, c + s)


def tile_starts(length: int, size: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets along one axis: step ``size - overlap``; the last is ``length - size`` rounded up to ``align``.

    Raises:
        ValueError: bad size/overlap, or a step ``size - overlap`` that is not a multiple of ``align``.
    """
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError(f"tile size {size} must be positive and overlap {overlap} in [0, size)")
    stride = size - overlap
    if align < 1 or stride % align:
        raise ValueError(
            f"tile size {size} minus overlap {overlap} = {stride} must be a multiple of {align} (the model's attention "
            "window) so that every tile shares one window grid"
        )
    if length <= size:
        return [0]  # the grid is smaller than one tile: one padded tile
    starts = list(range(0, length - size, stride))
    starts.append(-(-(length - size) // align) * align)  # > starts[-1]: range() stops below length - size
    return starts


def plan_tiles(height: int, width: int, size: int, overlap: int, align: int = 1) -> list[Tile]:
    """All tiles of a ``height`` x ``width`` grid, row-major (tile id = list index); see :func:`tile_starts`."""
    rows, cols = tile_starts(height, size, overlap, align), tile_starts(width, size, overlap, align)
    return [Tile(i * len(cols) + j, r, c, size) for i, r in enumerate(rows) for j, c in enumerate(cols)]


def origins_array(tiles: Sequence[Tile]) -> np.ndarray:
    """(n_tiles, 2) int64 (row, col) origins, the tile store's ``origin`` array."""
    return np.asarray([(t.row, t.col) for t in tiles], dtype=np.int64).reshape(-1, 2)


def padding(tiles: Sequence[Tile], height: int, width: int) -> tuple[int, int]:
    """Rows and columns by which the tiles stick out of the grid (0 when they all end inside it)."""
    if not tiles:
        return 0, 0
    return max(max(t.row + t.size for t in tiles) - height, 0), max(max(t.col + t.size for t in tiles) - width, 0)


def locality_order(tiles: Sequence[Tile], block: tuple[int, int]) -> list[Tile]:
    """Tiles sorted by the cube chunk ``block`` (rows, cols) their origin falls in, then row-major.

    Dispatching in this order lets consecutive batches reuse the cube chunks the reader has just decoded; the tile
    ids (and so the outputs) do not depend on it.
    """
    by, bx = block
    return sorted(tiles, key=lambda t: (t.row // by, t.col // bx, t.row, t.col))


def batches(tiles: Sequence[Tile], batch_size: int) -> list[list[Tile]]:
    """Consecutive groups of ``batch_size`` tiles (the last one may be shorter)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [list(tiles[i : i + batch_size]) for i in range(0, len(tiles), batch_size)]
