"""A job's whole journey: its stages in order, one protocol, one resume record, one writer at a time.

``run_job`` takes the output folder's lease (a second run of the same job on the same output refuses clearly
instead of writing alongside), then for every stage of :func:`pipeline.job.stages.job_stages`: up to date -> skip,
else run it and record it in ``{output}/stages.json`` once its outputs are complete. Every stage resumes: the cube
builder and the inference stage skip finished chunks / tiles, and the stages after inference are redone only when
the set of finished tiles changed since they last ran. Outputs of a job, under ``output.path`` (default
``outputs/<job name>``)::

    tiles.zarr, manifest/tiles/      inference tile store and per-tile records (pipeline.infer.store)
    mosaic.zarr                      stitched, blended output grid
    <kind>.tif, classes.tif          COG of the mosaic (and of the class map for class outputs)
    areas.csv, areas.json            area per class (class outputs; also printed in the summary)
    polygons.parquet                 class polygons, GeoParquet (class outputs)
    tile_labels.parquet              one label per tile, GeoParquet (classification)
    archive/                         embedding archive (embeddings only)
    quicklook.png                    picture of the mosaic
    stages.json                      the resume record
    report.json                      what the run cost: time, CPU/GPU seconds, km2/h, bytes, memory, nodes
                                     per stage (pipeline.job.report)
    manifest/nodes/<stage>/          which cluster nodes did each stage's work (pipeline.job.cluster)

The run's outcome is an exit code (:mod:`pipeline.errors`): 0 success, 3 a partial result (some inputs could not
be read; listed), 1 a failed run (failed tiles without ``allow_failed``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tqdm.auto import tqdm

from pipeline.errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL
from pipeline.job.report import StageMeter, format_report, stage_entry, write_report
from pipeline.job.stages import JobContext, Stage, StageResult, job_stages
from pipeline.lease import OutputLease
from pipeline.spec import JobSpec

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What ``skypipe run`` did."""

    job: str
    area_km2: float = 0.0
    stages: list[StageResult] = field(default_factory=list)
    report: dict[str, Any] | None = None  # report.json of the run (pipeline.job.report)

    @property
    def problems(self) -> list[str]:
        """Inputs that could not be read (a partial result)."""
        return [p for s in self.stages for p in s.problems]

    @property
    def failed(self) -> dict[int, str]:
        """Tiles that failed."""
        return {t: e for s in self.stages for t, e in s.failed.items()}

    @property
    def ok(self) -> bool:
        """No tile failed and every input was read."""
        return not self.failed and not self.problems

    @property
    def exit_code(self) -> int:
        """0 success, 3 partial result, 1 failed (see :mod:`pipeline.errors`)."""
        if any(s.status == "skipped" for s in self.stages):
            return EXIT_FAILED
        return EXIT_PARTIAL if (self.failed or self.problems) else EXIT_OK

    def format(self) -> str:
        """Human summary: area, tiles, rates, time per stage, outputs and lines of the stages, then what failed.

        Stages add their own lines (:attr:`StageResult.summary`: e.g. the area per class of a class map).
        """
        lines = [f"job {self.job}: {self.area_km2:.2f} km2"]
        for s in self.stages:
            lines.append(f"  {s.name:<10} {s.status:<12} {s.seconds:8.1f} s  {s.detail}".rstrip())
            lines.extend(f"  {'':<10} {k:<12} {v}" for k, v in s.outputs.items())
            lines.extend(f"  {'':<10} {line}" for line in s.summary)
        if self.report is not None:
            lines.append("  " + format_report(self.report))
        if self.failed:
            lines.append(f"FAILED tiles ({len(self.failed)}):")
            lines.extend(f"  tile {t}: {e}" for t, e in sorted(self.failed.items()))
        if self.problems:
            lines.append(f"PARTIAL RESULT: {len(self.problems)} input problem(s); these pixels are nodata:")
            lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)


def run_job(
    job: JobSpec,
    *,
    address: str | None = None,
    progress: bool = True,
    allow_failed: bool = False,
    max_attempts: int = 3,
    break_lease: bool = False,
    dashboard: bool = False,
) -> RunSummary:
    """Run (or resume) every stage of ``job``; see the module docstring.

    Args:
        job: the validated job spec.
        address: Ray cluster address (default: ``$RAY_ADDRESS``, else a local Ray on 127.0.0.1).
        progress: progress bars.
        allow_failed: go on to the mosaic when tiles failed (the result is then partial).
        max_attempts: attempts per tile before it is recorded failed.
        break_lease: take over the output folder from a run that is known to be dead.
        dashboard: start the local Ray's dashboard on 127.0.0.1 (a cluster has its own).

    Raises:
        LeaseHeldError: another run is writing this job's outputs.
        InputsUnreadableError: the job's inputs could not be read beyond its limits.
    """
    from pipeline.memory import single_arena

    single_arena()  # library callers too (the CLI already did): see pipeline.memory
    job = job.with_checkpoint_kind()
    ctx = JobContext(job, address=address, progress=progress, max_attempts=max_attempts, break_lease=break_lease,
                     dashboard=dashboard)  # fmt: skip
    summary = RunSummary(job=str(job.name), area_km2=job.area_km2)
    started = datetime.now(timezone.utc)
    entries: list[dict[str, Any]] = []
    try:
        with OutputLease(ctx.output, what=f"outputs of job {job.name!r}", force=break_lease) as lease:
            stages = job_stages(ctx)
            bar = tqdm(stages, desc="stages", unit="stage", disable=not progress)
            for stage in bar:
                bar.set_description(stage.name)
                meter = StageMeter()
                result = _run_stage(stage, ctx, lease)
                entries.append(stage_entry(ctx, result, meter.stop()))
                summary.stages.append(result)
                summary.area_km2 = result.metrics.get("area_km2", summary.area_km2)
                if result.failed and not allow_failed:
                    why = "tiles failed; fix and rerun (or --allow-failed to mosaic the finished ones)"
                    summary.stages.append(StageResult("mosaic", "skipped", detail=why))
                    break
            bar.close()
            summary.report = write_report(ctx, summary, entries, started)
    finally:
        ctx.cluster.close()
    return summary


def _run_stage(stage: Stage, ctx: JobContext, lease: OutputLease) -> StageResult:
    """Skip ``stage`` when it is up to date, else run it and record it once its outputs are complete."""
    if stage.fresh():
        return stage.up_to_date()
    result = stage.run()
    if result.status != "up-to-date":  # nothing new: the record stays as it was
        lease.check()  # a run whose lease was taken over (it was thought dead) must not record its work
        ctx.record.save(stage.name, **stage.record_entry(result))
    return result
