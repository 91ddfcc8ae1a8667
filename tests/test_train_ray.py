"""Real distributed pre-training: 2 Ray Train workers (gloo DDP on CPU) on a local loopback Ray cluster.

A fixed batch must drive the loss down; a run killed with SIGKILL (its driver and its Ray Train controller and
workers) and started again must resume from its last checkpoint and reproduce the losses and weights of an
uninterrupted run.

[known issue] The data here is HR only (RSSCN7 scenes + LEVIR-CD 2-date pairs). With BigEarthNet S1+S2 batches
mixed in, two identical fresh 2-rank DDP runs already differ slightly (~0.1 % in loss) from the first S1+S2 step
on, so no resume can match them bit for bit; single-process runs with the same data are exact, resume included
(see the report of issue 5).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from shared_data import needs_shared, shared_path

DATA = shared_path()
pytestmark = [
    pytest.mark.slow,
    needs_shared("rsscn7"),
]

MICRO = {"dims": [32, 32, 64, 64], "depths": [1, 1, 1, 1], "moe_blocks": 1, "num_experts": 4, "fusion_dim": 64,
         "fusion_heads": 2}  # fmt: skip


def job(storage: Path, **over: object) -> dict:
    spec = {
        "name": "test-pretrain",
        "model": {"name": "skysense_v2_tiny", "overrides": MICRO},
        "data": [
            {"kind": "images", "path": str(DATA / "rsscn7"), "size": 64, "gsd": 0.625},
            {"kind": "change_pairs", "path": str(DATA / "levir_cd"), "size": 64, "gsd": 0.625, "weight": 0.5},
        ],
        "ssl": {"options": {"proj_dim": 32, "head_hidden_dim": 64, "num_queries": 4, "max_pixels": 64},
                "augment": {"num_local": 2}},
        "steps": 8, "batch_size": 8, "workers": 2, "loader_workers": 1,
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "storage": str(storage), "checkpoint_every": 2, "seed": 3,
    }  # fmt: skip
    return spec | over


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    from pipeline.train.loop import init_local_ray

    init_local_ray(num_cpus=2)
    yield
    ray.shutdown()


def losses(storage: Path) -> dict[int, float]:
    from pipeline.train.monitor import read_metrics

    return {m["step"]: m["loss"] for m in read_metrics(str(storage))}  # later lines (the resumed run) win


def test_fixed_batch_loss_decreases(tmp_path: Path, ray_cluster: None) -> None:
    from pipeline.train.loop import run_pretrain
    from pipeline.train.spec import PretrainSpec

    spec = PretrainSpec.model_validate(job(tmp_path / "fixed", steps=6, repeat_batch=True, checkpoint_every=100,
                                           optim={"lr": 2e-3, "warmup_steps": 0}))  # fmt: skip
    summary = run_pretrain(spec, progress=False)
    curve = [v for _, v in sorted(losses(tmp_path / "fixed").items())]
    assert len(curve) == 6 and all(np.isfinite(curve))
    assert curve[-1] < curve[0] - 0.05, curve
    assert summary.steps == 6 and summary.samples == 48 and summary.samples_per_s > 0
    assert summary.checkpoint and summary.checkpoint.endswith("step_0000006.pt")
    assert (tmp_path / "fixed" / "tb").is_dir()


def _cli(spec_path: Path, log: Path) -> subprocess.Popen:
    """``skypipe pretrain`` as its own driver process, joining the test's loopback cluster; output to ``log``."""
    import ray

    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "pretrain", str(spec_path), "--no-progress"],
            stdout=out, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
        )  # fmt: skip


