"""``ray_cluster.yaml`` is a valid Ray cluster launcher config (Ray's own schema and checks, offline)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ray = pytest.importorskip("ray")
jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_schema_valid(config: dict) -> None:
    validator = jsonschema.Draft7Validator(_schema())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(config)]
    assert not errors, errors
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_a10g"]["min_wokers"] = 1  # a typo is caught
    assert list(validator.iter_errors(broken))


def test_ray_prepare_and_validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))
    except ImportError as err:  # provider defaults need an optional cloud SDK
        pytest.skip(f"prepare_config needs {err.name}")
    validate_config(prepared)
    bad = copy.deepcopy(prepared)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(bad)


def test_head_is_cpu_and_workers_are_autoscaling_gpus(config: dict) -> None:
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert len(gpu) >= 2 and all(t["min_workers"] == 0 < t["max_workers"] for t in gpu)
    assert sum(t["max_workers"] for t in gpu) <= config["max_workers"] + max(t["max_workers"] for t in gpu)
    assert any("--ray-client-server-port=10001" in c for c in config["head_start_ray_commands"])


def test_image_is_built_from_infra() -> None:
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert "FROM ${BASE_IMAGE}" in dockerfile and "pytorch/pytorch:" in dockerfile and "cuda" in dockerfile
    assert "pip install" in dockerfile and "COPY pipeline" in dockerfile
    readme = (ROOT / "infra" / "README.md").read_text()
    assert "ray up ray_cluster.yaml" in readme and "--address ray://" in readme
