"""The stages that write class outputs people act on (areas, polygons, tile labels): they write, resume like the other
stages after inference, and put their lines (the area per class) into the run summary; one real job end to end."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from infer_fixtures import write_checkpoint, write_cube, write_job
from mosaic_fixtures import load_s2_chip, write_tile_store
from test_mosaic_vectors import NAMES, ndvi_scores

from pipeline.infer.store import TileManifest
from pipeline.job.run import RunSummary, _run_stage, run_job
from pipeline.job.stages import (
    AreasStage,
    CogStage,
    JobContext,
    MosaicStage,
    PolygonsStage,
    TileLabelsStage,
)
from pipeline.kinds import get_kind
from pipeline.lease import OutputLease
from pipeline.mosaic.stitch import open_mosaic
from pipeline.palette import CLASS_NODATA
from pipeline.spec import load_job

"""``Segmentation.post_stages()`` with the class outputs (the edit proposed for pipeline/kinds.py)."""


def _run(stages, ctx) -> list:
    with OutputLease(ctx.output, what="test outputs") as lease:
        return [_run_stage(stage, ctx, lease) for stage in stages]


def test_stages_write_resume_and_summarise(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    spec = {"kind": "segmentation", "path": out, "class_names": NAMES}
    job = load_job(write_job(tmp_path / "job.yaml", "cube.zarr", out, "skysense_v2_tiny", output=spec))
    bands, crs, transform = load_s2_chip()
    probs = get_kind("segmentation").activate(torch.from_numpy(ndvi_scores(bands))[None])[0].numpy()
    write_tile_store(out, probs, crs, transform, 32, 8, kind="segmentation", channels=NAMES, statuses={0: "failed"})
    classes = (MosaicStage, CogStage, AreasStage, PolygonsStage, TileLabelsStage)
    ctx = JobContext(job, progress=False)
    first = _run([cls(ctx) for cls in classes], ctx)
    assert [r.status for r in first] == ["done"] * 5
    text = RunSummary("t", stages=first).format()
    areas = pd.read_csv(tmp_path / "out" / "areas.csv")
    for name, km2 in zip(areas["class"], areas["area_km2"]):
        assert f"{name:<6}  {km2:>12.4f}" in text  # the area table is in the run summary
    polygons = gpd.read_parquet(tmp_path / "out" / "polygons.parquet")
    assert f"{len(polygons):,} class polygons" in text and (polygons["job"] == "infer-test").all()
    labels = gpd.read_parquet(tmp_path / "out" / "tile_labels.parquet")
    assert f"{'tiles':<6}  {len(labels):>8,}" in text and 0 not in set(labels["tile_id"])  # tile 0 failed
    with rasterio.open(tmp_path / "out" / "segmentation.tif") as src:
        assert src.descriptions == tuple(f"p({n})" for n in NAMES)
    np.testing.assert_allclose(polygons.groupby("class")["area_m2"].sum()[NAMES].values / 1e6, areas["area_km2"])

    # nothing changed: every stage is up to date, and the summary still shows the tables
    ctx = JobContext(job, progress=False)
    again = _run([cls(ctx) for cls in classes], ctx)
    assert [r.status for r in again] == ["up-to-date"] * 5
    assert [r.summary for r in again] == [r.summary for r in first]

    # a deleted output is rewritten; a tile finished again redoes every stage after inference
    (tmp_path / "out" / "areas.json").unlink()
    ctx = JobContext(job, progress=False)
    statuses = [r.status for r in _run([cls(ctx) for cls in classes], ctx)]
    assert statuses == ["up-to-date", "up-to-date", "done", "up-to-date", "up-to-date"]
    TileManifest(out).write({"tile_id": 3, "index": 3, "status": "done", "finished_at": "2026-01-01T00:00:00"})
    ctx = JobContext(job, progress=False)
    assert not any(cls(ctx).fresh() for cls in classes)


@pytest.mark.slow
def test_segmentation_job_writes_class_outputs(tmp_path: Path) -> None:
    cube = write_cube(tmp_path / "cube.zarr")
    checkpoint = write_checkpoint(tmp_path / "micro.pt")
    out = tmp_path / "out"
    spec = {"kind": "segmentation", "path": str(out), "num_classes": 3}
    job = load_job(write_job(tmp_path / "job.yaml", cube, str(out), checkpoint, output=spec))
    summary = run_job(job, progress=False)
    assert summary.ok, summary.format()
    text = summary.format()
    areas = json.loads((out / "areas.json").read_text())
    names = [r["class"] for r in areas["classes"]]
    assert names == ["class_0", "class_1", "class_2"]
    assert "mapped" in text and all(f"\n{' ' * 13}{n}" in text for n in names)
    mosaic = open_mosaic(str(out / "mosaic.zarr"))
    classes, valid = mosaic["classes"].values, mosaic["valid"].values == 1
    probs = mosaic["data"].values[:, valid]  # the actor stores the kind's activation: probabilities blend to ones
    assert probs.min() >= 0 and probs.max() <= 1
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert areas["mapped_pixels"] == (classes != CLASS_NODATA).sum() and areas["nodata_pixels"] > 0  # nodata corner
    polygons = gpd.read_parquet(out / "polygons.parquet")
    assert polygons.crs.to_epsg() == 32633 and len(polygons) > 0
    assert polygons["area_m2"].sum() == pytest.approx(areas["mapped_km2"] * 1e6)
    with rasterio.open(out / "segmentation.tif") as src:
        assert src.descriptions == tuple(f"p({n})" for n in names)
    again = run_job(job, progress=False)
    assert {r.name: r.status for r in again.stages}["polygons"] == "up-to-date"
    assert "mapped" in again.format()
