"""Tiling of the 10 m grid: coverage, overlap, inward-shifted last tiles, padding, HR windows."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.infer.tiling import Tile, batches, locality_order, origins_array, padding, plan_tiles, tile_starts


def test_starts_cover_the_axis_and_stay_inside() -> None:
    assert tile_starts(100, 32, 8) == [0, 24, 48, 68]
    assert tile_starts(32, 32, 8) == [0]
    assert tile_starts(20, 32, 8) == [0]  # smaller than a tile: one padded tile
    assert tile_starts(57, 32, 8) == [0, 24, 25]
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 32, 32)


def test_aligned_starts_share_the_window_grid() -> None:
    assert tile_starts(100, 32, 8, align=8) == [0, 24, 48, 72]  # last: 68 rounded up to 72, sticks out 4 px
    assert tile_starts(96, 32, 8, align=8) == [0, 24, 48, 64]  # 64 is aligned: ends at the grid edge
    assert tile_starts(20, 32, 8, align=8) == [0]
    with pytest.raises(ValueError, match="multiple of 8"):
        tile_starts(100, 32, 4, align=8)
    tiles = plan_tiles(100, 96, 32, 8, align=8)
    assert all(t.row % 8 == 0 and t.col % 8 == 0 for t in tiles)
    assert padding(tiles, 100, 96) == (4, 0)


@pytest.mark.parametrize(("h", "w", "size", "overlap"), [(101, 100, 24, 4), (64, 64, 24, 4), (10, 70, 16, 0)])
def test_every_pixel_is_covered_and_ids_are_row_major(h: int, w: int, size: int, overlap: int) -> None:
    tiles = plan_tiles(h, w, size, overlap)
    assert [t.id for t in tiles] == list(range(len(tiles)))
    cover = np.zeros((max(h, size), max(w, size)), dtype=int)
    for t in tiles:
        rows, cols = t.window()
        cover[rows, cols] += 1
        if h >= size and w >= size:
            assert 0 <= t.row <= h - size and 0 <= t.col <= w - size
    assert (cover[:h, :w] >= 1).all()
    origins = origins_array(tiles)
    assert origins.dtype == np.int64 and origins.shape == (len(tiles), 2)
    assert sorted(map(tuple, origins)) == list(map(tuple, origins))  # row-major
    assert padding(tiles, h, w) == (max(size - h, 0), max(size - w, 0))


def test_hr_window_is_the_same_ground() -> None:
    t = Tile(0, 20, 40, 24)
    assert t.window(4) == (slice(80, 176), slice(160, 256))


def test_locality_order_groups_tiles_by_cube_chunk() -> None:
    tiles = plan_tiles(128, 128, 16, 0)  # 8 x 8 tiles, cube chunks of 64 px = 4 x 4 tiles each
    ordered = locality_order(tiles, (64, 64))
    assert sorted(t.id for t in ordered) == list(range(64))
    first_chunk = {(t.row // 64, t.col // 64) for t in ordered[:16]}
    assert first_chunk == {(0, 0)}
    assert [len(b) for b in batches(ordered, 5)] == [5] * 12 + [4]
