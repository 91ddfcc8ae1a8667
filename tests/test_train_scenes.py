"""Scale-varied scene sources (``pipeline.train.scenes``) on real DOTA, DIOR, WorldView, Atlanta and S1 samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from shared_data import needs_shared, require

from pipeline.modalities import get_modality
from pipeline.ssl.regions import DEFAULT_NUM_REGIONS, unknown_region
from pipeline.train.scenes import SceneSource, brovey, find_scenes, load_scene, stretch_to_dn

UNKNOWN = unknown_region(DEFAULT_NUM_REGIONS)


def test_stretch_maps_percentiles_to_8_bit_and_ignores_invalid_pixels() -> None:
    band = np.arange(101, dtype=np.float64).reshape(1, 1, 101)  # values 0..100
    valid = np.ones((1, 101), dtype=bool)
    valid[0, -1] = False
    out = stretch_to_dn(band * 20 + 300, valid, low=0, high=100)  # 11-bit-like range 300..2300
    assert out.dtype == np.uint8 and out[0, 0, 0] == 0 and out[0, 0, 99] == 255 and out[0, 0, 100] == 0
    assert out[0, 0, 50] == round(50 / 99 * 255)


def test_brovey_keeps_the_pan_intensity() -> None:
    rng = np.random.default_rng(0)
    rgb, pan = rng.uniform(100, 900, (3, 8, 8)), rng.uniform(100, 900, (8, 8))
    assert np.allclose(brovey(rgb, pan).mean(0), pan)


@needs_shared("detection/dota")
def test_dota_scenes_take_the_label_gsd_and_crop_at_the_declared_gsd() -> None:
    root = require("detection/dota/images")
    src = SceneSource(root, format="rgb", size=128, gsd=0.625)
    assert [round(s.gsd, 3) for s in src.scenes] == [0.256, 0.266]  # from labelTxt/<image>.txt headers
    assert src.side(src.scenes[0]) == pytest.approx(128 * 0.625 / 0.255589285596)
    assert len(src) == sum(s.shape[0] * s.shape[1] // round(src.side(s)) ** 2 for s in src.scenes)
    s = src.get(0, np.random.default_rng(3))
    assert s["hr"]["x"].shape == (1, 3, 128, 128) and float(s["hr"]["gsd"]) == 0.625
    assert int(s["region"]) == UNKNOWN
    a, b = src.get(5, np.random.default_rng(7)), src.get(5, np.random.default_rng(7))
    assert (a["hr"]["x"] == b["hr"]["x"]).all()  # a sample is a function of (index, rng seed)
    fine = SceneSource(root, format="rgb", size=128, gsd=0.3125, zoom=(0.5, 2.0))
    assert fine.get(len(fine) - 1, np.random.default_rng(1))["hr"]["x"].shape == (1, 3, 128, 128)


@needs_shared("detection/dior")
def test_scenes_without_gsd_need_native_gsd() -> None:
    root = require("detection/dior/JPEGImages")
    with pytest.raises(ValueError, match="give native_gsd"):
        SceneSource(root, format="rgb")
    assert SceneSource(root, format="rgb", native_gsd=0.5).get(0)["hr"]["x"].shape == (1, 3, 128, 128)


@needs_shared("solaris_spacenet6/worldview")
def test_worldview_pairs_become_pansharpened_8_bit_rgb_at_the_pan_gsd() -> None:
    scenes = find_scenes(require("solaris_spacenet6/worldview"), "worldview")
    assert [s.path.name for s in scenes] == ["ms1.tif", "ms2.tif", "ms3.tif"]
    assert scenes[0].pan.name == "pan1.tif" and scenes[0].gsd == pytest.approx(0.5, abs=1e-4)
    rgb = load_scene(scenes[0], get_modality("hr"))
    assert rgb.shape == (3, 600, 600) and rgb.min() == 0 and rgb.max() == 255
    assert 40 < rgb.mean() < 200 and not np.allclose(rgb[0], rgb[1])  # colour, not grey
    src = SceneSource(require("solaris_spacenet6/worldview"), format="worldview", size=64, gsd=1.25)
    assert int(src.get(0, np.random.default_rng(0))["region"]) != UNKNOWN  # Rotterdam, from the pan GeoTIFF


@needs_shared("solaris_spacenet6/atlanta_buildings")
def test_grey_uint16_scene_is_replicated_to_rgb() -> None:
    src = SceneSource(require("solaris_spacenet6/atlanta_buildings"), format="grey", size=128, gsd=0.625)
    img = load_scene(src.scenes[0], src.spec)
    assert img.shape == (3, 900, 900) and (img[0] == img[2]).all() and img.max() == 255
    assert int(src.get(0)["region"]) != UNKNOWN


@needs_shared("sen1floods11/smagnet")
def test_s1_chips_as_bands_scenes() -> None:
    root = require("sen1floods11/smagnet")
    src = SceneSource(root, format="bands", glob="*_S1Hand.tif", modality="s1", native_gsd=10.0, size=16)
    assert len(src.scenes) == 3 and len(src) == 3 * (512 // 16) ** 2
    s = src.get(100, np.random.default_rng(0))
    assert s["s1"]["x"].shape == (1, 2, 16, 16) and float(s["s1"]["gsd"]) == 10.0
    with pytest.raises(ValueError, match="needs bands"):
        SceneSource(root, format="rgb", modality="s1", native_gsd=10.0)
    with pytest.raises(ValueError, match="grid cells"):
        SceneSource(root, format="bands", glob="*_S1Hand.tif", modality="s1", native_gsd=10.0, size=16, gsd=3.0)


@needs_shared("detection/dota")
def test_spec_and_build_sources_accept_scenes(tmp_path: Path) -> None:
    from pipeline.train.data import build_sources
    from pipeline.train.spec import load_pretrain_spec

    entry = {"kind": "scenes", "path": str(require("detection/dota/images")), "size": 128, "gsd": 0.625,
             "zoom": [0.5, 2.0], "weight": 0.5}  # fmt: skip
    job = {"data": [entry], "steps": 1, "batch_size": 2, "storage": str(tmp_path / "run")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    spec = load_pretrain_spec(tmp_path / "job.yaml")
    (src,), (w,) = build_sources([d.model_dump() for d in spec.data])
    assert isinstance(src, SceneSource) and src.zoom == (0.5, 2.0) and w == 0.5
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(job | {"data": [entry | {"size": 100}]}))
    with pytest.raises(ValueError, match="grid cells"):
        load_pretrain_spec(tmp_path / "bad.yaml")
