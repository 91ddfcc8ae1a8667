"""GCPL region binning: the equal-area lat/lon grid with known answers, and the unknown-location id."""

from __future__ import annotations

import math

import pytest

from pipeline.ssl.regions import region_bounds, region_grid, region_id, resolve_region, unknown_region

SLOVENIA = (14.5575, 45.8705)  # centre of the eo-learn test patch (../shared/data/README.md)


@pytest.mark.parametrize(
    ("num_regions", "grid"),
    [(2, (1, 1)), (3, (1, 2)), (16, (3, 5)), (17, (2, 8)), (101, (5, 20)), (4097, (32, 128))],
)
def test_grid_shape_keeps_equatorial_cells_about_square(num_regions: int, grid: tuple[int, int]) -> None:
    assert region_grid(num_regions) == grid
    assert grid[0] * grid[1] == num_regions - 1 and unknown_region(num_regions) == num_regions - 1


def test_known_answers() -> None:
    # 16 regions: 3 bands split at sin(lat) = -1/3, 1/3 (lat +-19.47), 5 sectors of 72 degrees from 180 W.
    assert region_id(0.0, 0.0, 16) == 1 * 5 + 2  # middle band; sector (0 + 180) / 72 = 2.5 -> 2
    assert region_id(*SLOVENIA, 16) == 2 * 5 + 2  # sin(45.87) = 0.718 -> band 2; (194.56) / 72 -> sector 2
    assert region_id(-97.74, 30.27, 16) == 2 * 5 + 1  # Austin, Texas: band 2, sector 82.26 / 72 -> 1
    assert region_id(151.2, -33.9, 16) == 0 * 5 + 4  # Sydney: sin = -0.558 -> band 0, sector 331.2 / 72 -> 4
    # 4097: 32 x 128 cells. Slovenia: band floor((1 + 0.7180) / 2 * 32) = 27, sector floor(194.5575 / 360 * 128) = 69.
    assert region_id(*SLOVENIA, 4097) == 27 * 128 + 69 == 3525
    assert region_id(*SLOVENIA, 2) == 0  # one cell for the whole globe


def test_edges_wrap_and_poles() -> None:
    assert region_id(180.0, 0.0, 16) == region_id(-180.0, 0.0, 16) == 5  # the same meridian: sector 0
    assert region_id(179.999, 0.0, 16) == 9 and region_id(-36.0, 0.0, 16) == 7  # an edge belongs to the east cell
    assert region_id(0.0, 90.0, 16) == 12 and region_id(0.0, -90.0, 16) == 2
    assert region_id(360.0 + 14.5575, 45.8705, 16) == region_id(*SLOVENIA, 16)
    lat = math.degrees(math.asin(1 / 3))  # the band edge
    assert region_id(0.0, lat + 1e-9, 16) == 12 and region_id(0.0, lat - 1e-9, 16) == 7


def test_cells_are_equal_area_and_bounds_round_trip() -> None:
    n = 4097
    areas = set()
    for r in range(n - 1):
        w, s, e, north = region_bounds(r, n)
        assert region_id((w + e) / 2, (s + north) / 2, n) == r
        areas.add(round((e - w) * (math.sin(math.radians(north)) - math.sin(math.radians(s))), 9))
    assert len(areas) == 1  # sphere area of a cell is proportional to dlon * d(sin lat)
    assert region_bounds(12, 16) == pytest.approx((-36.0, math.degrees(math.asin(1 / 3)), 36.0, 90.0))


def test_resolve_region_and_errors() -> None:
    assert resolve_region(None, 16) == 15
    assert resolve_region(3, 16) == 3 and resolve_region(15, 16) == 15
    assert resolve_region([-97.74, 30.27], 16) == 11 and resolve_region((14.5575, 45.8705), 4097) == 3525
    with pytest.raises(ValueError, match=r"out of range \[0, 16\)"):
        resolve_region(16, 16)
    with pytest.raises(ValueError, match="out of range"):
        resolve_region(-1, 16)
    with pytest.raises(ValueError, match=r"\(lon, lat\)"):
        resolve_region([1.0, 2.0, 3.0], 16)
    with pytest.raises(ValueError, match="WGS84"):
        region_id(0.0, 91.0, 16)
    with pytest.raises(ValueError, match="WGS84"):
        region_id(float("nan"), 0.0, 16)
    with pytest.raises(ValueError, match="num_regions must be an integer >= 2"):
        region_id(0.0, 0.0, 1)
    with pytest.raises(ValueError, match="not a grid cell"):
        region_bounds(15, 16)  # the unknown-location id has no bounds
