"""The inference driver: plan tiles, skip finished ones, run batches on a pool of Ray actors, survive failures.

Flow: describe the model (no weights loaded in the driver) -> open or create the tile store (refusing one written by
another job) -> read the manifest and keep the tiles not yet done -> start ``actors`` :class:`InferenceWorker`
actors -> dispatch batches with a ``ray.wait`` loop. Each actor gets its next batch together with the one after it,
which it starts reading in its prefetch thread while the model runs.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from urllib.parse import urlparse

from tqdm.auto import tqdm

from pipeline.infer.actor import FAULT_ENV, InferenceWorker, parse_faults
from pipeline.infer.pool import ActorPool
from pipeline.infer.reader import OutputGrid, Period, output_grid
from pipeline.infer.store import TileManifest, open_or_create_store, tiles_url
from pipeline.infer.task import TaskInfo, describe_task, is_model_name
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

    @property
    def tiles_per_s(self) -> float:
        """Tiles finished by this run per second of inference wall time."""
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    @property
    def pending(self) -> int:
        """Tiles neither done, skipped nor failed."""
        return self.total - self.done - self.skipped - len(self.failed)


def _absolute(url: str) -> str:
    """Local paths made absolute (Ray workers do not share the driver's working directory); URLs unchanged."""
    return url if "://" in url else os.path.abspath(url)


def _period_str(p: Period) -> tuple[str, str]:
    def one(v: datetime | date | str) -> str:
        return v.isoformat() if isinstance(v, (date, datetime)) else str(v)

    return one(p[0]), one(p[1])


class RayUnreachableError(ConnectionError, ValueError):
    """The Ray cluster address does not answer (a user error: the CLI prints it without a traceback)."""


def connect_ray(address: str | None = None, timeout_s: float = 30.0) -> bool:
    """Connect to Ray; returns True when this call started (and so owns) the Ray instance.

    Local mode keeps every Ray process on 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` and
    ``_node_ip_address``); a cluster address is first checked with a TCP connect so a wrong address fails within
    ``timeout_s`` instead of retrying for minutes.
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
        return True
    if address == "auto":
        ray.init(address="auto")
        return True
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        # Ray was imported before the variable was set (by the caller): apply it to this process too, or the
        # driver would advertise the machine's external address. Workers inherit the variable from the env.
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        num_cpus=os.cpu_count() or 1, object_store_memory=LOCAL_OBJECT_STORE,
        _node_ip_address="127.0.0.1", include_dashboard=False,
    )  # fmt: skip
    return True


@dataclass
class StorePlan:
    """A job's output grid, tiles, model description and (created or reopened) tile store."""

    grid: OutputGrid
    tiles: list[Tile]
    info: TaskInfo
    periods: list[tuple[str, str]]
    url: str


def prepare_store(
    *,
    cube_url: str,
    output_url: str,
    checkpoint: str | None,
    kind: str,
    modalities: Sequence[str],
    periods: Sequence[Period],
    tile_size: int,
    overlap: int,
    margin: int = 0,
    context_radius: int | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
) -> StorePlan:
    """Describe the model, plan the tiles and open or create the tile store (refusing one of another job).

    ``context_radius`` None keeps the model's global stage-3/4 attention (as pre-trained); a radius switches to local
    context (job specs do by default) and aligns the tile origins to the model's attention window, so the tiles
    agree wherever they overlap (see :mod:`pipeline.model.layers.local_attention`). ``margin`` pixels at each inner
    tile edge get zero weight when stitching.
    """
    info = describe_task(checkpoint, kind, num_classes, class_names)
    grid = output_grid(cube_url, modalities)
    if not 0 <= 2 * margin <= overlap:
        raise ValueError(f"margin {margin} must be between 0 and half the overlap {overlap}")
    align = info.config.window_size if context_radius is not None else 1
    tiles = plan_tiles(grid.height, grid.width, tile_size, overlap, align)
    periods = [_period_str(p) for p in periods]
    attrs = {
        "grid": {"crs": grid.crs, "transform": list(grid.transform), "height": grid.height, "width": grid.width},
        "kind": kind, "channels": info.channels, "tile_size": tile_size, "overlap": overlap, "margin": margin,
        "context_radius": context_radius, "padded": list(padding(tiles, grid.height, grid.width)),
        "n_tiles": len(tiles),
        "class_names": info.class_names,
        "provenance": {
            "model": info.config.name, "code_version": info.code_version, "checkpoint": info.checkpoint,
            "checkpoint_sha256": info.checkpoint_sha256, "random_init": info.random_init,
            "preprocessing": info.preprocessing(list(modalities)), "cube": cube_url,
            "time": list(periods[0]) if len(periods) == 1 else [list(p) for p in periods],
            "modalities": list(modalities),
        },
    }  # fmt: skip
    url = tiles_url(output_url)
    open_or_create_store(url, attrs, origins_array(tiles))
    return StorePlan(grid, tiles, info, periods, url)


def run_inference(
    *,
    cube_url: str,
    output_url: str,
    checkpoint: str | None,
    kind: str = "embeddings",
    modalities: Sequence[str],
    periods: Sequence[Period],
    tile_size: int = 256,
    overlap: int = 32,
    margin: int = 0,
    context_radius: int | None = None,
    batch_size: int = 8,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    address: str | None = None,
    max_attempts: int = 3,
    max_restarts: int = 2,
    batch_timeout: float | None = None,
    progress: bool = True,
    faults: Mapping[int, str] | None = None,
) -> InferenceReport:
    """Run (or resume) the inference stage of a job; see the module docstring.

    Returns the report; failed tiles are in ``report.failed`` (the caller decides the exit code).
    """
    start = time.perf_counter()
    cube_url, output_url = _absolute(cube_url), _absolute(output_url)
    if checkpoint and not is_model_name(checkpoint):
        checkpoint = _absolute(checkpoint)
    plan = prepare_store(
        cube_url=cube_url, output_url=output_url, checkpoint=checkpoint, kind=kind, modalities=modalities,
        periods=periods, tile_size=tile_size, overlap=overlap, margin=margin, context_radius=context_radius,
        num_classes=num_classes, class_names=class_names,
    )  # fmt: skip
    grid, tiles, info, periods, url = plan.grid, plan.tiles, plan.info, plan.periods, plan.url
    report = InferenceReport(url, len(tiles), area_km2=grid.height * grid.width * abs(grid.transform[0] ** 2) / 1e6)
    manifest = TileManifest(output_url)
    records = manifest.read_all()
    finished = {t for t, r in records.items() if r.get("status") in ("done", "skipped")}
    report.resumed = len(finished)
    pending = [t.id for t in locality_order(tiles, grid.chunks) if t.id not in finished]
    if pending:
        faults = dict(faults) if faults is not None else parse_faults(os.environ.get(FAULT_ENV))
        worker_kwargs = {
            "cube_url": cube_url, "output_url": output_url, "checkpoint": checkpoint, "kind": kind,
            "modalities": list(modalities), "periods": periods, "num_classes": info.num_classes,
            "class_names": info.class_names, "faults": faults,
        }  # fmt: skip
        base = {t: int(r.get("attempts") or 0) for t, r in records.items() if r.get("status") == "failed"}
        bar = tqdm(total=len(tiles), initial=len(finished), unit="tile", desc="inference", disable=not progress)
        try:
            failed, nodes = _run_pool(
                pending, worker_kwargs, manifest, base, bar, batch_size=batch_size, actors=actors, gpus=gpus_per_actor,
                cpus=cpus_per_actor, address=address, max_attempts=max_attempts, max_restarts=max_restarts,
                batch_timeout=batch_timeout,
            )  # fmt: skip
        finally:
            bar.close()
        report.nodes = sorted(nodes)
        for tile_id, error in failed.items():
            tile = tiles[tile_id]
            attempts = base.get(tile_id, 0) + max_attempts
            manifest.write(
                {"tile_id": tile_id, "index": tile_id, "origin": [tile.row, tile.col], "status": "failed",
                 "error": error, "attempts": attempts, "seconds": 0.0}
            )  # fmt: skip
    records = manifest.read_all()
    report.done = sum(r.get("status") == "done" for r in records.values())
    report.skipped = sum(r.get("status") == "skipped" for r in records.values())
    report.failed = {t: str(r.get("error")) for t, r in records.items() if r.get("status") == "failed"}
    report.computed = report.done + report.skipped - report.resumed
    report.seconds = time.perf_counter() - start
    return report


def _run_pool(
    pending: list[int],
    worker_kwargs: dict[str, Any],
    manifest: TileManifest,
    base: dict[int, int],
    bar: tqdm,
    *,
    batch_size: int,
    actors: int,
    gpus: float,
    cpus: float | None,
    address: str | None,
    max_attempts: int,
    max_restarts: int,
    batch_timeout: float | None = None,
) -> tuple[dict[int, str], set[str]]:
    """Start the actors and run the pool; returns failed tiles (id -> error) and the nodes that ran tiles."""
    import ray

    owns_ray = connect_ray(address)
    pool: ActorPool | None = None
    try:
        if cpus is None:
            cpus = 1.0 if gpus > 0 else max(1.0, float(int(ray.cluster_resources().get("CPU", 1) // actors)))
        remote = ray.remote(InferenceWorker).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=max_restarts, max_task_retries=0, scheduling_strategy="SPREAD"
        )
        threads = max(1, int(cpus))
        pool = ActorPool(
            lambda: remote.remote(threads=threads, gpus=gpus, **worker_kwargs), actors, manifest=manifest, base=base,
            max_restarts=max_restarts, max_attempts=max_attempts, bar=bar, batch_timeout=batch_timeout,
        )  # fmt: skip
        pool.queue.extend(pending[i : i + batch_size] for i in range(0, len(pending), batch_size))
        pool.run()
        return pool.failed, pool.nodes
    finally:
        if pool is not None:
            pool.shutdown()
        if owns_ray:
            ray.shutdown()
