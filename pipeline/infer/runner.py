"""The inference driver: plan tiles, skip finished ones, run batches on a pool of Ray actors, survive failures.

Flow: resolve the model (checkpoint, head and classes; no network is built in the driver) -> open or create the
tile store (refusing one written by another job) -> read the manifest and keep the tiles not yet done -> start
``actors`` :class:`InferenceWorker` actors (after checking the cluster can host them) -> dispatch batches with a
``ray.wait`` loop. Each actor gets its next batch together with the one after it, which it starts reading in its
prefetch thread while the model runs.

Failures: a batch whose actor died (``RayActorError``) is requeued tile by tile (so one poisonous tile cannot sink
its neighbours) on whichever actor is live; Ray restarts dead actors (``max_restarts``) and the driver replaces
actors whose restarts are used up; an actor stuck on one batch for ``batch_timeout`` seconds is killed and counts as
dead. A tile that failed ``max_attempts`` times is recorded ``failed`` with its last
error and reported at the end; the run never waits on it forever.

Ray: a local instance pinned to loopback by default; ``address`` (or ``RAY_ADDRESS``) connects to a cluster,
e.g. ``ray://head:10001``. An already initialised Ray connection is reused as is.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from tqdm.auto import tqdm

from pipeline.infer.actor import FAULT_ENV, InferenceWorker, parse_faults
from pipeline.infer.params import InferenceParams
from pipeline.infer.pool import ActorPool
from pipeline.infer.reader import CubeReader, OutputGrid, output_grid
from pipeline.infer.store import FINISHED, TileManifest, counts, open_or_create_store, tiles_url
from pipeline.infer.task import ResolvedTask, resolve_task
from pipeline.infer.tiling import Tile, locality_order, origins_array, padding, plan_tiles

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE = 512 * 2**20


@dataclass
class InferenceReport:
    """Outcome of one inference run over a job's tiles."""

    tiles_url: str
    total: int
    done: int = 0
    skipped: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    computed: int = 0
    resumed: int = 0
    seconds: float = 0.0
    nodes: list[str] = field(default_factory=list)
    area_km2: float = 0.0
    workers: list[dict[str, Any]] = field(default_factory=list)  # per actor: stats() at the end of the run

    def worker_totals(self) -> dict[str, float]:
        """CPU seconds, GPU (compute) seconds and peak memory of the actors, and how many there were."""
        return {
            "worker_cpu_s": sum(w.get("cpu_s", 0.0) for w in self.workers),
            "gpu_s": sum(w.get("compute_s", 0.0) for w in self.workers if w.get("device") == "cuda"),
            "worker_peak_rss": max((w.get("peak_rss", 0) for w in self.workers), default=0),
            "actors": len(self.workers),
        }

    @property
    def tiles_per_s(self) -> float:
        """Tiles finished by this run per second of inference wall time."""
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    @property
    def pending(self) -> int:
        """Tiles neither done, skipped nor failed."""
        return self.total - self.done - self.skipped - len(self.failed)


class RayUnreachableError(ConnectionError, ValueError):
    """The Ray cluster address does not answer (a user error: the CLI prints it without a traceback)."""


_EMBEDDED = {"ray": False}
"""Whether the Ray this process is connected to is an embedded local instance that :func:`connect_ray` started."""


def embedded_ray() -> bool:
    """True while connected to a local Ray started by :func:`connect_ray` (its resources are all there will be)."""
    import ray

    return _EMBEDDED["ray"] and ray.is_initialized()


def connect_ray(address: str | None = None, timeout_s: float = 30.0, dashboard: bool = False) -> bool:
    """Connect to Ray; returns True when this call started (and so owns) the Ray instance.

    Local mode keeps every Ray process on 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` and
    ``_node_ip_address``), with its dashboard on 127.0.0.1 when ``dashboard``; a cluster address is first checked
    with a TCP connect so a wrong address fails within ``timeout_s`` instead of retrying for minutes.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if address == "local":
        address = None
    if not address:  # read by Ray when it is imported: set it first
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if address and address != "auto":
        parsed = urlparse(address if "://" in address else f"gcs://{address}")
        host, port = parsed.hostname, parsed.port or (10001 if parsed.scheme == "ray" else 6379)
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
        except OSError as err:
            raise RayUnreachableError(f"cannot reach the Ray cluster at {address} ({host}:{port}): {err}") from None
        ray.init(address=address)
        _EMBEDDED["ray"] = False
        return True
    if address == "auto":
        ray.init(address="auto")
        _EMBEDDED["ray"] = False
        return True
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        # Ray was imported before the variable was set (by the caller): apply it to this process too, or the
        # driver would advertise the machine's external address. Workers inherit the variable from the env.
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    context = ray.init(  # address="local": never join a `ray start` instance that happens to run on this machine
        address="local", num_cpus=os.cpu_count() or 1, object_store_memory=LOCAL_OBJECT_STORE,
        _node_ip_address="127.0.0.1", include_dashboard=dashboard, dashboard_host="127.0.0.1",
    )  # fmt: skip
    _EMBEDDED["ray"] = True
    if dashboard and context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}")
    return True


@dataclass
class StorePlan:
    """A job's output grid, tiles, resolved model and (created or reopened) tile store."""

    grid: OutputGrid
    tiles: list[Tile]
    task: ResolvedTask
    url: str


