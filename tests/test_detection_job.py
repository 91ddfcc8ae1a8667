"""Region detection on the real georeferenced Atlanta image: tiles' boxes merged across tile borders (an object
straddling a border is reported once), GeoParquet in the scene's CRS with class counts and a quicklook, and a job
killed mid-inference resumes to the same GeoParquet as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import psutil
import pytest
import shapely
import yaml
from affine import Affine
from shared_data import needs_shared, shared_path

from pipeline.catalog.index import UngeoreferencedError, index_recipe
from pipeline.catalog.recipe import load_recipe
from pipeline.finetune.data.boxes import Skipped, geometries_to_objects
from pipeline.geometry import obb_to_polygons, polygons_to_obb, rotated_iou
from pipeline.infer.store import TileManifest, open_or_create_store, tiles_url, write_detections
from pipeline.infer.tiling import origins_array, plan_tiles
from pipeline.job.run import _run_stage
from pipeline.job.stages import DetectionsStage, JobContext
from pipeline.kinds import get_kind
from pipeline.lease import OutputLease
from pipeline.mosaic.detections import detections_table
from pipeline.spec import load_job

pytestmark = [needs_shared("solaris_spacenet6/atlanta_buildings")]

ATLANTA = shared_path("solaris_spacenet6/atlanta_buildings")
REPO = Path(__file__).resolve().parents[1]
CRS = "EPSG:32616"
GRID = Affine(0.625, 0.0, 733600.0, 0.0, -0.625, 3725140.0)  # the job's HR output grid (0.625 m, 10 m aligned)
TILE, OVERLAP, RATIO = 24, 8, 16  # 10 m cells; 16 output pixels per cell


def _buildings() -> np.ndarray:
    """The 43 building polygons as boxes in output-grid pixels (their minimum-area rectangles)."""
    gdf = gpd.read_file(ATLANTA / "geotiff_labels.geojson").to_crs(CRS)
    pixels = shapely.transform(gdf.geometry.values, lambda xy: np.stack(~GRID @ (xy[:, 0], xy[:, 1]), 1))
    objects = geometries_to_objects(np.asarray(pixels), [0] * len(gdf), [False] * len(gdf), (720, 720),
                                    [""] * len(gdf), Skipped())  # fmt: skip
    return objects.boxes


def _write_store(out: Path) -> tuple[list, np.ndarray]:
    """A detection tile store over the Atlanta grid whose tiles 'detect' the real buildings they see.

    A tile reports a building it sees whole (slightly shifted, with its own score, as another forward pass would
    box it), and the visible part of one it sees only in part (a building cut by the tile's edge).
    """
    tiles = plan_tiles(45, 45, TILE, OVERLAP, 8)
    kind = get_kind("detection")
    attrs = {
        "grid": {"crs": CRS, "transform": list(GRID)[:6], "height": 720, "width": 720},
        **kind.store_attrs(["building"]), "channels": ["building"], "tile_size": TILE * RATIO,
        "overlap": OVERLAP * RATIO, "margin": 2 * RATIO, "context_radius": 8, "output_ratio": RATIO,
        "n_tiles": len(tiles), "provenance": {"model": "test", "checkpoint": "none", "time": ["2016-01-01"] * 2},
    }  # fmt: skip
    open_or_create_store(tiles_url(str(out)), attrs, origins_array(tiles) * RATIO)
    buildings = _buildings()
    polys = shapely.polygons(obb_to_polygons(buildings))
    rng = np.random.default_rng(0)
    manifest = TileManifest(str(out))
    for t in tiles:
        r0, c0, s = t.row * RATIO, t.col * RATIO, TILE * RATIO
        foot = shapely.box(c0, r0, min(c0 + s, 720), min(r0 + s, 720))
        seen = shapely.intersection(polys, foot)
        frac = shapely.area(seen) / shapely.area(polys)
        rows = []
        for i in np.flatnonzero(frac > 0.05):
            if frac[i] > 0.999:
                box = buildings[i] + [rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), 0, 0, 0]
            else:
                box = geometries_to_objects(seen[i : i + 1], [0], [False], (720, 720), [""], Skipped()).boxes[0]
            rows.append([*box, rng.uniform(0.5, 0.95)])
        d = np.array(rows).reshape(-1, 6)
        order = np.argsort(-d[:, 5], kind="stable")
        d = d[order]
        write_detections(str(out), t.id, {
            "tile_id": np.full(len(d), t.id), "det": np.arange(len(d)), "class_id": np.zeros(len(d), int),
            "score": d[:, 5], "cx": d[:, 0], "cy": d[:, 1], "w": d[:, 2], "h": d[:, 3], "angle": d[:, 4],
        }, {"nms_iou": 0.1})  # fmt: skip
        manifest.write({"tile_id": t.id, "index": t.id, "status": "done", "finished_at": "2026-01-01T00:00:00"})
    return tiles, buildings


def test_a_building_on_a_tile_border_is_reported_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    tiles, buildings = _write_store(out)
    feet = [shapely.box(t.col * RATIO, t.row * RATIO, (t.col + TILE) * RATIO, (t.row + TILE) * RATIO) for t in tiles]
    polys = shapely.polygons(obb_to_polygons(buildings))
    straddling = [i for i, p in enumerate(polys) if any(p.intersects(f.boundary) for f in feet)]
    assert len(straddling) >= 3  # the real scene has buildings across tile borders
    table = detections_table(tiles_url(str(out)), job="t")
    assert table.crs.to_epsg() == 32616 and (table["class"] == "building").all()
    # every building once: each output box matches exactly one building and every building is matched
    back = np.stack([table["geometry"].apply(lambda g: np.asarray(g.exterior.coords)[:4]).tolist()])[0]
    pix = np.stack(~GRID @ (back[..., 0], back[..., 1]), -1)
    iou = rotated_iou(polygons_to_obb(pix), buildings)
    assert len(table) == len(buildings)
    assert sorted(iou.argmax(1).tolist()) == list(range(len(buildings))) and (iou.max(1) > 0.5).all()
    # each tile reported its own view of the border buildings: there were duplicates and cut pieces to merge
    raw = sum(len(pd.read_parquet(p)) for p in (out / "detections").glob("*.parquet"))
    assert raw > len(buildings) + len(straddling)

    # the stage writes the table and puts the count per class into the run summary
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "t", "region": [-84.4813, 33.6365, -84.4766, 33.6403], "time": {"start": "2016-01-01",
        "end": "2016-01-01"}, "catalog": "local-atlanta", "modalities": ["hr"], "crs": CRS,
        "cube": {"path": str(tmp_path / "cube.zarr")}, "checkpoint": "skysense_v2_tiny",
        "output": {"kind": "detection", "path": str(out), "class_names": ["building"]},
    }))  # fmt: skip
    ctx = JobContext(load_job(job), progress=False)
    with OutputLease(ctx.output, what="test outputs") as lease:
        result = _run_stage(DetectionsStage(ctx), ctx, lease)
    assert result.status == "done" and f"building  {len(buildings):>8,}" in "\n".join(result.summary)
    written = gpd.read_parquet(out / "detections.parquet")
    assert written.crs.to_epsg() == 32616 and len(written) == len(buildings)


@needs_shared("detection/dota")
def test_an_image_without_georeference_cannot_enter_a_region_job(tmp_path: Path) -> None:
    # a region job reads its imagery through a catalog; DOTA's PNGs have no georeference, so indexing them refuses
    # with the file named, instead of placing detections at made-up coordinates
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"collections": {"dota": {
        "root": str(shared_path("detection/dota")), "glob": "images/*.png", "asset": "image",
        "datetime": {"fixed": "2020-01-01T00:00:00Z"}}}}))  # fmt: skip
    with pytest.raises(UngeoreferencedError, match=r"P0706\.png: no georeference"):
        index_recipe(load_recipe(recipe), tmp_path / "catalog")


SKYPIPE = [sys.executable, "-m", "pipeline.cli"]


def _env(catalog: Path) -> dict[str, str]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1",
           "SKYPIPE_LOCAL_CATALOG": str(catalog), "OMP_NUM_THREADS": "1"}  # fmt: skip
    for k in ("RAY_ADDRESS", "SKYPIPE_FAULT_TILES"):
        env.pop(k, None)
    return env


def _kill_tree(proc: subprocess.Popen) -> None:
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=15)
    for p in alive:
        p.kill()


@pytest.mark.slow
def test_region_detection_job_merges_tiles_and_resumes_identically(tmp_path: Path) -> None:
    from infer_fixtures import write_checkpoint

    from pipeline.finetune.loop import run_loop
    from pipeline.finetune.spec import parse_finetune

    catalog = tmp_path / "catalog"
    index_recipe(load_recipe(REPO / "catalogs" / "local-atlanta-index.yaml"), catalog)
    # a micro model with a briefly trained head that boxes generously (score threshold 0.05): many boxes per
    # tile, so the overlaps of neighbouring tiles are full of duplicates to merge
    backbone = write_checkpoint(tmp_path / "micro.pt")
    data = {"format": "vector_boxes", "path": str(ATLANTA / "sample_geotiff.tif"),
            "labels": str(ATLANTA / "geotiff_labels.geojson"), "classes": ["building"], "size": 128,
            "image": {"bands": {"R": 1, "G": 1, "B": 1}, "scale": 0.2594, "offset": -32.69}}  # fmt: skip
    spec = parse_finetune({"name": "atl", "task": "detection", "backbone": backbone, "modalities": ["hr"],
                           "data": data, "steps": 3, "batch_size": 2, "eval_every": 3, "storage": str(tmp_path / "ft"),
                           "head": {"width": 16, "convs": 1, "score_threshold": 0.05}})  # fmt: skip
    run_loop(spec, progress=False)

    def job(name: str) -> Path:  # the shipped job, on this model, cube and output folder
        path = tmp_path / f"{name}.yaml"
        spec = yaml.safe_load((REPO / "jobs" / "detection-atlanta.yaml").read_text())
        spec |= {"checkpoint": str(tmp_path / "ft" / "model.pt"), "batch_size": 1,
                 "cube": {"path": str(tmp_path / "cube.zarr"), "chunks": {"y": 256, "x": 256}},
                 "output": {"path": str(tmp_path / name)}}  # fmt: skip
        path.write_text(yaml.safe_dump(spec))
        return path

    env = _env(catalog)
    ref = subprocess.run([*SKYPIPE, "run", str(job("ref")), "--no-progress"], env=env, capture_output=True,
                         text=True, timeout=900, cwd=tmp_path)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "9 tiles: 9 done" in ref.stdout and "building" in ref.stdout and "total" in ref.stdout
    table = gpd.read_parquet(tmp_path / "ref" / "detections.parquet")
    assert table.crs.to_epsg() == 32616 and len(table) > 0 and {"class", "score", "tile_id", "model"} <= set(table)
    assert (tmp_path / "ref" / "quicklook.png").stat().st_size > 0
    # no duplicate across tile borders: no two kept boxes of different tiles overlap beyond the NMS threshold,
    # although the tiles' own boxes did
    t = ~Affine(*GRID[:6])
    corners = np.stack([np.asarray(g.exterior.coords)[:4] for g in table.geometry])
    boxes = polygons_to_obb(np.stack(t @ (corners[..., 0], corners[..., 1]), -1))
    iou = rotated_iou(boxes, boxes)
    other = table["tile_id"].to_numpy()[:, None] != table["tile_id"].to_numpy()[None]
    assert not (iou[other] > 0.1 + 1e-6).any()
    raw = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "ref" / "detections").glob("*.parquet"))])
    assert len(raw) > len(table)

    # killed once a tile is done, then run again: the same GeoParquet, byte for byte
    killed = job("killed")
    proc = subprocess.Popen([*SKYPIPE, "run", str(killed), "--no-progress"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    records = tmp_path / "killed" / "manifest" / "tiles"
    deadline = time.monotonic() + 600
    try:
        while not (records.exists() and 1 <= len(list(records.glob("*.json"))) < 9):
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline, "no tile finished in time"
            time.sleep(0.05)
    finally:
        _kill_tree(proc)
    assert not (tmp_path / "killed" / "detections.parquet").exists()  # killed during inference
    resumed = subprocess.run([*SKYPIPE, "run", str(killed), "--no-progress"], env=env, capture_output=True,
                             text=True, timeout=900, cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from earlier runs" in resumed.stdout
    a, b = ((tmp_path / n / "detections.parquet").read_bytes() for n in ("ref", "killed"))
    assert a == b
