"""The seam metric: detects per-tile offsets in an unblended mosaic, ~1 for blended smooth fields."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from mosaic_fixtures import load_s2_chip, tile_origins, write_tile_store

from pipeline.mosaic.quality import seam_score
from pipeline.mosaic.stitch import open_mosaic, stitch_tiles

SIZE, OVERLAP = 32, 8


@pytest.fixture(scope="module")
def grid():
    _, crs, transform = load_s2_chip()
    yy, xx = np.mgrid[0:101, 0:100].astype(np.float32)
    smooth = np.stack([np.sin(yy / 9) + np.cos(xx / 13), 0.02 * (yy + 2 * xx)])  # (2, 101, 100)
    return smooth.astype(np.float32), crs, transform


def _stitch(tmp_path, name, image, crs, transform, *, blend, offsets=None):
    tiles = write_tile_store(str(tmp_path / name), image, crs, transform, SIZE, OVERLAP, offsets=offsets)
    return open_mosaic(stitch_tiles(tiles, str(tmp_path / name / "mosaic.zarr"), chunks=64, blend=blend))


def test_seam_score_detects_per_tile_offsets_without_blending(grid, tmp_path):
    smooth, crs, transform = grid
    origins = tile_origins(101, 100, SIZE, OVERLAP)
    offsets = np.random.default_rng(0).normal(0, 0.5, size=len(origins)).astype(np.float32)
    seamy = _stitch(tmp_path, "plain", smooth, crs, transform, blend=False, offsets=offsets)["data"]
    blended = _stitch(tmp_path, "blend", smooth, crs, transform, blend=True, offsets=offsets)["data"]
    s_plain, s_blend = seam_score(seamy, origins, SIZE), seam_score(blended, origins, SIZE)
    assert s_plain > 3
    assert s_blend < s_plain / 2


def test_seam_score_is_about_one_for_blended_smooth_and_natural_fields(grid, tmp_path):
    smooth, crs, transform = grid
    origins = tile_origins(101, 100, SIZE, OVERLAP)
    mosaic = _stitch(tmp_path, "smooth", smooth, crs, transform, blend=True)["data"]
    assert seam_score(mosaic, origins, SIZE) == pytest.approx(1, abs=0.15)
    bands, _, _ = load_s2_chip()  # a real S2 chip: no structure aligned with the tile grid
    natural = _stitch(tmp_path, "s2", bands[[1, 2, 3, 7]], crs, transform, blend=True)["data"]
    assert seam_score(natural, origins, SIZE) == pytest.approx(1, abs=0.2)


def test_seam_score_accepts_numpy_dask_and_2d(grid):
    smooth, _, _ = grid
    origins = tile_origins(101, 100, SIZE, OVERLAP)
    stepped = smooth.copy()
    stepped[:, 24:, :] += 5.0  # one hard step exactly on a tile edge (row 24 = second tile row)
    a = seam_score(stepped, origins, SIZE)
    b = seam_score(da.from_array(stepped, chunks=(1, 50, 50)), origins, SIZE)
    c = seam_score(stepped[0], origins, SIZE)
    assert a == pytest.approx(b) and a > 5 and c > 5
    with_nan = stepped.copy()
    with_nan[:, :10, :10] = np.nan
    assert np.isfinite(seam_score(with_nan, origins, SIZE))
