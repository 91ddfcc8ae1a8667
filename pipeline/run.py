"""A job's whole journey: cube (if missing) -> inference -> mosaic -> COG -> archive (embeddings) -> quicklooks.

Every stage resumes: the cube builder and the inference stage skip finished chunks / tiles, and the stages after
inference are redone only when the set of finished tiles changed since they last ran (``{output}/stages.json``).
Outputs of a job, under ``output.path`` (default ``outputs/<job name>``)::

    tiles.zarr, manifest/tiles/      inference tile store and per-tile records (pipeline.infer.store)
    mosaic.zarr                      stitched, blended output grid
    <kind>.tif, classes.tif          COG of the mosaic (and of the class map for segmentation / change)
    archive/                         embedding archive (embeddings only)
    quicklook.png                    picture of the mosaic
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import fsspec
from tqdm.auto import tqdm

from pipeline.infer.runner import InferenceReport, run_inference
from pipeline.infer.store import TileManifest, join, tiles_url
from pipeline.spec import JobSpec

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """One stage of a run: ``done``, ``up-to-date``, ``skipped`` (with the reason) or ``unavailable``."""

    name: str
    status: str
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    detail: str = ""


@dataclass
class RunSummary:
    """What ``skypipe run`` did."""

    job: str
    area_km2: float = 0.0
    stages: list[StageResult] = field(default_factory=list)
    inference: InferenceReport | None = None

    @property
    def ok(self) -> bool:
        """No tile failed."""
        return self.inference is None or not self.inference.failed

    def format(self) -> str:
        """Human summary: area, tiles, rates, time per stage, output paths."""
        lines = [f"job {self.job}: {self.area_km2:.2f} km2"]
        for s in self.stages:
            lines.append(f"  {s.name:<10} {s.status:<12} {s.seconds:8.1f} s  {s.detail}".rstrip())
            lines.extend(f"  {'':<10} {k:<12} {v}" for k, v in s.outputs.items())
        r = self.inference
        if r is not None and r.failed:
            lines.append(f"FAILED tiles ({len(r.failed)}):")
            lines.extend(f"  tile {t}: {e}" for t, e in sorted(r.failed.items()))
        return "\n".join(lines)


def output_paths(job: JobSpec) -> dict[str, str]:
    """Where each stage writes (local paths or URLs)."""
    out = job.output.path or f"outputs/{job.name}"
    paths = {
        "output": out, "tiles": tiles_url(out), "manifest": join(out, "manifest", "tiles"),
        "mosaic": join(out, "mosaic.zarr"), "cog": join(out, f"{job.output.kind}.tif"),
        "quicklook": join(out, "quicklook.png"),
    }  # fmt: skip
    if job.output.kind == "embeddings":
        paths["archive"] = join(out, "archive")
    else:
        paths["classes_cog"] = join(out, "classes.tif")
    return paths


def job_periods(job: JobSpec) -> list[tuple[date | datetime, date | datetime]]:
    """One time range; for change detection ``output.before``/``after``, or ``time`` split at its midpoint [ours]."""
    start, end = job.time.start, job.time.end
    if job.output.kind != "change":
        return [(start, end)]
    if job.output.before is not None and job.output.after is not None:
        return [(job.output.before.start, job.output.before.end), (job.output.after.start, job.output.after.end)]
    if not isinstance(start, datetime) and not isinstance(end, datetime):
        mid = start + (end - start) / 2
        return [(start, mid), (mid + timedelta(days=1), end)]
    s = start if isinstance(start, datetime) else datetime(start.year, start.month, start.day)
    e = end if isinstance(end, datetime) else datetime(end.year, end.month, end.day, 23, 59, 59)
    mid = s + (e - s) / 2
    return [(s, mid), (mid + timedelta(microseconds=1), e)]


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.exists(path))


def cube_state(url: str, modalities: list[str]) -> str:
    """``missing``, ``incomplete`` (a build that did not finish: resumable) or ``complete``."""
    import zarr

    try:
        root = zarr.open_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return "missing"
    missing = [m for m in modalities if m not in root]
    if missing:
        return "missing" if len(missing) == len(modalities) else "incomplete"
    if not _exists(url.rstrip("/") + ".manifest"):
        return "complete"  # written by other means than the builder: nothing to resume
    finished = all("valid_fraction" in root[m].attrs for m in modalities)
    return "complete" if finished else "incomplete"


def _tiles_fingerprint(output: str) -> str:
    records = TileManifest(output).read_all()
    done = sorted((t, r.get("status"), r.get("finished_at")) for t, r in records.items())
    return hashlib.sha256(json.dumps(done, default=str).encode()).hexdigest()


def _stages_state(output: str) -> dict[str, Any]:
    try:
        with fsspec.open(join(output, "stages.json"), "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return {}


def _save_state(output: str, state: dict[str, Any]) -> None:
    with fsspec.open(join(output, "stages.json"), "wb") as f:
        f.write(json.dumps(state, indent=2).encode())


def _post_stages(job: JobSpec, paths: dict[str, str]) -> list[tuple[str, Callable[[], dict[str, str]]]]:
    """The stages after inference as (name, callable returning its outputs)."""
    from pipeline.mosaic.cog import write_cog
    from pipeline.mosaic.quicklook import quicklook
    from pipeline.mosaic.stitch import stitch_tiles

    kind = job.output.kind
    stages: list[tuple[str, Callable[[], dict[str, str]]]] = [
        ("mosaic", lambda: {"mosaic": stitch_tiles(paths["tiles"], paths["mosaic"])}),
    ]

    def cog() -> dict[str, str]:
        out = {"cog": write_cog(paths["mosaic"], paths["cog"])}
        if kind != "embeddings":
            out["classes_cog"] = write_cog(paths["mosaic"], paths["classes_cog"], variable="classes")
        return out

    stages.append(("cog", cog))
    if kind == "embeddings":
        from pipeline.mosaic.archive import build_archive

        stages.append(
            ("archive", lambda: {"archive": build_archive(paths["mosaic"], paths["tiles"], paths["archive"])})
        )
    stages.append(("quicklook", lambda: {"quicklook": quicklook(paths["mosaic"], paths["quicklook"])}))
    return stages


def run_job(
    job: JobSpec,
    *,
    address: str | None = None,
    progress: bool = True,
    allow_failed: bool = False,
    max_attempts: int = 3,
) -> RunSummary:
    """Run (or resume) every stage of ``job``; see the module docstring."""
    paths = output_paths(job)
    summary = RunSummary(job=str(job.name))
    modalities = list(job.modalities)

    start = time.perf_counter()
    state = cube_state(job.cube.path, modalities)
    if state == "complete":
        summary.stages.append(StageResult("cube", "up-to-date", 0.0, {"cube": job.cube.path}))
    else:
        from pipeline.cube.job import build_from_job

        log.info("cube %s is %s: building it", job.cube.path, state)
        report = build_from_job(job, progress=progress)
        failed = sum(len(v) for v in report.failures.values())
        detail = f"{failed} chunk(s) failed (nodata there)" if failed else ""
        summary.stages.append(StageResult("cube", "done", time.perf_counter() - start, {"cube": report.url}, detail))

    r = run_inference(
        cube_url=job.cube.path, output_url=paths["output"], checkpoint=job.checkpoint, kind=job.output.kind,
        modalities=modalities, periods=job_periods(job), tile_size=job.tiles.size, overlap=job.tiles.overlap,
        margin=job.tiles.margin_px, context_radius=job.tiles.context_radius, batch_size=job.batch_size,
        actors=job.actors, gpus_per_actor=job.gpus_per_actor,
        num_classes=job.output.num_classes, class_names=job.output.class_names, address=address,
        max_attempts=max_attempts, batch_timeout=job.batch_timeout_s, progress=progress,
    )  # fmt: skip
    summary.inference, summary.area_km2 = r, r.area_km2
    detail = (
        f"{r.total} tiles: {r.done} done, {r.skipped} skipped (all nodata), {len(r.failed)} failed, "
        f"{r.pending} pending; {r.computed} computed now ({r.tiles_per_s:.2f} tiles/s), {r.resumed} from earlier runs"
    )
    status = "done" if r.computed else "up-to-date"
    summary.stages.append(StageResult("inference", status, r.seconds, {"tiles": r.tiles_url}, detail))

    if r.failed and not allow_failed:
        summary.stages.append(
            StageResult("mosaic", "skipped", detail="tiles failed; fix and rerun (or --allow-failed)")
        )
        return summary
    try:
        stages = _post_stages(job, paths)
    except ImportError as err:
        summary.stages.append(StageResult("mosaic", "unavailable", detail=f"mosaic stage not installed: {err}"))
        return summary
    fingerprint, saved = _tiles_fingerprint(paths["output"]), _stages_state(paths["output"])
    bar = tqdm(stages, desc="mosaic", unit="stage", disable=not progress)
    for name, fn in bar:
        bar.set_description(name)
        prev = saved.get(name) or {}
        if prev.get("fingerprint") == fingerprint and all(_exists(p) for p in prev.get("outputs", {}).values()):
            summary.stages.append(StageResult(name, "up-to-date", 0.0, prev["outputs"]))
            continue
        t0 = time.perf_counter()
        outputs = fn()
        saved[name] = {"fingerprint": fingerprint, "outputs": outputs}
        _save_state(paths["output"], saved)  # only after the stage's outputs are complete
        summary.stages.append(StageResult(name, "done", time.perf_counter() - t0, outputs))
    bar.close()
    return summary


def job_status(job: JobSpec) -> dict[str, Any]:
    """What is done per stage: cube chunks, tiles done/skipped/failed/pending, downstream outputs present."""
    import zarr

    paths = output_paths(job)
    out: dict[str, Any] = {"job": job.name, "cube": {"path": job.cube.path, "state": "missing"}}
    state = cube_state(job.cube.path, list(job.modalities))
    out["cube"]["state"] = state
    if state != "missing":
        from pipeline.cube.manifest import ChunkManifest

        root, manifest = zarr.open_group(job.cube.path, mode="r"), ChunkManifest(job.cube.path)
        chunks = {}
        for m in job.modalities if manifest.plan() is not None else ():  # no plan: not built by the cube stage
            if m in root:
                arr = root[f"{m}/data"]
                total = math.prod(-(-n // c) for n, c in zip(arr.shape, arr.chunks))
                chunks[m] = {"done": len(manifest.statuses(m)), "total": total}
        out["cube"]["chunks"] = chunks
    tiles: dict[str, Any] = {"path": paths["tiles"], "present": _exists(paths["tiles"])}
    if tiles["present"]:
        n = int(zarr.open_group(paths["tiles"], mode="r").attrs.get("n_tiles", 0))
        records = TileManifest(paths["output"]).read_all()
        counts = {s: sum(r.get("status") == s for r in records.values()) for s in ("done", "skipped", "failed")}
        tiles.update(total=n, **counts, pending=n - sum(counts.values()))
        tiles["failed_tiles"] = {t: r.get("error") for t, r in records.items() if r.get("status") == "failed"}
    out["tiles"] = tiles
    saved = _stages_state(paths["output"])
    fingerprint = _tiles_fingerprint(paths["output"]) if tiles["present"] else None
    for key in ("mosaic", "cog", "classes_cog", "archive", "quicklook"):
        if key in paths:
            stage = "cog" if key == "classes_cog" else key
            fresh = (saved.get(stage) or {}).get("fingerprint") == fingerprint
            out[key] = {"path": paths[key], "present": _exists(paths[key]), "up_to_date": fresh}
    return out


def format_status(status: dict[str, Any]) -> str:
    """Text rendering of :func:`job_status`."""
    cube = status["cube"]
    lines = [f"job {status['job']}", f"  cube       {cube['state']:<11} {cube['path']}"]
    for m, c in (cube.get("chunks") or {}).items():
        lines.append(f"    [{m}] chunks {c['done']}/{c['total']}")
    t = status["tiles"]
    if t["present"]:
        lines.append(
            f"  tiles      {t['done']} done, {t['skipped']} skipped, {t['failed']} failed, {t['pending']} pending"
            f" of {t['total']}  {t['path']}"
        )
        lines.extend(f"    tile {k}: {v}" for k, v in sorted(t["failed_tiles"].items()))
    else:
        lines.append(f"  tiles      none yet    {t['path']}")
    for key in ("mosaic", "cog", "classes_cog", "archive", "quicklook"):
        if key in status:
            s = status[key]
            word = ("up to date" if s["up_to_date"] else "stale") if s["present"] else "missing"
            lines.append(f"  {key:<10} {word:<11} {s['path']}")
    return "\n".join(lines)