def prepare_store(params: InferenceParams) -> StorePlan:
    """Resolve the model, plan the tiles and open or create the tile store (refusing one of another job).

    ``params.context_radius`` None keeps the model's global stage-3/4 attention (as pre-trained); a radius switches
    to local context (job specs do by default) and aligns the tile origins to the model's attention window, so the
    tiles agree wherever they overlap (see :mod:`pipeline.model.layers.local_attention`). ``params.margin`` pixels at
    each inner tile edge get zero weight when stitching.
    """
    task = resolve_task(params.checkpoint, params.kind, params.num_classes, params.class_names)
    grid = output_grid(params.cube_url, params.modalities)
    # Fail here, in the driver, on a cube that does not fit the model (bands) or the job (no date in a period):
    # the actors would otherwise each fail to start with the same error.
    specs = {m: task.config.modality(m) for m in params.modalities}
    reader = CubeReader(params.cube_url, specs, params.periods, cache_bytes=0, grid_shape=(grid.height, grid.width))
    align = task.config.window_size if params.context_radius is not None else 1
    tiles = plan_tiles(grid.height, grid.width, params.tile_size, params.overlap, align)
    # Dense kinds that map at the finest input resolution (HR segmentation) get a finer output grid: the tiling is
    # planned on the 10 m grid and every output length is multiplied by the finest modality's ratio.
    r = reader.finest_ratio if params.output_kind.fine_output else 1
    out = grid.refined(r)
    periods = [list(p) for p in params.periods]
    attrs = {
        "grid": {"crs": out.crs, "transform": list(out.transform), "height": out.height, "width": out.width},
        **params.output_kind.store_attrs(task.class_names, task.class_colors),
        "channels": task.channels, "tile_size": params.tile_size * r, "overlap": params.overlap * r,
        "margin": params.margin * r, "context_radius": params.context_radius, "output_ratio": r,
        "padded": [p * r for p in padding(tiles, grid.height, grid.width)], "n_tiles": len(tiles),
        "provenance": {
            "model": task.config.name, "code_version": task.code_version, "checkpoint": task.checkpoint,
            "checkpoint_sha256": task.checkpoint_sha256, "random_init": task.random_init,
            "preprocessing": task.preprocessing(list(params.modalities)), "cube": params.cube_url,
            "time": periods[0] if len(periods) == 1 else periods, "modalities": list(params.modalities),
        },
    }  # fmt: skip
    url = tiles_url(params.output_url)
    open_or_create_store(url, attrs, origins_array(tiles) * r)
    return StorePlan(grid, tiles, task, url)


