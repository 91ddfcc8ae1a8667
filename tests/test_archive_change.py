"""Change from embeddings between two real dates of the Slovenia patch (committed checkpoint, two real jobs)."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from infer_fixtures import write_checkpoint, write_job

from pipeline.cli import main as cli
from pipeline.mosaic.archive import append_to_archive
from pipeline.mosaic.cog import cog_info
from pipeline.mosaic.embchange import embedding_change, otsu_threshold

pytest_plugins = ["archive_fixtures"]


def test_otsu_splits_two_populations():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 500)])
    assert 0.15 < otsu_threshold(values) < 0.5


def test_change_between_two_dates(slovenia_archives, tmp_path, capsys):
    a, b = slovenia_archives["july"] / "archive", slovenia_archives["september"] / "archive"
    out = tmp_path / "change"
    assert cli(["archive", "change", str(a), str(b), "--out", str(out)]) == 0
    assert "(otsu)" in capsys.readouterr().out
    summary = json.loads((out / "change.json").read_text())
    info = cog_info(out / "distance.tif")
    assert info["valid"] and info["dtype"] == "float32" and info["crs"].to_epsg() == 32633
    with rasterio.open(out / "distance.tif") as src:
        dist = src.read(1)
    ok = np.isfinite(dist)
    assert ok.mean() > 0.8 and not ok[-5:, -5:].any()  # the cube's nodata corner stays no data
    assert (dist[ok] >= -1e-5).all() and (dist[ok] <= 2 + 1e-5).all() and dist[ok].max() > 0.01  # two dates differ
    t = summary["threshold"]
    assert summary["method"] == "otsu" and dist[ok].min() < t < dist[ok].max()
    hot = gpd.read_parquet(out / "hotspots.parquet")
    assert len(hot) == summary["hotspots"] > 0 and hot.crs.to_epsg() == 32633
    assert (hot["mean_distance"] > t).all() and hot["area_m2"].sum() == pytest.approx(summary["hotspot_area_m2"])
    assert (out / "quicklook.png").stat().st_size > 500
    # the same date against itself: zero distance, no hotspot above a given threshold
    same = embedding_change(str(a), str(a) + "/", str(tmp_path / "same"), threshold=0.01)
    assert same["hotspots"] == 0 and same["distance"]["max"] < 1e-5
    # two mosaics of one archive
    import shutil

    shutil.copytree(a, tmp_path / "both")
    append_to_archive(str(tmp_path / "both"), str(slovenia_archives["september"] / "mosaic.zarr"),
                      str(slovenia_archives["september"] / "tiles.zarr"))  # fmt: skip
    within = embedding_change(str(tmp_path / "both"), str(tmp_path / "both"), str(tmp_path / "within"))
    assert within["sources"]["a"]["mosaic"] == "0000" and within["sources"]["b"]["mosaic"] == "0001"
    assert within["threshold"] == pytest.approx(summary["threshold"], rel=1e-3)


def test_archives_of_different_models_are_refused(slovenia_archives, tmp_path, capsys):
    from archive_fixtures import _run

    ckpt = write_checkpoint(tmp_path / "micro.pt")  # another model: a random micro SkySense V2
    job = write_job(tmp_path / "other.yaml", str(slovenia_archives["cube"]), str(tmp_path / "other"), ckpt,
                    name="other-model", time={"start": "2015-08-25", "end": "2015-09-15"},
                    tiles={"size": 64, "overlap": 16})  # fmt: skip
    other = _run(job) / "archive"
    a = slovenia_archives["july"] / "archive"
    assert cli(["archive", "change", str(a), str(other), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to mix embeddings" in err[0] and "checkpoint_sha256" in err[0]
    assert not (tmp_path / "x").exists()
    assert cli(["archive", "change", str(a), str(a), "--out", str(tmp_path / "y")]) == 2
    assert "the same mosaic" in capsys.readouterr().err
