"""Bad input: every case gives a message naming the item/asset and what to do; the build goes on where it can."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from test_cube_support import (
    S1F,
    S1F_BBOX,
    SLOVENIA,
    make_item,
    require_data,
    s1f_items,
    s1f_sources,
    slovenia_items,
    slovenia_source,
    utc,
)

from pipeline.cube import BandNotFoundError, build_cube, open_modality
from pipeline.cube.manifest import ChunkManifest

SLO_BBOX = (14.5513, 45.8659, 14.5643, 45.8750)

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def _build(url, items, source, **kw):
    kw = {"crs": "EPSG:32633", "chunks": (64, 64), "progress": False, "quicklooks": False, **kw}
    return build_cube(url, {"s2": items}, {"s2": source}, region=SLO_BBOX, **kw)


def test_empty_items_is_a_clear_error(tmp_path):
    with pytest.raises((ValueError, LookupError), match=r"modality 's2': no items .*search returned nothing"):
        _build(str(tmp_path / "c.zarr"), [], slovenia_source())


def test_band_missing_from_catalog_mapping(tmp_path):
    require_data()
    source = slovenia_source()
    del source.assets["B8A"]
    with pytest.raises(BandNotFoundError, match=r"band\(s\) \['B8A'\].*collection 'slovenia'"):
        _build(str(tmp_path / "c.zarr"), slovenia_items(), source)


def test_band_missing_from_items_names_band_item_and_assets(tmp_path):
    require_data()
    source = slovenia_source()
    source.assets["B8A"] = "nir08"
    with pytest.raises(BandNotFoundError, match=r"band 'B8A' needs asset 'nir08'.*S2L1C_20150711.*\['toa'\]"):
        _build(str(tmp_path / "c.zarr"), slovenia_items(), source)


def test_asset_404_skips_that_date(tmp_path, caplog):
    """Items served over loopback HTTP; one href points at a file the server does not have (HTTP 404)."""
    require_data()
    from pipeline.catalog.serve import AssetServer

    server = AssetServer({"slo": SLOVENIA / "reference_scenes"})
    try:
        items = slovenia_items()
        for item in items:
            name = item.assets["toa"].href.rsplit("/", 1)[-1]
            item.assets["toa"].href = f"{server.url}/slo/{name}"
        items[1].assets["toa"].href = f"{server.url}/slo/missing.tif"
        url = str(tmp_path / "c.zarr")
        with caplog.at_level(logging.WARNING, logger="pipeline.cube"):
            report = _build(url, items, slovenia_source())
    finally:
        server.close()
    assert "item 'S2L1C_20150731' asset 'toa'" in caplog.text and "missing.tif" in caplog.text
    assert "404" in caplog.text or "not" in caplog.text
    fractions = report.valid_fraction["s2"]
    assert fractions[1] == 0.0 and min(fractions[:1] + fractions[2:]) > 0.9
    ds = open_modality(url, "s2")
    assert ds.sizes["time"] == 5  # the date is kept, fully invalid
    skipped = ds.attrs["skipped_assets"]
    assert [s["item"] for s in skipped] == ["S2L1C_20150731"]
    assert ChunkManifest(url).plan()["skipped_assets"]["s2"] == skipped  # recorded in the manifest as well
    assert any(e["id"] == "S2L1C_20150731" and not e["usable"] for e in ds.attrs["items"]["2015-07-31T10:00:09"])


def test_truncated_header_is_skipped(tmp_path, caplog):
    """eo-learn GeoTIFFs keep their IFD at the end: a truncated copy does not open at all."""
    require_data()
    items = slovenia_items()
    bad = tmp_path / "S2L1C_20150830.tif"
    shutil.copy(SLOVENIA / "reference_scenes/S2L1C_20150830.tif", bad)
    bad.write_bytes(bad.read_bytes()[:120_000])
    items[3].assets["toa"].href = str(bad)
    with caplog.at_level(logging.WARNING, logger="pipeline.cube"):
        report = _build(str(tmp_path / "c.zarr"), items, slovenia_source())
    assert "item 'S2L1C_20150830' asset 'toa'" in caplog.text and "truncated or corrupt" in caplog.text
    assert report.valid_fraction["s2"][3] == 0.0 and report.valid_fraction["s2"][4] > 0.9


def test_truncated_pixel_data_fails_chunks_not_the_build(tmp_path, caplog):
    """Sen1Floods11 keeps its IFD first: the header opens, bands 5..13 fail to decode at read time."""
    require_data()
    bad = tmp_path / "S2Hand.tif"
    bad.write_bytes((S1F / "S2Hand/Spain_7370579_S2Hand.tif").read_bytes()[:1_200_000])
    items = s1f_items()
    items["s2"][0].assets["toa"].href = str(bad)
    url = str(tmp_path / "c.zarr")
    with caplog.at_level(logging.WARNING, logger="pipeline.cube"):
        report = build_cube(url, items, s1f_sources(), region=S1F_BBOX, chunks=(256, 256), progress=False)
    failures = report.failures["s2"]
    assert failures and all(f["items"] == ["s1f-s2"] for f in failures)
    assert all("item 's1f-s2' asset 'toa'" in f["problems"][0] for f in failures)
    assert "could not be read" in caplog.text
    s2 = open_modality(url, "s2")
    assert s2.attrs["failures"] == failures
    assert report.valid_fraction["s2"][0] == 0.0  # every chunk misses bands 5.. -> invalid
    # B02..B04 (bands 2..4) were readable and are kept; S1 is untouched.
    assert np.isfinite(s2["data"].sel(band="B03").values).mean() > 0.9
    assert report.valid_fraction["s1"][0] > 0.9


def test_other_crs_and_all_nodata_date_are_logged(tmp_path, caplog):
    """An EPSG:4326 item far from the region: reprojected (logged), its date kept and fully invalid (logged)."""
    require_data()
    items = slovenia_items()
    spain = make_item({"toa": S1F / "S2Hand/Spain_7370579_S2Hand.tif"}, "spain", utc(2015, 8, 1, 10))
    source = slovenia_source()
    with caplog.at_level(logging.INFO, logger="pipeline.cube"):
        report = _build(str(tmp_path / "c.zarr"), [*items, spain], source)
    assert "reprojected to EPSG:32633" in caplog.text and "EPSG:4326" in caplog.text
    assert "2015-08-01T10:00:00" in caplog.text and "no valid pixel" in caplog.text
    assert report.valid_fraction["s2"][2] == 0.0 and len(report.valid_fraction["s2"]) == 6


def test_existing_cube_from_another_plan_is_not_overwritten(tmp_path):
    require_data()
    url = str(tmp_path / "c.zarr")
    items = slovenia_items()
    _build(url, items[:2], slovenia_source())
    with pytest.raises(ValueError, match=r"different plan.*--overwrite"):
        _build(url, items[:3], slovenia_source())
    assert open_modality(url, "s2").sizes["time"] == 2  # nothing lost
    _build(url, items[:3], slovenia_source(), overwrite=True)
    assert open_modality(url, "s2").sizes["time"] == 3
    other = tmp_path / "not-a-cube"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a skypipe cube"):
        _build(str(other), items[:2], slovenia_source())
    assert (other / "keep.txt").read_text() == "mine"
