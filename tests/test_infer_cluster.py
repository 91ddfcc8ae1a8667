"""Inference on a multi-node Ray cluster (head + 2 worker nodes on loopback): tiles run on more than one node."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: every node on loopback

import pytest
from infer_fixtures import write_checkpoint, write_cube

from pipeline.infer.params import InferenceParams
from pipeline.infer.runner import run_inference
from pipeline.infer.store import TileManifest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def test_tiles_run_on_several_nodes(tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    store = 128 * 2**20
    # the head has no CPU: both 1-CPU actors must land on the two worker nodes
    cluster = Cluster(
        initialize_head=True, connect=False,
        head_node_args={"num_cpus": 0, "object_store_memory": store, "include_dashboard": False},
    )  # fmt: skip
    try:
        workers = {cluster.add_node(num_cpus=1, object_store_memory=store).node_id for _ in range(2)}
        cluster.wait_for_nodes(timeout=120)
        out = tmp_path / "out"
        report = run_inference(InferenceParams(
            cube_url=write_cube(tmp_path / "cube.zarr", size=(64, 64)), output_url=str(out),
            checkpoint=write_checkpoint(tmp_path / "micro.pt"), modalities=["s2"],
            periods=[("2015-07-01", "2015-09-30")], tile_size=16, overlap=4, batch_size=1, actors=2,
        ), address=cluster.address, progress=False)  # fmt: skip
        assert not ray.is_initialized()  # the runner connected, and disconnected, by itself
    finally:
        cluster.shutdown()
    assert report.total == 25 and report.done + report.skipped == 25 and not report.failed
    nodes = {r["worker"]["node_id"] for r in TileManifest(str(out)).read_all().values()}
    assert set(report.nodes) == nodes == workers
