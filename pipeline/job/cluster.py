"""The Ray cluster a job runs on, and running every stage's work there.

One job, one Ray connection (:class:`RayCluster`): a local instance pinned to 127.0.0.1 by default (optionally with
its dashboard on 127.0.0.1), or the cluster at ``address`` / ``$RAY_ADDRESS``. The cube stage runs its work units as
Ray tasks (:mod:`pipeline.cube.distributed`), inference runs on Ray actors, and on a cluster the Dask graphs of the
mosaic, COG and archive stages run on Ray workers through Ray's Dask scheduler (:func:`dask_on_ray`): Dask-on-Ray
rather than a separate ``dask.distributed`` deployment on the Ray nodes, because the job already holds the Ray
cluster, its workers and its object store, and a second scheduler would need its own processes, ports and
lifecycle on every node [ours]. On one machine those graphs keep Dask's threaded scheduler: moving 100 MB blocks
of embeddings through a local object store buys nothing there.

Where CPU work goes: a cluster whose CPU worker nodes advertise the custom resource :data:`CPU_NODE_RESOURCE`
(``ray_cluster.yaml``'s ``cpu_m6i`` type does) gets the cube tasks and the Dask tasks of the later stages on those
nodes only, so they never take the CPUs of GPU nodes that inference and training need. A cluster (or a local Ray)
without that resource runs them on any node with a free CPU.

Which node did which work is recorded under ``{output}/manifest/nodes/<stage>/<node id>.json`` (one file per node
that ran at least one task of the stage), so ``skypipe status``, the report and the tests can see that a stage
really ran on several nodes.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline import storage

log = logging.getLogger(__name__)

CPU_NODE_RESOURCE = "skypipe_cpu"
"""Custom Ray resource of the nodes meant for CPU work (cube builds, mosaics, COGs, archives)."""

_RECORDED: set[tuple[str, str]] = set()  # (records folder, node) already written by this worker process


def node_id() -> str:
    """The Ray node id of the calling process (its host name outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return socket.gethostname()


def record_node(records_url: str, **extra: Any) -> str:
    """Note that the calling node ran work of the stage whose records live at ``records_url`` (once per process)."""
    node = node_id()
    key = (records_url, node)
    if key not in _RECORDED:
        record = {"node": node, "host": socket.gethostname(), "pid": os.getpid(), **extra}
        storage.write_json(storage.join(records_url, f"{node}.json"), record, fsync=False)
        _RECORDED.add(key)
    return node


def nodes_of(records_url: str) -> list[str]:
    """The nodes that recorded work at ``records_url``."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(records_url)
    if not fs.exists(path):
        return []
    return sorted(p.rsplit("/", 1)[-1].removesuffix(".json") for p in fs.ls(path, detail=False) if p.endswith(".json"))


def stage_records(output_url: str, stage: str) -> str:
    """Where the node records of ``stage`` of the job writing ``output_url`` live."""
    return storage.join(output_url, "manifest", "nodes", stage)


class RayCluster:
    """The job's Ray connection: made on first use, closed at the end when this job started it.

    Args:
        address: a cluster address (``ray://head:10001``, ``auto``); None = ``$RAY_ADDRESS``, else a local Ray.
        dashboard: start the local Ray's dashboard on 127.0.0.1 (ignored for a cluster, which has its own).
    """

    def __init__(self, address: str | None = None, dashboard: bool = False) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.dashboard = dashboard
        self.owns = False
        self.connected = False

    @property
    def remote(self) -> bool:
        """Whether the job runs on a cluster rather than a Ray of its own on this machine."""
        return bool(self.address) and self.address != "local"

    def connect(self) -> None:
        """Connect (or start a local Ray) once."""
        if self.connected:
            return
        from pipeline.infer.runner import connect_ray

        self.owns = connect_ray(self.address, dashboard=self.dashboard)
        self.connected = True

    def close(self) -> None:
        """Shut down the local Ray this job started."""
        if self.connected and self.owns:
            import ray

            ray.shutdown()
        self.connected = self.owns = False


def cpu_task_options() -> dict[str, Any]:
    """Ray options of a CPU task: spread over the nodes, and kept on the CPU nodes when the cluster has them.

    SPREAD: Ray's default packs tasks onto the first node with free CPUs, so a stage of short tasks (a small mosaic)
    can run on one node while the others idle; cube and mosaic tasks read and write shared storage, so spreading
    them costs no locality that matters.
    """
    import ray

    options: dict[str, Any] = {"scheduling_strategy": "SPREAD"}
    if ray.cluster_resources().get(CPU_NODE_RESOURCE, 0) > 0:
        options["resources"] = {CPU_NODE_RESOURCE: 0.001}  # a token amount: CPU counts limit concurrency
    return options


def node_recorder(records_url: str) -> Any:
    """A Ray-Dask callback that records, on the worker, which node ran each Dask task (see :func:`record_node`)."""
    from ray.util.dask import RayDaskCallback

    class Recorder(RayDaskCallback):
        def _ray_pretask(self, key: Any, object_refs: Any) -> None:
            record_node(records_url)

    return Recorder()


@contextmanager
def dask_on_ray(cluster: RayCluster, records_url: str) -> Iterator[None]:
    """Run the Dask graphs computed inside the block on ``cluster``'s workers (on a cluster; see the docstring)."""
    if not cluster.remote:
        yield
        return
    from functools import partial

    import dask
    from ray.util.dask import ray_dask_get

    cluster.connect()
    scheduler = partial(ray_dask_get, ray_remote_args=cpu_task_options())
    with dask.config.set(scheduler=scheduler), node_recorder(records_url):
        yield