def _kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL the whole run: the driver and the Ray Train controller and workers it started on our cluster."""
    import psutil

    actors = [
        p for p in psutil.Process().children(recursive=True)
        if any(n in " ".join(p.cmdline()) for n in ("RayTrainWorker", "TrainController"))
    ]  # fmt: skip
    os.killpg(proc.pid, signal.SIGKILL)
    for p in actors:
        p.kill()
    proc.wait()
    _, alive = psutil.wait_procs(actors, timeout=30)
    assert not alive, alive
    assert actors, "no Ray Train processes found to kill"


def test_sigkill_and_resume_matches_uninterrupted(tmp_path: Path, ray_cluster: None) -> None:
    from pipeline.model.checkpoint import read_checkpoint
    from pipeline.train.loop import run_pretrain
    from pipeline.train.spec import PretrainSpec
    from pipeline.train.state import list_checkpoints

    ref = PretrainSpec.model_validate(job(tmp_path / "ref"))
    run_pretrain(ref, progress=False)
    ref_losses = losses(tmp_path / "ref")
    assert sorted(ref_losses) == list(range(1, 9))

    storage = tmp_path / "killed"
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(job(storage)))
    proc = _cli(spec_path, tmp_path / "killed.log")
    t0 = time.time()
    while not list_checkpoints(str(storage)):  # first checkpoint (step 2) written: kill mid-run
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.time() - t0 < 120, "no checkpoint within 120 s"
        time.sleep(0.05)
    _kill_run(proc)
    time.sleep(1.0)  # nothing may write after the kill
    done = [s for s, _ in list_checkpoints(str(storage))]
    assert done and max(done) < 8, f"the run was not interrupted (checkpoints {done})"

    proc = _cli(spec_path, tmp_path / "resumed.log")
    proc.wait(timeout=150)
    out = (tmp_path / "resumed.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from step {max(done)}" in out
    got = losses(storage)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), (step, got, ref_losses)
    a = read_checkpoint(list_checkpoints(str(storage))[-1][1])
    b = read_checkpoint(list_checkpoints(str(tmp_path / "ref"))[-1][1])
    assert a["extra"]["step"] == b["extra"]["step"] == 8 and a["extra"]["data_position"] == 8
    for k, v in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][k], v, rtol=1e-5, atol=1e-6)


def _train_workers(since: float) -> list:
    """This run's Ray Train worker processes (not their DataLoader children, not an earlier run's lingering ones)."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in p.name() and p.create_time() >= since and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def test_fsdp2_on_ray_train_recovers_from_a_killed_worker(tmp_path: Path, ray_cluster: None) -> None:
    """FSDP2 through Ray Train on 2 gloo workers; SIGKILL one worker mid-run: Ray Train's FailureConfig restarts the
    group, both ranks resume from the last sharded checkpoint and the curve continues as if nothing happened."""
    import threading

    from pipeline.train.loop import run_pretrain
    from pipeline.train.spec import PretrainSpec
    from pipeline.train.state import list_checkpoints

    ref = PretrainSpec.model_validate(job(tmp_path / "ref", parallel="fsdp"))
    run_pretrain(ref, progress=False)
    ref_losses = losses(tmp_path / "ref")
    assert sorted(ref_losses) == list(range(1, 9))

    storage = tmp_path / "killed"
    spec = PretrainSpec.model_validate(job(storage, parallel="fsdp", max_failures=2))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=run_pretrain(spec, progress=False)))
    t0 = time.time()
    thread.start()
    while not list_checkpoints(str(storage)):  # first checkpoint (step 2) written: kill one rank mid-run
        assert thread.is_alive() and time.time() - t0 < 180, "no checkpoint within 180 s"
        time.sleep(0.05)
    workers = _train_workers(since=t0 - 1)
    assert len(workers) == 2, workers
    workers[1].kill()
    killed_at = max(s for s, _ in list_checkpoints(str(storage)))
    thread.join(timeout=300)
    assert not thread.is_alive() and "summary" in result, "the run did not finish after the worker was killed"
    assert killed_at < 8 and result["summary"].steps == 8
    assert result["summary"].resumed_from >= 2  # the restarted group resumed from a checkpoint, not from scratch
    got = losses(storage)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(ref_losses[step], rel=1e-4, abs=1e-5), (step, got, ref_losses)
