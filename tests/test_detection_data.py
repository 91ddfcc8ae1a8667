"""Detection data on the real samples: DOTA label files, DIOR-R VOC XML, building polygons over the georeferenced
Atlanta image; chips of large images resampled to the model's GSD; boxes follow every augmentation of the pixels;
bad input is a clear error or a counted skip; detection labels collate into padded batches."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from shared_data import needs_shared, shared_path

from pipeline.errors import UserError
from pipeline.finetune.data import DataSpecError, open_dataset, parse_data_spec
from pipeline.finetune.data.boxes import orient_points
from pipeline.finetune.data.dota import parse_dota
from pipeline.finetune.data.geometry import View, orient
from pipeline.finetune.data.labels import LabelValueError
from pipeline.finetune.data.readers import DataReadError
from pipeline.finetune.data.voc import parse_voc
from pipeline.finetune.sample import IGNORE, collate, to_device
from pipeline.modalities import HR

pytestmark = [needs_shared("detection")]

DOTA = shared_path("detection/dota")
DIOR = shared_path("detection/dior")
ATLANTA = shared_path("solaris_spacenet6/atlanta_buildings")
CLASSES = ["ship", "harbor", "large-vehicle", "small-vehicle", "golffield"]
SPECS = {"hr": HR}


def _dota(**fields: object):
    return parse_data_spec({"format": "dota", "path": str(DOTA), "classes": CLASSES, "size": 128} | fields)


def test_dota_labels_are_read_with_their_gsd() -> None:
    gsd, objects = parse_dota(DOTA / "labelTxt" / "P1888.txt")
    assert gsd == pytest.approx(0.266170468393) and len(objects) == 64
    names = [o.name for o in objects]
    assert names.count("large-vehicle") == 50 and names.count("small-vehicle") == 14
    assert objects[0].quad.tolist() == [[674, 375], [683, 375], [684, 394], [675, 395]] and objects[0].line == 3


def test_large_images_become_chips_at_the_model_gsd() -> None:
    source = open_dataset(_dota(test=["P1888"]), "test", SPECS, train=False)
    d = source.describe()
    # 0.266 m snaps to 0.3125 m (as every image of the dataset, whatever its split: one GSD for all splits); a 128 px
    # chip covers 40 m = 150 image pixels; chips overlapping by 64 px (75 image pixels) tile the 712 x 557 image 9 x 7
    assert d["gsd"] == {"hr": 0.3125} and d["source_gsd"] == {"hr": [0.255589, 0.26617]}
    assert d["class_counts"] == {"ship": 0, "harbor": 0, "large-vehicle": 50, "small-vehicle": 14, "golffield": 0}
    assert len(source) == 9 * 7
    sample = source.get(0)
    hr, label = sample["periods"][0]["hr"], sample["label"]
    assert hr["x"].shape == (1, 3, 128, 128) and float(hr["gsd"]) == 0.3125
    assert label["boxes"].shape[1] == 5 and label["classes"].dtype == torch.long and label["ignore"].dtype == torch.bool
    # every object lies in some chip (wholly, so it counts) and no chip box leaves the chip
    seen = sum(int((~source.get(i)["label"]["ignore"]).sum()) for i in range(len(source)))
    assert seen >= 64
    for i in range(len(source)):
        b = source.get(i)["label"]["boxes"]
        if len(b):
            assert (b[:, :2] >= 0).all() and (b[:, :2] <= 128).all()


def test_boxes_follow_flips_rotations_and_zoom() -> None:
    # the point transform is the pixel transform: a marker pixel moves where orient() moves it
    img = torch.zeros(1, 8, 8)
    img[0, 1, 6] = 1.0  # row 1, column 6: centre (6.5, 1.5)
    for flip_x in (False, True):
        for flip_y in (False, True):
            for rot in range(4):
                view = View(0, 0, 8, flip_x, flip_y, rot)
                y, x = (int(v) for v in torch.nonzero(orient(img, view)[0])[0])
                assert orient_points(np.array([[6.5, 1.5]]), view, 8).tolist() == [[x + 0.5, y + 0.5]]
    # augmented training samples keep every box on what the pixels show: boxes stay whole in size (in pixels of the
    # zoomed view) and inside the sample
    source = open_dataset(_dota(select=["P1888"], scale=[0.8, 1.25], split={"fractions": [1, 0, 0]}), "train",
                          SPECS, train=True)  # fmt: skip
    rng = np.random.default_rng(0)
    for i in range(6):
        label = source.get(i % len(source), rng)["label"]
        whole = ~label["ignore"]
        assert (label["boxes"][:, 2:4] > 0).all() and (label["boxes"][whole, :2] <= 128).all()
        assert (label["boxes"][:, 4].abs() <= math.pi / 4 + 1e-6).all()


def test_dior_oriented_xml() -> None:
    ann = parse_voc(DIOR / "Annotations" / "Oriented_Bounding_Boxes" / "00001.xml")
    assert ann.size == (800, 800) and [o.name for o in ann.objects] == ["golffield"]
    spec = parse_data_spec({"format": "voc", "path": str(DIOR), "annotations": "Annotations/Oriented_Bounding_Boxes",
                            "gsd": 0.5, "size": 512, "classes": CLASSES,
                            "split": {"fractions": [1, 0, 0]}})  # fmt: skip
    source = open_dataset(spec, "train", SPECS, train=False)
    # 800 px at 0.5 m -> 0.625 m: chips of 512 px = 640 image pixels, 2 x 2 of them
    assert len(source) == 4 and source.describe()["gsd"] == {"hr": 0.625}
    label = source.get(0)["label"]
    # the golf course (x 133-684, y 237-672) in the first chip (0-640): its visible 507 x 403 px (85 %, so trained
    # on) scaled by 0.5 / 0.625, horizontal (angle exactly 0)
    np.testing.assert_allclose(label["boxes"][0].numpy(), [309.2, 350.8, 405.6, 322.4, 0.0], atol=1e-3)
    assert label["classes"].tolist() == [4] and not label["ignore"].any()


def _copy(tmp: Path, src: Path, names: list[str]) -> Path:
    for name in names:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).symlink_to(src / name)
    return tmp


def test_bad_dota_and_voc_input_is_named_or_counted(tmp_path: Path) -> None:
    root = _copy(tmp_path / "dota", DOTA, ["images/P1888.png"])
    (root / "labelTxt").mkdir()
    good = (DOTA / "labelTxt" / "P1888.txt").read_text().splitlines()
    label = root / "labelTxt" / "P1888.txt"
    label.write_text("\n".join([*good[:3], "1 2 3 4 5 6 small-vehicle 0"]))
    with pytest.raises(DataReadError, match=r"P1888.txt:4: expected 'x1 y1"):
        open_dataset(_dota(path=str(root), split={"fractions": [1, 0, 0]}), "train", SPECS, train=False)
    label.write_text("\n".join([*good[:3], "1 2 3 4 5 6 7 8 airship 0"]))
    with pytest.raises(LabelValueError, match=r"P1888.txt:4: class 'airship' is not among the classes"):
        open_dataset(_dota(path=str(root), split={"fractions": [1, 0, 0]}), "train", SPECS, train=False)
    label.write_text("\n".join(["imagesource:x", "gsd:null", *good[2:]]))
    with pytest.raises(DataReadError, match="no gsd header and no gsd in the data spec"):
        open_dataset(_dota(path=str(root), split={"fractions": [1, 0, 0]}), "train", SPECS, train=False)
    # zero-area and off-image objects are left out, counted and reported; the rest is kept
    label.write_text("\n".join([*good, "5 5 5 5 5 5 5 5 small-vehicle 0", "900 900 950 900 950 950 900 950 ship 0"]))
    source = open_dataset(_dota(path=str(root), split={"fractions": [1, 0, 0]}), "train", SPECS, train=False)
    d = source.describe()
    assert d["skipped_objects"] == {"degenerate": 1, "outside": 1} and d["objects"] == 64
    # VOC: malformed XML, a size that is not the image's
    voc = _copy(tmp_path / "voc", DIOR, ["JPEGImages/00001.jpg"])
    (voc / "Annotations").mkdir()
    xml = (DIOR / "Annotations" / "Oriented_Bounding_Boxes" / "00001.xml").read_text()
    spec = parse_data_spec({"format": "voc", "path": str(voc), "gsd": 0.5, "classes": CLASSES, "size": 512})
    (voc / "Annotations" / "00001.xml").write_text(xml.replace("</annotation>", ""))
    with pytest.raises(DataReadError, match=r"00001\.xml: not a readable VOC XML file"):
        open_dataset(spec, "train", SPECS, train=False)
    (voc / "Annotations" / "00001.xml").write_text(xml.replace("<width>800</width>", "<width>801</width>"))
    with pytest.raises(DataReadError, match=r"<size> says 801 x 800 px"):
        open_dataset(spec, "train", SPECS, train=False)
    (voc / "Annotations" / "00001.xml").write_text(xml.replace("<x_right_top>684</x_right_top>", "<x_right_top/>"))
    with pytest.raises(DataReadError, match=r"object 1: <x_right_top> missing"):
        open_dataset(spec, "train", SPECS, train=False)
    # a horizontal VOC box (DIOR's bndbox) is an axis-aligned box
    hbb = xml.split("<robndbox>")[0] + ("<bndbox><xmin>133</xmin><ymin>237</ymin><xmax>684</xmax><ymax>672</ymax>"
                                        "</bndbox></object></annotation>")  # fmt: skip
    (voc / "Annotations" / "00001.xml").write_text(hbb)
    label = open_dataset(spec, "train", SPECS, train=False).get(0)["label"]
    assert float(label["boxes"][0, 4]) == 0.0
    with pytest.raises(DataSpecError, match="classes are names"):
        parse_data_spec({"format": "voc", "path": str(voc), "classes": {0: "a"}})


def _atlanta(**fields: object):
    return parse_data_spec({
        "format": "vector_boxes", "path": str(ATLANTA / "sample_geotiff.tif"),
        "labels": str(ATLANTA / "geotiff_labels.geojson"), "classes": ["building"], "size": 128,
        "image": {"bands": {"R": 1, "G": 1, "B": 1}, "scale": 0.2594, "offset": -32.69},
    } | fields)  # fmt: skip


@needs_shared("solaris_spacenet6/atlanta_buildings")
def test_georeferenced_polygons_become_boxes_in_spatial_blocks(tmp_path: Path) -> None:
    split = {"fractions": [0.6, 0.2, 0.2], "block": 160, "gap": 8, "seed": 0}
    parts = {s: open_dataset(_atlanta(split=split), s, SPECS, train=False) for s in ("train", "val", "test")}
    counts = {s: p.describe()["class_counts"]["building"] for s, p in parts.items()}
    assert sum(counts.values()) <= 43 and all(counts.values()) and sum(counts.values()) >= 35  # a few in gaps
    hr = parts["train"].get(0)["periods"][0]["hr"]
    assert float(hr["gsd"]) == 0.625 and hr["x"].shape == (1, 3, 128, 128) and hr["valid"].float().mean() > 0.9
    # an image without georeference cannot place polygons: a clear error, not boxes in the wrong place
    plain = tmp_path / "plain.tif"
    with rasterio.open(ATLANTA / "sample_geotiff.tif") as src:
        profile = {k: v for k, v in src.profile.items() if k not in ("crs", "transform")}
        with rasterio.open(plain, "w", **profile) as dst:
            dst.write(src.read())
    with pytest.raises(DataReadError, match="has no georeference"):
        open_dataset(_atlanta(path=str(plain)), "train", SPECS, train=False)
    # polygons somewhere else: both extents named
    far = tmp_path / "far.geojson"
    shutil.copy(ATLANTA / "geotiff_labels.geojson", far)
    far.write_text(far.read_text().replace("EPSG::32616", "EPSG::32617"))
    with pytest.raises(UserError, match="does not overlap the cube's extent"):
        open_dataset(_atlanta(labels=str(far)), "train", SPECS, train=False)


def test_detection_labels_collate_padded() -> None:
    source = open_dataset(_dota(test=["P1888"]), "test", SPECS, train=False)
    samples = [source.get(i) for i in range(3)]
    batch = collate(samples)
    n = [len(s["label"]["classes"]) for s in samples]
    lab = batch["label"]
    assert lab["boxes"].shape == (3, max(n), 5) and lab["classes"].shape == (3, max(n))
    for i, k in enumerate(n):
        assert (lab["classes"][i, k:] == IGNORE).all() and lab["ignore"][i, k:].all()
        torch.testing.assert_close(lab["boxes"][i, :k], samples[i]["label"]["boxes"])
    assert set(to_device(lab, "cpu")) == {"boxes", "classes", "ignore"}
