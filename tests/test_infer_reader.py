"""Reading tiles from a real-pixel Zarr cube: bands, normalisation, dates, validity, HR windows, padding."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from infer_fixtures import CLOUDY, DATES, HR_RATIO, load_s2, write_cube

from pipeline.infer.reader import CubeReader, day_of_year, output_grid
from pipeline.infer.tiling import Tile
from pipeline.modalities import HR, S2


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_cube(tmp_path_factory.mktemp("cube") / "cube.zarr", size=(64, 64), hr=True)


def test_output_grid_is_the_10m_grid(cube: str) -> None:
    grid = output_grid(cube, ["hr", "s2"])
    assert (grid.height, grid.width) == (64, 64)
    assert grid.transform == (10.0, 0.0, 465180.0, 0.0, -10.0, 5080250.0)
    assert "32633" in grid.crs or "UTM zone 33N" in grid.crs
    assert grid.chunks == (32, 32)


def test_s2_tile_is_normalised_with_dates_and_cloud_validity(cube: str) -> None:
    reader = CubeReader(cube, {"s2": S2}, [("2015-07-01", "2015-09-30")])
    item = reader.read(Tile(0, 8, 16, 24))
    s2 = item.periods[0]["s2"]
    assert s2.x.shape == (5, 10, 24, 24) and s2.valid.shape == (5, 24, 24)
    raw = load_s2((64, 64))[:, :, 8:32, 16:40]
    np.testing.assert_allclose(s2.x, S2.normalize(raw), rtol=1e-6, atol=1e-6)
    assert [bool(v.all()) for v in s2.valid] == [d not in CLOUDY for d in DATES]
    assert s2.doy.tolist() == day_of_year(np.array(DATES, dtype="datetime64[ns]")).tolist() == [192, 212, 232, 242, 252]
    assert item.valid.all() and not item.all_nodata


def test_time_range_and_change_periods_select_dates(cube: str) -> None:
    reader = CubeReader(cube, {"s2": S2}, [("2015-07-11", "2015-07-31"), ("2015-08-01", "2015-09-09")])
    assert reader.dates(0)["s2"] == ["2015-07-11T00:00:00", "2015-07-31T00:00:00"]
    assert len(reader.dates(1)["s2"]) == 3
    item = reader.read(Tile(0, 0, 0, 24))
    assert [p["s2"].x.shape[0] for p in item.periods] == [2, 3]
    with pytest.raises(ValueError, match="no modality"):
        CubeReader(cube, {"s2": S2}, [("2016-01-01", "2016-02-01")])


def test_hr_window_covers_the_same_ground(cube: str) -> None:
    reader = CubeReader(cube, {"hr": HR, "s2": S2}, [("2015-07-01", "2015-09-30")])
    assert reader.modalities == ["hr", "s2"]
    item = reader.read(Tile(0, 8, 16, 24))
    hr = item.periods[0]["hr"]
    assert hr.x.shape == (1, 3, 24 * HR_RATIO, 24 * HR_RATIO) and hr.gsd == 2.5
    raw_rgb = HR.normalize(np.clip(load_s2((64, 64))[:1, [2, 1, 0], 8:32, 16:40] / 3000 * 255, 0, 255))
    np.testing.assert_allclose(hr.x[:, :, ::HR_RATIO, ::HR_RATIO], raw_rgb, rtol=1e-5, atol=1e-5)


def test_nodata_corner_and_padding(cube: str) -> None:
    reader = CubeReader(cube, {"s2": S2}, [("2015-07-01", "2015-09-30")])
    corner = reader.read(Tile(0, 40, 40, 24))  # inside the 24 px nodata corner
    assert corner.all_nodata
    assert (corner.periods[0]["s2"].x == 0).all()  # NaN zero-filled, marked invalid
    big = reader.read(Tile(0, 0, 0, 80))  # grid smaller than the tile: the model sees only the grid, no padding
    assert big.extent == (64, 64) and big.periods[0]["s2"].x.shape[-2:] == (64, 64)
    assert big.valid.shape == (80, 80)
    assert not big.valid[64:].any() and not big.valid[:, 64:].any() and big.valid[:40, :40].all()
    edge = reader.read(Tile(0, 48, 40, 24))  # sticks out past the bottom edge only
    assert edge.extent == (16, 24) and edge.periods[0]["s2"].valid.shape[-2:] == (16, 24)


def test_band_mismatch_is_explained(cube: str) -> None:
    other = replace(S2, bands=(*S2.bands[:-1], "B99"))
    with pytest.raises(ValueError, match="missing \\['B99'\\]"):
        CubeReader(cube, {"s2": other}, [("2015-07-01", "2015-09-30")])