def run_inference(
    params: InferenceParams,
    *,
    address: str | None = None,
    progress: bool = True,
    faults: Mapping[int, str] | None = None,
) -> InferenceReport:
    """Run (or resume) the inference stage of a job; see the module docstring.

    Returns the report; failed tiles are in ``report.failed`` (the caller decides the exit code).
    """
    start = time.perf_counter()
    params = params.resolved()
    plan = prepare_store(params)
    grid, tiles = plan.grid, plan.tiles
    area_km2 = grid.height * grid.width * abs(grid.transform[0] ** 2) / 1e6
    report = InferenceReport(plan.url, len(tiles), area_km2=area_km2)
    manifest = TileManifest(params.output_url)
    records = manifest.read_all()
    finished = {t for t, r in records.items() if r.get("status") in FINISHED}
    report.resumed = len(finished)
    pending = [t.id for t in locality_order(tiles, grid.chunks) if t.id not in finished]
    if pending:
        faults = dict(faults) if faults is not None else parse_faults(os.environ.get(FAULT_ENV))
        base = {t: int(r.get("attempts") or 0) for t, r in records.items() if r.get("status") == "failed"}
        bar = tqdm(total=len(tiles), initial=len(finished), unit="tile", desc="inference", disable=not progress)
        try:
            failed, nodes = _run_pool(pending, params, manifest, base, bar, address=address, faults=faults,
                                      workers=report.workers)  # fmt: skip
        finally:
            bar.close()
        report.nodes = sorted(nodes)
        for tile_id, error in failed.items():
            tile = tiles[tile_id]
            manifest.write(
                {"tile_id": tile_id, "index": tile_id, "origin": [tile.row, tile.col], "status": "failed",
                 "error": error, "attempts": base.get(tile_id, 0) + params.max_attempts, "seconds": 0.0}
            )  # fmt: skip
    c = counts(manifest.read_all(), len(tiles))
    report.done, report.skipped = c["done"], c["skipped"]
    report.failed = {t: str(r.get("error")) for t, r in manifest.read_all().items() if r.get("status") == "failed"}
    report.computed = report.done + report.skipped - report.resumed
    report.seconds = time.perf_counter() - start
    return report


def _run_pool(
    pending: list[int],
    params: InferenceParams,
    manifest: TileManifest,
    base: dict[int, int],
    bar: tqdm,
    *,
    address: str | None,
    faults: Mapping[int, str],
    workers: list[dict[str, Any]],
) -> tuple[dict[int, str], set[str]]:
    """Start the actors and run the pool; returns failed tiles (id -> error) and the nodes that ran tiles.

    ``workers`` receives every actor's final :meth:`InferenceWorker.stats` (CPU, GPU, memory).
    """
    import ray

    owns_ray = connect_ray(address)
    pool: ActorPool | None = None
    try:
        # local: this run's own Ray or the job's embedded one (pipeline.job.cluster): its resources will not grow
        cpus, gpus = check_resources(params, local=owns_ray or embedded_ray())
        remote = ray.remote(InferenceWorker).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=params.max_restarts, max_task_retries=0,
            scheduling_strategy="SPREAD",
        )  # fmt: skip
        threads = max(1, int(cpus))
        pool = ActorPool(
            lambda: remote.remote(params, threads=threads, faults=faults), params.actors, manifest=manifest,
            base=base, max_restarts=params.max_restarts, max_attempts=params.max_attempts, bar=bar,
            batch_timeout=params.batch_timeout, start_timeout=params.start_timeout,
        )  # fmt: skip
        size = params.batch_size
        pool.queue.extend(pending[i : i + size] for i in range(0, len(pending), size))
        pool.run()
        workers.extend(pool.worker_stats())
        return pool.failed, pool.nodes
    finally:
        if pool is not None:
            pool.shutdown()
        if owns_ray:
            ray.shutdown()


class InsufficientResourcesError(ValueError):
    """The Ray cluster cannot host the job's actors (a user error: the CLI prints it without a traceback)."""


def check_resources(params: InferenceParams, local: bool) -> tuple[float, float]:
    """CPUs and GPUs per actor, after checking the cluster can host at least one actor.

    A local Ray (started by this run) has the resources it will ever have, so a job asking for more fails at once
    with what to change. A cluster may autoscale: it is only checked against the resources its nodes can offer now
    and the actors' start-up timeout (``ActorPool``) catches a request that never gets a node.
    """
    import ray

    total = ray.cluster_resources()
    gpus = float(params.gpus_per_actor)
    cpus = params.cpus_per_actor
    if cpus is None:
        cpus = 1.0 if gpus > 0 else max(1.0, float(int(total.get("CPU", 1) // params.actors)))
    if local and gpus > float(total.get("GPU", 0)):
        raise InsufficientResourcesError(
            f"the job asks for {gpus:g} GPU(s) per actor, but this machine's Ray has {total.get('GPU', 0):g}; set "
            "gpus_per_actor: 0 to run on the CPU, or run on a cluster with GPU nodes (--address)"
        )
    if local and cpus > float(total.get("CPU", 0)):
        raise InsufficientResourcesError(
            f"each actor asks for {cpus:g} CPUs but this machine's Ray has {total.get('CPU', 0):g}; lower the actors' "
            "CPU share or the number of actors"
        )
    return cpus, gpus
