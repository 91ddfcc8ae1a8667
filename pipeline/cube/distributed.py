"""Filling a cube on a Ray cluster: the chunk plan cut into work units that run as Ray tasks on the CPU nodes.

A work unit is one row of chunks of one date of one modality (the same unit a local build gives a thread). Each
task reads its assets with GDAL on its node, writes its chunks straight to the cube store (a local path on one
machine, ``s3://...`` on a cluster) and records every chunk in the build manifest, with the node that wrote it, only
after the chunk's data is written; so a killed driver or a dead worker loses nothing: a task that Ray retries, or a
build started again, first reads the manifest and skips every chunk already recorded. The plan travels once into
the object store (``ray.put``), not once per task. Per-chunk failures behave as in a local build
(:mod:`pipeline.cube.writer`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm.auto import tqdm

from pipeline.cube.manifest import ChunkIndex, ChunkManifest
from pipeline.cube.plan import ModalityPlan
from pipeline.cube.writer import ChunkWriter
from pipeline.memory import peak_rss

log = logging.getLogger(__name__)

TASK_THREADS = 4
"""Reader threads per task: GDAL decoding and HTTP waits release the GIL, so one CPU keeps a few reads in flight."""


def fill_unit(url: str, plan: ModalityPlan, chunks: list[ChunkIndex], threads: int = TASK_THREADS) -> dict[str, Any]:
    """Write the chunks of one work unit that the manifest does not yet record; returns what was done and where."""
    from pipeline.job.cluster import node_id

    t0, cpu0 = time.perf_counter(), time.process_time()
    manifest = ChunkManifest(url)
    recorded = manifest.statuses(plan.name)
    todo = [c for c in chunks if c not in recorded]
    node = node_id()
    writer = ChunkWriter(url, plan, manifest, tqdm(disable=True), node=node)
    writer.run(todo, batch=max(len(todo), 1), workers=threads)
    return {"node": node, "chunks": len(writer.done), "skipped": len(chunks) - len(todo),
            "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0,
            "peak_rss": peak_rss()}  # fmt: skip


def work_units(pending: list[ChunkIndex]) -> list[list[ChunkIndex]]:
    """Pending chunks grouped by (date, chunk row): one unit per row of one date."""
    rows: dict[tuple[int, int], list[ChunkIndex]] = {}
    for c in sorted(pending):
        rows.setdefault(c[:2], []).append(c)
    return list(rows.values())


def fill_on_ray(url: str, plans: dict[str, ModalityPlan], pending_by: dict[str, list[ChunkIndex]], bar: tqdm,
                max_retries: int = 3) -> dict[str, Any]:  # fmt: skip
    """Run every pending chunk as Ray tasks (one per work unit); returns per-modality chunk counts and nodes.

    Ray must be connected (the job's :class:`pipeline.job.cluster.RayCluster`).
    """
    import ray

    from pipeline.job.cluster import cpu_task_options

    remote = ray.remote(num_cpus=1, max_retries=max_retries, **cpu_task_options())(fill_unit)
    refs: dict[Any, tuple[str, int]] = {}
    for name, pending in pending_by.items():
        plan_ref = ray.put(plans[name])
        for unit in work_units(pending):
            refs[remote.remote(url, plan_ref, unit)] = (name, len(unit))
    out: dict[str, Any] = {name: {"written": 0, "nodes": set(), "cpu_s": 0.0, "peak_rss": 0} for name in plans}
    waiting = list(refs)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        name, n = refs[done[0]]
        result = ray.get(done[0])
        out[name]["written"] += result["chunks"]
        out[name]["nodes"].add(result["node"])
        out[name]["cpu_s"] += result["cpu_s"]
        out[name]["peak_rss"] = max(out[name]["peak_rss"], result["peak_rss"])  # of the worker process that ran it
        bar.update(n)
    return out
