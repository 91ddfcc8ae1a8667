"""Real embedding archives for the archive tests: real jobs (local Ray) with the committed tiny checkpoint.

* ``slovenia_archives``: the eo-learn Slovenia patch (64 x 64 px of real S2 L1C, a nodata corner) as two embeddings
  jobs over one cube, one per clear date (2015-07-11; 2015-08-30 + 2015-09-09), each writing its own archive.
* ``sen1floods11_archive``: a 96 x 96 px window of the real Sen1Floods11 chip (S2 + S1, EPSG:32630) built by the
  cube builder from the shared GeoTIFFs, embedded by a real job; the chip's hand-drawn water mask is the label source.

Use with ``pytest_plugins = ["archive_fixtures"]``. Skips without the shared data or the committed checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from infer_fixtures import write_cube, write_job

from pipeline.job.run import run_job
from pipeline.spec import load_job

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "skysense_v2_tiny_ssl.pt"
S1F_LABELS = "sen1floods11/LabelHand/Spain_7370579_LabelHand.tif"
S1F_WINDOW = (-0.7700, 38.0950, -0.7600, 38.1030)  # ~0.9 x 0.9 km of the chip with river water and land


def _checkpoint() -> str:
    if not CHECKPOINT.exists():
        pytest.skip(f"{CHECKPOINT} is absent")
    return str(CHECKPOINT)


def _run(job_file: Path) -> Path:
    summary = run_job(load_job(job_file), progress=False)
    assert summary.exit_code == 0, summary.format()
    return Path(load_job(job_file).output_path)


@pytest.fixture(scope="session")
def slovenia_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"july": job folder, "september": job folder, "cube": cube}``; each job folder has ``archive/``."""
    root = tmp_path_factory.mktemp("slovenia-archives")
    checkpoint = _checkpoint()
    cube = write_cube(root / "cube.zarr", size=(64, 64))
    out = {"cube": Path(cube)}
    periods = {"july": ("2015-07-01", "2015-07-20"), "september": ("2015-08-25", "2015-09-15")}
    for name, (start, end) in periods.items():
        job = write_job(root / f"{name}.yaml", cube, str(root / name), checkpoint, name=f"slovenia-{name}",
                        time={"start": start, "end": end}, tiles={"size": 64, "overlap": 16})  # fmt: skip
        out[name] = _run(job)
    return out


@pytest.fixture(scope="session")
def sen1floods11_archive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"job": job folder (archive/ inside), "cube": cube, "labels": LabelHand GeoTIFF}``."""
    from test_cube_support import s1f_items, s1f_sources

    from pipeline.cube import build_cube

    root = tmp_path_factory.mktemp("s1f-archive")
    checkpoint = _checkpoint()
    cube = str(root / "cube.zarr")
    build_cube(cube, s1f_items(), s1f_sources(), region=S1F_WINDOW, chunks=(64, 64), progress=False)
    job = {
        "name": "s1f-embeddings", "region": list(S1F_WINDOW), "time": {"start": "2019-09-17", "end": "2019-09-19"},
        "catalog": "local", "modalities": ["s2", "s1"], "cube": {"path": cube, "chunks": {"y": 64, "x": 64}},
        "checkpoint": checkpoint, "output": {"kind": "embeddings", "path": str(root / "job")},
        "tiles": {"size": 64, "overlap": 16}, "batch_size": 2, "actors": 1, "gpus_per_actor": 0,
    }  # fmt: skip
    (root / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    from shared_data import shared_path

    return {"job": _run(root / "job.yaml"), "cube": Path(cube), "labels": shared_path(S1F_LABELS)}


def label_points(labels_tif: Path, bbox: tuple[float, float, float, float], per_class: int, seed: int = 0):
    """``per_class`` random water / not-water pixel centres of the Sen1Floods11 hand labels inside ``bbox``.

    Returns a GeoDataFrame (EPSG:4326) with a ``class`` column (``water`` / ``land``).
    """
    import geopandas as gpd

    with rasterio.open(labels_tif) as src:
        window = rasterio.windows.from_bounds(*bbox, transform=src.transform).round_offsets().round_lengths()
        lab = src.read(1, window=window)
        transform = src.window_transform(window)
    rng = np.random.default_rng(seed)
    rows = []
    for value, name in ((1, "water"), (0, "land")):
        r, c = np.nonzero(lab == value)
        # stay a few pixels off the window's edge (the embedding grid is another CRS)
        inner = (r > 3) & (c > 3) & (r < lab.shape[0] - 4) & (c < lab.shape[1] - 4)
        r, c = r[inner], c[inner]
        pick = rng.choice(len(r), size=min(per_class, len(r)), replace=False)
        xs, ys = rasterio.transform.xy(transform, r[pick], c[pick])
        rows += [{"class": name, "x": x, "y": y} for x, y in zip(xs, ys)]
    frame = gpd.GeoDataFrame(rows, geometry=gpd.points_from_xy([r["x"] for r in rows], [r["y"] for r in rows]),
                             crs="EPSG:4326")  # fmt: skip
    return frame.drop(columns=["x", "y"])
