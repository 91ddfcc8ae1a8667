"""Partition of the cube's 10 m grid into overlapping inference tiles.

Tiles are ``size`` x ``size`` pixels of the 10 m output grid and step by ``size - overlap``. The last row and column
of tiles are shifted inward so that no tile leaves the grid (they overlap their neighbour by more than ``overlap``);
only a grid smaller than one tile gives tiles that stick out, and the reader pads them with nodata. A modality on a
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


def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets along one axis: step ``size - overlap``, last start shifted inward to ``length - size``."""
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError(f"tile size {size} must be positive and overlap {overlap} in [0, size)")
    if length <= size:
        return [0]  # the grid is smaller than one tile: one padded tile
    stride = size - overlap
    starts = list(range(0, length - size, stride))
    starts.append(length - size)
    return starts


def plan_tiles(height: int, width: int, size: int, overlap: int) -> list[Tile]:
    """All tiles of a ``height`` x ``width`` grid, row-major (tile id = list index)."""
    rows, cols = tile_starts(height, size, overlap), tile_starts(width, size, overlap)
    return [Tile(i * len(cols) + j, r, c, size) for i, r in enumerate(rows) for j, c in enumerate(cols)]


def origins_array(tiles: Sequence[Tile]) -> np.ndarray:
    """(n_tiles, 2) int64 (row, col) origins, the tile store's ``origin`` array."""
    return np.asarray([(t.row, t.col) for t in tiles], dtype=np.int64).reshape(-1, 2)


def padding(height: int, width: int, size: int) -> tuple[int, int]:
    """Rows and columns by which tiles stick out of a grid smaller than one tile (0 otherwise)."""
    return max(size - height, 0), max(size - width, 0)


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
