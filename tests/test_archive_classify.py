"""Few-shot class maps from a real archive: Sen1Floods11 (S2 + S1, committed checkpoint), labels drawn from the chip's
hand-drawn water mask; the map is checked against that mask, the cross-validation is honest, bad labels are refused."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.warp import Resampling, reproject

from pipeline.cli import main as cli
from pipeline.mosaic.cog import cog_info
from pipeline.mosaic.fewshot import classify_archive

pytest_plugins = ["archive_fixtures"]


@pytest.fixture(scope="module")
def labelled(sen1floods11_archive, tmp_path_factory):
    from archive_fixtures import S1F_WINDOW, label_points

    root = tmp_path_factory.mktemp("labels")
    points = label_points(sen1floods11_archive["labels"], S1F_WINDOW, 12, seed=1)
    path = root / "points.geojson"
    points.to_file(path)
    return {"archive": str(sen1floods11_archive["job"] / "archive"), "points": path, "root": root,
            "mask": sen1floods11_archive["labels"], "frame": points}  # fmt: skip


def test_water_map_from_a_dozen_points_per_class(labelled, tmp_path, capsys):
    out = tmp_path / "fewshot"
    assert (
        cli(["archive", "classify", labelled["archive"], "--labels", str(labelled["points"]), "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "cross-validated accuracy" in printed and "majority-class baseline 0.500" in printed
    probe = json.loads((out / "probe.json").read_text())
    assert probe["labels_per_class"] == {"land": 12, "water": 12} and probe["cv"]["folds"] == 5
    assert probe["cv"]["accuracy"] > 0.75, probe["cv"]  # well above the 0.5 baseline
    # outputs: the writers of segmentation jobs
    info = cog_info(out / "classes.tif")
    assert info["valid"] and info["dtype"] == "uint8" and json.loads(info["tags"]["class_names"]) == ["land", "water"]
    with rasterio.open(out / "classes.tif") as src:
        assert src.colormap(1)[1][:3] != src.colormap(1)[0][:3]
        classes, transform, crs = src.read(1), src.transform, src.crs
    assert cog_info(out / "probabilities.tif")["descriptions"] == ["p(land)", "p(water)"]
    assert (out / "classes.qml").exists() and (out / "quicklook.png").stat().st_size > 1000
    areas = json.loads((out / "areas.json").read_text())
    assert [r["class"] for r in areas["classes"]] == ["land", "water"] and areas["mapped_km2"] > 0.5
    polygons = gpd.read_parquet(out / "polygons.parquet")
    assert set(polygons["class"]) == {"land", "water"} and polygons.crs == crs
    # the map against the whole hand-drawn mask (not only the 24 labelled pixels), on the map's grid
    truth = np.full(classes.shape, -1, dtype=np.int16)
    with rasterio.open(labelled["mask"]) as src:
        reproject(src.read(1), truth, src_transform=src.transform, src_crs=src.crs, dst_transform=transform,
                  dst_crs=crs, resampling=Resampling.nearest, src_nodata=-1, dst_nodata=-1)  # fmt: skip
    ok = (truth >= 0) & (classes != 255)
    accuracy = float(((classes == 1) == (truth == 1))[ok].mean())
    water_recall = float((classes[ok & (truth == 1)] == 1).mean())
    assert ok.sum() > 5000 and accuracy > 0.8 and water_recall > 0.6, (accuracy, water_recall)


def test_polygon_labels_and_knn_probe(labelled, tmp_path):
    frame = labelled["frame"].to_crs("EPSG:32630")
    frame["geometry"] = frame.buffer(15)  # small polygons around the points: ~9 pixels each
    path = tmp_path / "polygons.gpkg"
    frame.to_file(path)
    report = classify_archive(labelled["archive"], str(path), str(tmp_path / "knn"), probe="knn")
    assert report["pixels"] > 3 * 24 and report["cv"]["accuracy"] > 0.7


def test_bad_labels(labelled, tmp_path, capsys):
    def error(labels) -> str:
        assert (
            cli(["archive", "classify", labelled["archive"], "--labels", str(labels), "--out", str(tmp_path / "o")])
            == 2
        )
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    empty = tmp_path / "empty.geojson"
    empty.write_text('{"type": "FeatureCollection", "features": []}')
    assert "holds no labels" in error(empty)
    one = tmp_path / "one.geojson"
    labelled["frame"][labelled["frame"]["class"] == "water"].to_file(one)
    assert "one class only" in error(one) and "['water']" in error(one)
    nocol = tmp_path / "nocol.geojson"
    labelled["frame"].rename(columns={"class": "label"}).to_file(nocol)
    assert "no column 'class'" in error(nocol) and "--class-column" in error(nocol)
    far = tmp_path / "far.geojson"
    gpd.GeoDataFrame({"class": ["a", "b"]}, geometry=gpd.points_from_xy([10, 10.1], [50, 50]), crs="EPSG:4326").to_file(
        far
    )
    assert "no label lies on a mosaic" in error(far)
    single = tmp_path / "single.geojson"
    labelled["frame"].groupby("class").head(1).to_file(single)  # one label per class: a map, but no CV
    report = classify_archive(labelled["archive"], str(single), str(tmp_path / "single"))
    assert report["cv"] is None and "at least 2 labels per class" in report["cv_note"]
    assert not list(tmp_path.glob("o/*"))  # refused runs wrote nothing
