"""``{output}/report.json``: what a run cost, stage by stage, in numbers users can plan with.

Per stage: wall seconds; CPU seconds (the driver's own plus what the workers report: cube tasks, inference
actors); GPU seconds (the inference actors' model time on CUDA); throughput in km²/h of the job's area; bytes
written (the stage's outputs on storage) and an upper bound of bytes read (the stored inputs it reads); peak memory
of the driver and of the workers that report it; the nodes and actors that did the work. Totals, and an estimated
cost when the job gives prices (``prices: {cpu_hour, gpu_hour}`` in US dollars: cost = CPU-hours x cpu_hour +
GPU-hours x gpu_hour; a cluster's per-node prices divided by its CPUs/GPUs give these).

What is not measured is said, not guessed: the CPU of Dask tasks that run on cluster workers (mosaic, COG and
archive on a cluster) is not reported by Ray's Dask scheduler, so those stages count the driver's CPU only.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import fsspec

from pipeline import storage
from pipeline.memory import peak_rss

if TYPE_CHECKING:
    from pipeline.job.run import RunSummary
    from pipeline.job.stages import JobContext, StageResult

REPORT = "report.json"


def du(url: str) -> int:
    """Bytes stored under ``url`` (a file or a folder, local or an object store); 0 when absent."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return 0
    return int(fs.du(path, total=True)) if fs.isdir(path) else int(fs.size(path))


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class StageMeter:
    """Driver-side measurements of one stage (wall time, CPU, peak memory)."""

    wall0: float = field(default_factory=time.perf_counter)
    cpu0: float = field(default_factory=_cpu_s)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak: int = 0

    def stop(self) -> StageMeter:
        """Close the measurement."""
        self.wall_s, self.cpu_s, self.peak = time.perf_counter() - self.wall0, _cpu_s() - self.cpu0, peak_rss()
        return self


def _inputs(ctx: JobContext, name: str) -> list[str]:
    """The stored inputs a stage reads (for the bytes-read bound)."""
    return {"cube": [], "inference": [ctx.job.cube.path], "mosaic": [ctx.tiles]}.get(name, [ctx.mosaic])


def stage_entry(ctx: JobContext, result: StageResult, meter: StageMeter) -> dict[str, Any]:
    """The report entry of one stage."""
    m = result.metrics
    wrote = result.status not in ("up-to-date", "skipped")
    cpu = meter.cpu_s + float(m.get("worker_cpu_s", 0.0))
    area = ctx.job.area_km2
    return {
        "name": result.name, "status": result.status, "wall_s": round(meter.wall_s, 3), "cpu_s": round(cpu, 3),
        "gpu_s": round(float(m.get("gpu_s", 0.0)), 3),
        "km2_per_h": round(area / meter.wall_s * 3600, 3) if wrote and meter.wall_s > 0 else None,
        "bytes_written": sum(du(p) for p in result.outputs.values()) if wrote else 0,
        "bytes_read_max": sum(du(p) for p in _inputs(ctx, result.name)) if wrote else 0,
        "peak_rss_driver": meter.peak, "peak_rss_worker": int(m.get("worker_peak_rss", 0)) or None,
        "nodes": list(result.nodes), "actors": int(m.get("actors", 0)) or None,
    }  # fmt: skip


def write_report(ctx: JobContext, summary: RunSummary, entries: list[dict[str, Any]], started: datetime) -> dict:
    """Assemble, save (``{output}/report.json``) and return the run's report."""
    wall = sum(e["wall_s"] for e in entries)
    cpu = sum(e["cpu_s"] for e in entries)
    gpu = sum(e["gpu_s"] for e in entries)
    report: dict[str, Any] = {
        "job": summary.job, "area_km2": round(summary.area_km2, 6), "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "exit_code": summary.exit_code,
        "stages": entries,
        "total": {
            "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "gpu_s": round(gpu, 3),
            "km2_per_h": round(summary.area_km2 / wall * 3600, 3) if wall > 0 else None,
            "bytes_written": sum(e["bytes_written"] for e in entries),
            "peak_rss_driver": max((e["peak_rss_driver"] for e in entries), default=0),
            "peak_rss_worker": max((e["peak_rss_worker"] or 0 for e in entries), default=0) or None,
            "nodes": sorted({n for e in entries for n in e["nodes"]}),
        },
    }  # fmt: skip
    prices = ctx.job.prices
    if prices is not None:
        usd = cpu / 3600 * (prices.cpu_hour or 0.0) + gpu / 3600 * (prices.gpu_hour or 0.0)
        report["cost"] = {"usd": round(usd, 4), "cpu_hour": prices.cpu_hour, "gpu_hour": prices.gpu_hour}
    storage.write_json(storage.join(ctx.output, REPORT), report, indent=2)
    return report


def format_report(report: dict[str, Any]) -> str:
    """Two lines for the run summary: totals and throughput, and the cost when priced."""
    t = report["total"]
    rate = f"{t['km2_per_h']:.1f} km2/h" if t["km2_per_h"] else "-"
    line = (f"report     {t['wall_s']:.1f} s wall, {t['cpu_s']:.1f} CPU-s, {t['gpu_s']:.1f} GPU-s, {rate}, "
            f"{t['bytes_written'] / 2**20:.1f} MiB written, {len(t['nodes']) or 1} node(s)")  # fmt: skip
    if "cost" in report:
        line += f"\n           estimated cost ${report['cost']['usd']:.4f}"
    return line
