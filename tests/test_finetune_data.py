"""Fine-tuning data adapters on the real sample data: spec validation, the sample contract, splits, augmentation.

Cube adapters (labels reprojected / rasterised onto a cube) are in ``test_finetune_data_cube.py``.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from scipy.ndimage import maximum_filter
from shared_data import needs_shared, require

from pipeline.finetune.data import DataSpecError, label_stats, open_dataset, parse_data_spec
from pipeline.finetune.data.labels import LabelValueError
from pipeline.finetune.data.readers import DataBandError, DataReadError
from pipeline.finetune.data.splits import SplitError, split_counts
from pipeline.finetune.sample import IGNORE, collate
from pipeline.modalities import DEFAULT_MODALITIES, HR, HR_RGBN, S1

MODEL = dict(DEFAULT_MODALITIES)
SPLITS = ("train", "val", "test")


def _open(data: dict, split: str = "train", train: bool = False, model: dict | None = None, **kw: object):
    return open_dataset(parse_data_spec(data), split, model or MODEL, train=train, **kw)


def _check_entry(entry: dict, bands: int, size: int, dates: int = 1) -> None:
    assert entry["x"].shape == (dates, bands, size, size) and entry["x"].dtype == torch.float32
    assert entry["valid"].shape == (dates, size, size) and entry["valid"].dtype == torch.bool
    assert entry["doy"].shape == (dates,) and entry["doy"].dtype == torch.int64
    assert entry["gsd"].shape == () and entry["gsd"].dtype == torch.float32
    assert torch.isfinite(entry["x"]).all()


def _same(a: dict, b: dict) -> bool:
    return torch.equal(a["label"], b["label"]) and all(
        torch.equal(pa[m][f], pb[m][f]) for pa, pb in zip(a["periods"], b["periods"]) for m in pa for f in pa[m]
    )


# --- the spec ---------------------------------------------------------------------------------------------------


def test_spec_resolves_paths_against_the_callers_folder(tmp_path: Path) -> None:
    spec = parse_data_spec({"format": "class_folders", "path": "data/rsscn7"}, base_dir=tmp_path)
    assert spec.path == str((tmp_path / "data/rsscn7").resolve())
    cube = parse_data_spec({"format": "cube", "path": "c.zarr", "labels": "l.gpkg"}, base_dir=tmp_path)
    assert cube.labels == str(tmp_path / "l.gpkg") and cube.vector_labels


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"format": "folders", "path": "x"}, "format"),
        ({"format": "class_folders", "path": "x", "sise": 3}, "sise: unknown field"),
        ({"format": "class_folders", "path": "x", "split": {"fractions": [0.5, 0.2, 0.2]}}, "split.fractions"),
        ({"format": "class_folders", "path": "x", "split": {"gap": 2}}, "set block too"),
        ({"format": "class_folders", "path": "x", "split": {"block": 8}}, "needs pixel labels"),
        ({"format": "class_folders", "path": "x", "train": "a", "split": {}}, "not both"),
        ({"format": "class_folders", "path": "x", "colors": ["red"]}, "colors"),
        ({"format": "class_folders", "path": "x", "classes": {1: "a"}}, "sub-folder names"),
        ({"format": "class_folders", "path": "x", "scale": [2, 1]}, "scale"),
        ({"format": "class_folders", "path": "x", "classes": ["a", "a"]}, "unique"),
        ({"format": "change_folders", "path": "x", "classes": {0: "a", 1: "b"}, "label_nodata": [1]}, "both"),
        ({"format": "raster_pairs", "path": "x", "label": {"glob": "*"}, "modalities": {}}, "modalities"),
        ({"format": "raster_pairs", "path": "x", "label": {"glob": "*"}, "modalities": {"s1": {"glob": "*"}},
          "key": "(("}, "regular expression"),
        ({"format": "cube", "path": "c", "labels": "l.tif", "train": "*"}, "one scene"),
        ({"format": "bigearthnet", "path": "b", "classes": ["a"]}, "19-class"),
    ],
)  # fmt: skip
def test_spec_errors_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(DataSpecError, match=message) as err:
        parse_data_spec(data, source="task.yaml")
    assert str(err.value).startswith("task.yaml: invalid data spec")


def test_split_counts_give_every_split_a_sample() -> None:
    assert split_counts(60, (0.8, 0.1, 0.1)) == [48, 6, 6]
    assert split_counts(3, (0.8, 0.1, 0.1)) == [1, 1, 1]
    assert split_counts(5, (1.0, 0.0, 0.0)) == [5, 0, 0]
    assert sum(split_counts(17, (0.6, 0.3, 0.1))) == 17


# --- class_folders (RSSCN7) -------------------------------------------------------------------------------------


@needs_shared("rsscn7")
def test_class_folders_contract_and_stratified_seeded_split() -> None:
    data = {"format": "class_folders", "path": str(require("rsscn7")), "size": 64, "gsd": 2.5}
    parts = {s: _open(data, s) for s in SPLITS}
    assert [len(parts[s]) for s in SPLITS] == [7 * 48, 7 * 6, 7 * 6]
    keys = [set(parts[s].keys) for s in SPLITS]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert len(set.union(*keys)) == 420
    src = parts["val"]
    assert src.task == "classification" and src.periods == 1 and src.modalities == ("hr",)
    assert src.classes[0] == "aGrass" and len(src.classes) == 7
    assert src.describe()["class_counts"] == dict.fromkeys(src.classes, 6)  # stratified: 6 of each class
    s = src.get(7)
    _check_entry(s["periods"][0]["hr"], 3, 64)
    assert s["label"].dtype == torch.int64 and s["label"].shape == () and int(s["label"]) == src.labels[7]
    assert float(s["periods"][0]["hr"]["gsd"]) == 2.5
    assert _same(s, src.get(7)) and _same(s, src.get(7, np.random.default_rng(3)))  # not a training source
    # the same seed gives the same split; another seed another one
    assert json.loads(json.dumps(src.describe()))["samples"] == 42  # provenance goes into checkpoints as JSON
    assert _open(data, "val").keys == src.keys
    assert _open(data | {"split": {"seed": 1}}, "val").keys != src.keys
    batch = collate([src.get(i) for i in range(4)])
    assert batch["periods"][0]["hr"]["x"].shape == (4, 1, 3, 64, 64) and batch["label"].shape == (4,)


@needs_shared("rsscn7")
def test_class_folders_explicit_splits_and_training_views() -> None:
    data = {"format": "class_folders", "path": str(require("rsscn7")), "size": 32, "gsd": 2.5, "scale": [0.5, 2.0],
            "classes": ["aGrass", "gParking"], "train": ["*/?00[1-8].jpg"], "val": "*/?009.jpg"}  # fmt: skip
    train, val = _open(data, "train", train=True), _open(data, "val")
    assert len(train) == 16 and len(val) == 2 and len(_open(data, "test")) == 0
    assert val.keys == ["aGrass/a009.jpg", "gParking/g009.jpg"] and label_stats(train)["counts"] == [8, 8]
    a, b = train.get(0, np.random.default_rng(0)), train.get(0, np.random.default_rng(0))
    assert _same(a, b) and not _same(a, train.get(0, np.random.default_rng(1)))
    _check_entry(a["periods"][0]["hr"], 3, 32)
    with pytest.raises(SplitError, match="match no sample"):
        _open(data | {"train": "*/nothing*"})


@needs_shared("rsscn7")
def test_class_folders_bad_inputs_name_the_file(tmp_path: Path) -> None:
    src = require("rsscn7")
    for c in ("aGrass", "bField"):
        (tmp_path / c).mkdir()
        for p in sorted((src / c).glob("*.jpg"))[:3]:
            shutil.copy(p, tmp_path / c / p.name)
    data = {"format": "class_folders", "path": str(tmp_path), "size": 16, "gsd": 2.5, "split": {"fractions": [1, 0, 0]}}
    with pytest.raises(DataBandError, match=r"a001\.jpg.*'hr'.*\['R', 'G', 'B', 'N'\]"):
        _open(data, model={"hr": HR_RGBN})
    (tmp_path / "aGrass" / "a001.jpg").write_bytes(b"not a jpeg")
    source = _open(data)
    bad = source.keys.index("aGrass/a001.jpg")
    with pytest.raises(DataReadError, match=r"aGrass/a001\.jpg: cannot read the image"):
        source.get(bad)
    (tmp_path / "cEmpty").mkdir()
    with pytest.raises(DataReadError, match=r"class folder .*cEmpty holds no images"):
        _open(data)


# --- change_folders (LEVIR-CD, DSIFN-CD) ------------------------------------------------------------------------


@needs_shared("levir_cd")
def test_change_folders_levir_contract_and_explicit_splits() -> None:
    data = {"format": "change_folders", "path": str(require("levir_cd")), "size": 64, "gsd": 0.5,
            "train": "train_*", "val": "val_*", "test": "test_*"}  # fmt: skip
    test = _open(data, "test")
    assert test.task == "change" and test.periods == 2 and test.classes == ["no_change", "change"]
    assert {test.scenes[w[0]].key.split("_")[0] for w in test.windows} == {"test"}
    s = test.get(0)
    assert len(s["periods"]) == 2
    for p in s["periods"]:
        _check_entry(p["hr"], 3, 64)
        assert float(p["hr"]["gsd"]) == HR.nearest_resolution(0.5) == 0.625
    assert s["label"].dtype == torch.int64 and s["label"].shape == (64, 64)
    assert set(s["label"].unique().tolist()) <= {0, 1}
    st = label_stats(test)
    assert st["counts"][1] > 0 and sum(st["counts"]) == sum(test.describe()["class_counts"].values())


@needs_shared("dsifn_cd")
def test_change_labels_outside_the_classes_name_file_and_values(tmp_path: Path) -> None:
    root = require("dsifn_cd")
    for sub in ("A", "B", "label"):
        (tmp_path / sub).mkdir()
        shutil.copy(root / sub / "0_2.png", tmp_path / sub / "0_2.png")
    lab = np.asarray(Image.open(tmp_path / "label" / "0_2.png").convert("L")).copy()
    lab[:2, :2] = 7
    Image.fromarray(lab).save(tmp_path / "label" / "0_2.png")
    data = {"format": "change_folders", "path": str(tmp_path), "size": 32, "gsd": 0.625}
    with pytest.raises(LabelValueError, match=r"0_2\.png: label values \['7'\]"):
        _open(data | {"split": {"fractions": [1, 0, 0]}})
    # declared as nodata, the same pixels become IGNORE
    src = _open(data | {"label_nodata": [7], "split": {"fractions": [1, 0, 0]}})
    assert int(src.get(0)["label"][0, 0]) == IGNORE


def _synthetic_change(tmp_path: Path) -> Path:
    """A real LEVIR image as A and B, and a label that is a function of it (red > 128)."""
    src = require("levir_cd")
    for sub in ("A", "B", "label"):
        (tmp_path / sub).mkdir()
    rgb = np.asarray(Image.open(src / "A" / "test_2_0000_0000.png").convert("RGB"))
    for sub in ("A", "B"):
        Image.fromarray(rgb).save(tmp_path / sub / "x.png")
    Image.fromarray(((rgb[..., 0] > 128) * 255).astype(np.uint8)).save(tmp_path / "label" / "x.png")
    return tmp_path


def _red_dn(entry: dict) -> torch.Tensor:
    return entry["x"][0, 0] * HR.std[0] + HR.mean[0]


@needs_shared("levir_cd")
@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.5, 2.0)])
def test_augmentation_keeps_label_and_periods_aligned(tmp_path: Path, scale: tuple[float, float]) -> None:
    data = {"format": "change_folders", "path": str(_synthetic_change(tmp_path)), "size": 64, "gsd": 0.625,
            "scale": list(scale), "split": {"fractions": [1, 0, 0]}}  # fmt: skip
    src = _open(data, train=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        s = src.get(i % len(src), rng)
        a, b = s["periods"][0]["hr"], s["periods"][1]["hr"]
        assert torch.equal(a["x"], b["x"])  # both periods went through the same view
        lab, valid = s["label"], a["valid"][0]
        assert torch.equal(lab == IGNORE, ~valid)  # padding is unlabelled and invalid alike
        agree = ((_red_dn(a) > 128.5) == (lab == 1))[valid].float().mean()  # DN are integers
        if scale == (1.0, 1.0):
            assert agree == 1.0  # flips / rotations only: exact
        else:
            assert agree > 0.9  # zoom: bilinear image vs nearest label differ only along edges


# --- raster_pairs (Sen1Floods11, SMAGNet) -----------------------------------------------------------------------


def _floods(**kw: object) -> dict:
    return {"format": "raster_pairs", "path": str(require("sen1floods11")), "size": 64, "label_nodata": [-1],
            "modalities": {"s2": {"glob": "S2Hand/*.tif"}, "s1": {"glob": "S1Hand/*.tif"}},
            "label": {"glob": "LabelHand/*.tif"}, "classes": {0: "dry", 1: "water"}} | kw  # fmt: skip


@needs_shared("sen1floods11")
def test_raster_pairs_sen1floods11_s1_s2_contract() -> None:
    src = _open(_floods(split={"fractions": [1, 0, 0]}))
    assert src.task == "segmentation" and src.modalities == ("s2", "s1") and src.classes == ["dry", "water"]
    assert len(src) == 64 and src.scenes[0].key == "Spain_7370579"  # 8 x 8 windows of a 512 px chip
    s = src.get(9)
    _check_entry(s["periods"][0]["s2"], 10, 64)
    _check_entry(s["periods"][0]["s1"], 2, 64)
    assert s["label"].dtype == torch.int64 and set(s["label"].unique().tolist()) <= {IGNORE, 0, 1}
    counts = label_stats(src)["counts"]
    assert counts == [192_010, 70_035]  # every labelled pixel of the chip; the 99 "-1" pixels are IGNORE
    crs, transform = src.window_georef(0)
    assert "WGS 84" in crs and transform.c == pytest.approx(-0.7819, abs=1e-4)
    # band mapping by 1-based index gives the same as matching descriptions (B2 == B02)
    file_bands = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
    mapped = {b: file_bands.index(b.replace("B0", "B")) + 1 for b in MODEL["s2"].bands}
    data = _floods(split={"fractions": [1, 0, 0]})
    data["modalities"]["s2"]["bands"] = mapped
    assert torch.equal(_open(data).get(9)["periods"][0]["s2"]["x"], s["periods"][0]["s2"]["x"])


@needs_shared("sen1floods11")
def test_raster_pairs_band_errors_name_the_file() -> None:
    s1_hh = dataclasses.replace(S1, bands=("VV", "HH"))
    message = r"Spain_7370579_S1Hand\.tif: modality 's1'.*'HH'.*got bands \['VV', 'VH'\]"
    with pytest.raises(DataBandError, match=message):
        _open(_floods(), model=MODEL | {"s1": s1_hh})
    with pytest.raises(ValueError, match=r"modalities \['s1'\] the model does not take"):
        _open(_floods(), model={"s2": MODEL["s2"]})


def _smagnet(**kw: object) -> dict:
    return {"format": "raster_pairs", "path": str(require("sen1floods11/smagnet")), "size": 64,
            "modalities": {"s1": {"glob": "*_S1Hand.tif"}}, "label": {"glob": "*_S1LabelHand.tif"}} | kw  # fmt: skip


@needs_shared("sen1floods11/smagnet")
def test_spatially_blocked_split_is_disjoint_with_a_gap() -> None:
    block, gap = 128, 8
    data = _smagnet(split={"seed": 3, "fractions": [0.6, 0.2, 0.2], "block": block, "gap": gap})
    maps = {}
    for split in SPLITS:
        src = _open(data, split)
        assert src.describe()["split"] == split and len(src) > 0
        canvas = np.zeros((3, 512, 512), dtype=bool)
        for i, (scene, top, left) in enumerate(src.windows):  # no GSD change (10 m): windows are exact pixels
            y, x = round(top), round(left)
            canvas[scene, y : y + 64, x : x + 64] |= src.get(i)["label"].numpy() != IGNORE
        maps[split] = canvas
    assert sum(m.sum() for m in maps.values()) > 0.5 * 3 * 512 * 512
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                near = maximum_filter(maps[a], size=(1, 2 * gap + 1, 2 * gap + 1))
                assert not (near & maps[b]).any(), f"{a} and {b} labels within {gap} px"


@needs_shared("sen1floods11/smagnet")
def test_raster_pairs_without_georeference_use_the_declared_gsd() -> None:
    src = _open(_smagnet(gsd=20.0, size=32, split={"fractions": [1, 0, 0]}))
    s = src.get(0)
    assert float(s["periods"][0]["s1"]["gsd"]) == 20.0 and src.window_georef(0) is None
    assert s["label"].shape == (32, 32) and src.classes == ["0", "1"]
    with pytest.raises(ValueError, match="not a whole number of 10 m grid cells"):
        _open(_smagnet(gsd=2.5, size=3))


@needs_shared("sen1floods11")
def test_raster_pairs_bad_label_values_name_the_file(tmp_path: Path) -> None:
    root = require("sen1floods11")
    for sub in ("S1Hand", "LabelHand"):
        (tmp_path / sub).mkdir()
        for p in (root / sub).glob("*.tif"):
            shutil.copy(p, tmp_path / sub / p.name)
    label = next((tmp_path / "LabelHand").glob("*.tif"))
    with rasterio.open(label, "r+") as dst:
        arr = dst.read(1)
        arr[10:12, 10:12] = 5
        dst.write(arr, 1)
    data = _floods(path=str(tmp_path), modalities={"s1": {"glob": "S1Hand/*.tif"}})
    with pytest.raises(LabelValueError, match=r"Spain_7370579_LabelHand\.tif: label values \['5'\]"):
        _open(data)
    (tmp_path / "S1Hand" / "Spain_7370579_S1Hand.tif").write_bytes(b"truncated")
    with pytest.raises(DataReadError, match=r"Spain_7370579_S1Hand\.tif: cannot read the raster"):
        _open(data | {"label_nodata": [-1, 5]})


# --- bigearthnet --------------------------------------------------------------------------------------------------


@needs_shared("bigearthnet_v1")
def test_bigearthnet_multilabel_explicit_and_seeded_splits() -> None:
    data = {"format": "bigearthnet", "path": str(require("bigearthnet_v1"))}
    parts = {s: _open(data, s) for s in SPLITS}
    assert [len(parts[s]) for s in SPLITS] == [10, 10, 10]  # split_in_configilm_mock
    src = parts["test"]
    s = src.get(0)
    assert src.task == "multilabel" and len(src.classes) == 19
    assert s["label"].dtype == torch.float32 and s["label"].shape == (19,) and s["label"].sum() >= 1
    _check_entry(s["periods"][0]["s2"], 10, 120)
    _check_entry(s["periods"][0]["s1"], 2, 120)
    assert int(s["periods"][0]["s2"]["doy"][0]) > 0  # from the patch name
    total = sum(np.asarray(label_stats(p)["counts"]) for p in parts.values())
    assert total[src.classes.index("Mixed forest")] == 13  # the README's label frequency
    seeded = {s: _open(data | {"size": 64, "split": {"seed": 5}}, s, model={"s2": MODEL["s2"]}) for s in SPLITS}
    names = [{p.name for p in seeded[s].patches} for s in SPLITS]
    assert [len(n) for n in names] == [24, 3, 3] and len(set.union(*names)) == 30
    x = seeded["val"].get(0)
    assert list(x["periods"][0]) == ["s2"] and x["periods"][0]["s2"]["x"].shape == (1, 10, 64, 64)


@needs_shared("eolearn_slovenia")
def test_raster_pairs_regression_with_scale_on_a_utm_grid() -> None:
    """The DEM as a continuous label of an S2 scene stored as reflectance (DN / 10000): ``scale`` restores DN."""
    root = require("eolearn_slovenia")
    data = {"format": "raster_pairs", "path": str(root), "task": "regression", "size": 32, "key": "^()",
            "modalities": {"s2": {"glob": "reference_scenes/S2L1C_20150711.tif", "scale": 10000}},
            "label": {"glob": "dem.tif"}, "split": {"fractions": [1, 0, 0]}}  # fmt: skip
    src = _open(data)
    assert src.task == "regression" and src.classes is None and len(src) == 16  # 4 x 4 windows of 100 x 101 px
    s = src.get(0)
    assert s["label"].dtype == torch.float32 and s["label"].shape == (32, 32)
    assert float(s["label"].min()) >= 664 and float(s["label"].max()) <= 801
    entry = s["periods"][0]["s2"]
    _check_entry(entry, 10, 32)
    assert int(entry["doy"][0]) == 192  # the acquisition_time_utc tag
    k = MODEL["s2"].bands.index("B04")
    with rasterio.open(root / "reference_scenes/S2L1C_20150711.tif") as f:
        b04 = f.read(4)[:32, :32] * 10000
    assert np.allclose(entry["x"][0, k].numpy() * MODEL["s2"].std[k] + MODEL["s2"].mean[k], b04, atol=0.5)
    st = label_stats(src)
    assert st["count"] == 100 * 101 and 664 <= st["min"] < st["mean"] < st["max"] <= 801


@needs_shared("rsscn7")
def test_explicit_split_folders_and_key_lists(tmp_path: Path) -> None:
    src = require("rsscn7")
    for split, names in (("train", ["a001.jpg", "a002.jpg"]), ("val", ["a003.jpg"])):
        (tmp_path / split / "aGrass").mkdir(parents=True)
        for n in names:
            shutil.copy(src / "aGrass" / n, tmp_path / split / "aGrass" / n)
    (tmp_path / "val" / "bField").mkdir()
    shutil.copy(src / "bField" / "b001.jpg", tmp_path / "val" / "bField" / "b001.jpg")
    data = {"format": "class_folders", "path": str(tmp_path), "size": 16, "gsd": 2.5, "train": "train", "val": "val"}
    train, val = _open(data, "train"), _open(data, "val")
    assert train.classes == val.classes == ["aGrass", "bField"]  # the union over the split folders
    assert train.keys == ["aGrass/a001.jpg", "aGrass/a002.jpg"] and val.keys == ["aGrass/a003.jpg", "bField/b001.jpg"]
    (tmp_path / "test.txt").write_text("# held out\naGrass/a002.jpg\n")
    listed = _open({"format": "class_folders", "path": str(tmp_path / "train"), "size": 16, "gsd": 2.5,
                    "train": "*/a001.jpg", "test": "../test.txt"}, "test")  # fmt: skip
    assert listed.keys == ["aGrass/a002.jpg"]


@needs_shared("levir_cd")
@needs_shared("sen1floods11")
def test_sources_pickle_for_dataloader_workers() -> None:
    change = {"format": "change_folders", "path": str(require("levir_cd")), "size": 32, "gsd": 0.625}
    for data in (change, _floods(split={"fractions": [1, 0, 0]})):
        src = _open(data)
        assert _same(pickle.loads(pickle.dumps(src)).get(0), src.get(0))
