"""``skypipe status``: what is done per stage of a job, read from the stages' own records (no Ray, no model)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pipeline import storage
from pipeline.job.stages import CubeStage, JobContext, PostStage, job_stages
from pipeline.spec import JobSpec


def job_status(job: JobSpec) -> dict[str, Any]:
    """Per stage: the cube's state and chunks, tiles done/skipped/failed/pending, later outputs present and fresh."""
    from pipeline.cube import layout
    from pipeline.lease import lease_state

    job = job.with_checkpoint_kind()
    ctx = JobContext(job, progress=False)
    out: dict[str, Any] = {"job": job.name, "output": ctx.output, "lease": lease_state(ctx.output)}
    state = layout.cube_state(job.cube.path, list(job.modalities))
    cube: dict[str, Any] = {"path": job.cube.path, "state": state, "chunks": {}, "problems": []}
    if state != "missing":
        for m in job.modalities:
            progress = layout.chunk_progress(job.cube.path, m) if m in layout.cube_modalities(job.cube.path) else None
            if progress is not None:
                cube["chunks"][m] = progress
    if state == "complete":
        try:
            cube["problems"] = CubeStage(ctx).problems()
        except ValueError as err:  # beyond the job's limits: the run fails with this message
            cube["problems"] = [f"FATAL: {err}"]
    out["cube"] = cube
    out["tiles"] = _tiles(ctx)
    stages = {}
    for stage in job_stages(ctx):
        if isinstance(stage, PostStage):
            fresh = out["tiles"]["present"] and stage.fresh()
            stages[stage.name] = {
                name: {"path": path, "present": storage.exists(path), "up_to_date": fresh}
                for name, path in stage.outputs().items()
            }
    out["stages"] = stages
    out["report"] = storage.read_json(storage.join(ctx.output, "report.json"), default=None)
    return out


def _tiles(ctx: JobContext) -> dict[str, Any]:
    from pipeline.infer.store import TileManifest, counts

    tiles: dict[str, Any] = {"path": ctx.tiles, "present": storage.exists(ctx.tiles)}
    if not tiles["present"]:
        return tiles
    import zarr

    n = int(zarr.open_group(storage.store_path(ctx.tiles), mode="r").attrs.get("n_tiles", 0))
    records = TileManifest(ctx.output).read_all()
    tiles.update(total=n, **counts(records, n))
    tiles.update(rate(records, tiles["pending"]))
    tiles["failed_tiles"] = {t: r.get("error") for t, r in records.items() if r.get("status") == "failed"}
    return tiles


RATE_WINDOW = 50
"""Tiles (the most recently finished) that the rate and ETA of ``skypipe status`` are measured over."""


def rate(records: dict[int, dict[str, Any]], pending: int) -> dict[str, Any]:
    """Tiles per hour over the last :data:`RATE_WINDOW` finished tiles, and the ETA of the ``pending`` ones.

    Measured from the tiles' ``finished_at`` stamps, so it reflects the run now going (or the last one): the time
    between the first and the last of the window, over the tiles finished after the first. ``None`` without two
    stamps.
    """
    stamps = sorted(datetime.fromisoformat(r["finished_at"]) for r in records.values() if r.get("finished_at"))
    window = stamps[-RATE_WINDOW:]
    if len(window) < 2 or window[-1] <= window[0]:
        return {"tiles_per_h": None, "eta_s": None, "last_finished": stamps[-1].isoformat() if stamps else None}
    per_s = (len(window) - 1) / (window[-1] - window[0]).total_seconds()
    return {"tiles_per_h": round(per_s * 3600, 1), "eta_s": round(pending / per_s, 1) if pending else 0.0,
            "last_finished": window[-1].isoformat(timespec="seconds")}  # fmt: skip


def format_status(status: dict[str, Any]) -> str:
    """Text rendering of :func:`job_status`."""
    cube = status["cube"]
    lines = [f"job {status['job']}  (outputs in {status['output']})"]
    lease = status.get("lease")
    if lease:
        since = datetime.fromtimestamp(lease["started"], timezone.utc).isoformat(timespec="seconds")
        who = f"host {lease['host']} pid {lease['pid']} since {since}"
        lines.append(f"  running    {who}" if not lease["gone"] else f"  stopped    {who} ({lease['gone']}): resumable")
    lines.append(f"  cube       {cube['state']:<11} {cube['path']}")
    for m, c in cube["chunks"].items():
        failed = f", {c['failed']} failed" if c["failed"] else ""
        lines.append(f"    [{m}] chunks {c['done']}/{c['total']}{failed}")
    lines.extend(f"    problem: {p}" for p in cube["problems"])
    t = status["tiles"]
    if t["present"]:
        lines.append(
            f"  tiles      {t['done']} done, {t['skipped']} skipped, {t['failed']} failed, {t['pending']} pending"
            f" of {t['total']}  {t['path']}"
        )
        if t.get("tiles_per_h"):
            eta = f", ETA {_duration(t['eta_s'])}" if t["pending"] else ""
            lines.append(f"    {t['tiles_per_h']:.0f} tiles/h (last finished {t['last_finished']}){eta}")
        lines.extend(f"    tile {k}: {v}" for k, v in sorted(t["failed_tiles"].items()))
    else:
        lines.append(f"  tiles      none yet    {t['path']}")
    for outputs in status["stages"].values():
        for name, s in outputs.items():
            word = ("up to date" if s["up_to_date"] else "stale") if s["present"] else "missing"
            lines.append(f"  {name:<10} {word:<11} {s['path']}")
    if status.get("report"):
        from pipeline.job.report import format_report

        lines.append(f"  last run finished {status['report']['finished']}:")
        lines.append("  " + format_report(status["report"]))
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    h, rest = divmod(int(seconds), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"
