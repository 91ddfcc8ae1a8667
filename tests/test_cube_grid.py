"""Grid rules: UTM choice, 10 m snapping, HR GSD snapping and exact nesting; manifest and chunk alignment."""

from __future__ import annotations

import math

import pytest
from affine import Affine
from pyproj import Transformer

from pipeline.cube.grid import HR_GSDS, native_gsd, normalize_crs, region_grid, snap_hr_gsd, utm_crs
from pipeline.cube.layout import check_region, chunk_region
from pipeline.cube.manifest import ChunkManifest
from pipeline.cube.writer import segments


def test_hr_gsds_are_10m_over_4_times_powers_of_two():
    assert HR_GSDS == (2.5, 1.25, 0.625, 0.3125)


@pytest.mark.parametrize(
    ("native", "snapped"),
    [(4.5, 2.5), (3.0, 2.5), (1.0, 1.25), (0.88, 0.625), (0.5, 0.625), (0.3, 0.3125), (0.1, 0.3125), (2.0, 2.5)],
)
def test_snap_hr_gsd_nearest_in_log_space(native, snapped):
    assert snap_hr_gsd(native) == snapped


def test_snap_hr_gsd_rejects_nonpositive():
    with pytest.raises(ValueError, match="positive"):
        snap_hr_gsd(0)


@pytest.mark.parametrize(
    ("lon", "lat", "crs"), [(-0.76, 38.1, "EPSG:32630"), (14.55, 45.87, "EPSG:32633"), (-75.7, -37.7, "EPSG:32718")]
)
def test_utm_zone_of_region_centre(lon, lat, crs):
    assert utm_crs(lon, lat) == crs


def test_region_grid_snaps_outwards_to_10m_and_covers_region():
    bbox = (-0.7819, 38.0828, -0.7359, 38.1288)
    grid = region_grid(bbox)
    assert grid.crs == "EPSG:32630"
    left, bottom, right, top = grid.bounds
    assert all(v % 10 == 0 for v in grid.bounds)
    to_utm = Transformer.from_crs("EPSG:4326", grid.crs, always_xy=True)
    for lon in (bbox[0], bbox[2]):
        for lat in (bbox[1], bbox[3]):
            x, y = to_utm.transform(lon, lat)
            assert left <= x <= right and bottom <= y <= top
    assert grid.shape == ((top - bottom) / 10, (right - left) / 10)


def test_hr_geobox_nests_exactly():
    grid = region_grid((4.3420, 51.8865, 4.3540, 51.8935))
    g10 = grid.geobox()
    for gsd in HR_GSDS:
        hr = grid.geobox(gsd)
        ratio = round(10 / gsd)
        assert hr.shape == (g10.shape[0] * ratio, g10.shape[1] * ratio)
        assert hr.transform == Affine(gsd, 0, g10.transform.c, 0, -gsd, g10.transform.f)
        assert tuple(hr.boundingbox) == tuple(g10.boundingbox)
    with pytest.raises(ValueError, match="whole pixels"):
        grid.geobox(3.0)


def test_coarser_snap_aligns_bounds_to_coarsest_resolution():
    grid = region_grid((14.5513, 45.8659, 14.5643, 45.8750), "EPSG:32633", snap=40)
    assert all(v % 40 == 0 for v in grid.bounds)
    assert grid.geobox(40).shape[0] * 4 == grid.geobox(10).shape[0]


def test_normalize_crs():
    assert normalize_crs(32633) == "EPSG:32633"
    assert normalize_crs("epsg:32630") == "EPSG:32630"
    with pytest.raises(ValueError, match="not a projected CRS"):
        normalize_crs("EPSG:4326")


def test_native_gsd_of_a_geographic_pixel_is_in_metres():
    # Sen1Floods11: 8.983e-5 deg pixels at 38 N, about 7.9 m x 10 m on the ground.
    gsd = native_gsd([8.983152841195215e-05, 0, -0.78189, 0, -8.983152841195215e-05, 38.1288], 4326, "EPSG:32630")
    assert 8.5 < gsd < 9.3
    assert native_gsd([4.5, 0, 592317.86, 0, -4.5, 5750102.16], 32631, "EPSG:32631") == pytest.approx(4.5)


def test_check_region_rejects_misaligned_writes():
    shape, chunks = (3, 100, 90), (1, 32, 32)
    check_region(chunk_region((2, 3, 2), shape, chunks), shape, chunks)  # edge chunk: 96..100, 64..90
    for bad in [(slice(0, 1), slice(16, 48), slice(0, 32)), (slice(0, 1), slice(0, 40), slice(0, 32))]:
        with pytest.raises(AssertionError, match="not aligned"):
            check_region(bad, shape, chunks)


def test_segments_are_consecutive_runs_per_row():
    pending = [(0, 0, 0), (0, 0, 1), (0, 0, 3), (0, 1, 0), (1, 0, 0), (1, 0, 1), (1, 0, 2)]
    assert list(segments(pending, max_len=2)) == [
        (0, 0, [0, 1]),
        (0, 0, [3]),
        (0, 1, [0]),
        (1, 0, [0, 1]),
        (1, 0, [2]),
    ]


def test_manifest_records_and_ignores_temporary_files(tmp_path):
    m = ChunkManifest(str(tmp_path / "c.zarr"))
    assert m.plan() is None
    m.reset({"fingerprints": {"s2": "abc"}})
    m.mark("s2", (0, 1, 2), "ok", {"valid_pixels": 5})
    m.mark("s2", (1, 0, 0), "failed", {"error": "boom", "items": ["x"]})
    (tmp_path / "c.zarr.manifest" / "s2" / "2_0_0.ok.json.tmp-1-abc").write_text("{")  # killed mid-write
    assert m.statuses("s2") == {(0, 1, 2): "ok", (1, 0, 0): "failed"}
    assert m.failures("s2") == [{"index": [1, 0, 0], "status": "failed", "error": "boom", "items": ["x"]}]
    assert m.plan() == {"fingerprints": {"s2": "abc"}}
    m.reset({"fingerprints": {}})
    assert m.statuses("s2") == {}


def test_manifest_on_fsspec_memory_url():
    m = ChunkManifest("memory://bucket/cube.zarr")
    m.reset({"fingerprints": {}})
    m.mark("s1", (0, 0, 0), "ok", {})
    assert m.statuses("s1") == {(0, 0, 0): "ok"}
    assert math.isclose(len(m.statuses("s2")), 0)
