"""The inference driver on a real local Ray instance: faults, retries, failure reporting, CLI exit codes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: keep it on loopback

import pytest
from infer_fixtures import write_checkpoint, write_cube, write_job

from pipeline.cli import main
from pipeline.infer.actor import FAULT_ENV
from pipeline.infer.params import InferenceParams
from pipeline.infer.runner import run_inference
from pipeline.infer.store import TileManifest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, object_store_memory=512 * 2**20, _node_ip_address="127.0.0.1", include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("runner")
    return {"cube": write_cube(root / "cube.zarr", size=(64, 64)), "checkpoint": write_checkpoint(root / "micro.pt")}


def test_dead_actors_are_retried_and_poison_tiles_reported(
    local_ray: None, data: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 9 tiles (24 px, overlap 4 on 64 x 64); tile 8 is all nodata. Tile 1 kills its worker once, tile 4 every
    # time it runs, tile 6 raises.
    monkeypatch.setenv(FAULT_ENV, "1:exit-once,4:exit,6:raise")
    out = tmp_path / "out"
    report = run_inference(InferenceParams(
        cube_url=data["cube"], output_url=str(out), checkpoint=data["checkpoint"], modalities=["s2"],
        periods=[("2015-07-01", "2015-09-30")], tile_size=24, overlap=4, batch_size=3, actors=2, max_attempts=2,
    ), progress=False)  # fmt: skip
    assert report.total == 9 and report.skipped == 1 and report.done == 6
    assert sorted(report.failed) == [4, 6]
    assert "worker died" in report.failed[4] and "injected fault" in report.failed[6]
    records = TileManifest(str(out)).read_all()
    assert records[1]["status"] == "done" and records[1]["attempts"] == 2  # retried after its worker died
    assert records[4]["status"] == "failed" and records[4]["attempts"] == 2
    # tiles a dying worker had finished are kept; the rest of its batch is retried once, one tile at a time
    assert all(records[t]["status"] == "done" and records[t]["attempts"] <= 2 for t in (0, 2, 3, 5, 7))
    assert sum(r["attempts"] for r in records.values() if r["status"] == "done") <= 6 + 4

    # a rerun without the faults retries only the failed tiles and finishes; done tiles are left alone
    monkeypatch.delenv(FAULT_ENV)
    before = {t: r for t, r in records.items() if r["status"] in ("done", "skipped")}
    again = run_inference(InferenceParams(
        cube_url=data["cube"], output_url=str(out), checkpoint=data["checkpoint"], modalities=["s2"],
        periods=[("2015-07-01", "2015-09-30")], tile_size=24, overlap=4, batch_size=3, actors=1,
    ), progress=False)  # fmt: skip
    assert not again.failed and again.computed == 2 and again.resumed == 7
    after = TileManifest(str(out)).read_all()
    assert {t: after[t] for t in before} == before
    assert after[4]["status"] == "done" and after[4]["attempts"] == 3


def test_a_hung_actor_is_killed_and_its_tile_reported(
    local_ray: None, data: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "3:hang")  # the worker sleeps forever on tile 3
    out = tmp_path / "out"
    report = run_inference(InferenceParams(
        cube_url=data["cube"], output_url=str(out), checkpoint=data["checkpoint"], modalities=["s2"],
        periods=[("2015-07-01", "2015-09-30")], tile_size=24, overlap=4, batch_size=2, actors=1, max_attempts=2,
        batch_timeout=8.0,
    ), progress=False)  # fmt: skip
    assert report.total == 9 and report.skipped == 1 and report.done == 7
    assert list(report.failed) == [3] and "timed out" in report.failed[3]
    records = TileManifest(str(out)).read_all()
    assert records[3]["status"] == "failed" and records[3]["attempts"] == 2
    assert all(r["status"] != "failed" for t, r in records.items() if t != 3)


def test_cli_run_exits_nonzero_on_failed_tiles(
    local_ray: None,
    data: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setenv(FAULT_ENV, "2:raise")
    job = write_job(tmp_path / "job.yaml", data["cube"], str(tmp_path / "out"), data["checkpoint"])
    assert main(["run", str(job), "--no-progress", "--max-attempts", "2"]) == 1
    text = capsys.readouterr().out
    assert "tile 2: model: RuntimeError: injected fault" in text and "tiles failed" in text
    assert main(["status", str(job)]) == 0
    assert "14 done, 1 skipped, 1 failed, 0 pending of 16" in capsys.readouterr().out
