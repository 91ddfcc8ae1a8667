"""``skypipe run`` killed with SIGKILL mid-inference resumes without recomputing finished tiles, bit-identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import zarr
from infer_fixtures import write_checkpoint, write_cube, write_job

from pipeline.infer.actor import TileProcessor
from pipeline.infer.params import InferenceParams
from pipeline.infer.runner import prepare_store

pytestmark = pytest.mark.slow

SKYPIPE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
ENV.pop("RAY_ADDRESS", None)
ENV.pop("SKYPIPE_FAULT_TILES", None)


def _run(job: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*SKYPIPE, "run", str(job), "--no-progress"], env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=job.parent)  # fmt: skip


def _records(out: Path) -> dict[str, dict]:
    folder = out / "manifest" / "tiles"
    return {p.name: json.loads(p.read_text()) for p in folder.glob("*.json")} if folder.exists() else {}


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver; then end any Ray helper it spawned that outlived it (by pid, ours only)."""
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=15)
    for p in alive:
        p.kill()


def test_sigkill_mid_run_then_resume_is_identical(tmp_path: Path) -> None:
    cube = write_cube(tmp_path / "cube.zarr", size=(64, 64))
    ckpt = write_checkpoint(tmp_path / "micro.pt")
    job = write_job(tmp_path / "job.yaml", cube, str(tmp_path / "out"), ckpt)

    # the uninterrupted reference: the same per-batch code in this process, with the threads the CLI's single
    # local actor gets (all cores); CPU outputs are bit-identical only at equal thread counts
    params = InferenceParams(
        cube_url=cube,
        checkpoint=ckpt,
        kind="embeddings",
        modalities=("s2",),
        periods=[("2015-07-01", "2015-09-30")],
        output_url=str(tmp_path / "ref"),
        tile_size=24,
        overlap=8,
        margin=2,
        context_radius=8,
    )  # the job's tiling: local context, margin overlap // 3
    plan = prepare_store(params)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        ref = TileProcessor(params)
        assert all(r["status"] in ("done", "skipped") for b in ref.run([[t.id] for t in plan.tiles]) for r in b)
    finally:
        torch.set_num_threads(threads)

    # the run to kill: once some but not all tiles are finished
    proc = subprocess.Popen([*SKYPIPE, "run", str(job), "--no-progress"], env=ENV, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while not 1 <= len(_records(tmp_path / "out")) <= 5:
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline, "no tile finished in time"
            time.sleep(0.05)
    finally:
        _kill_tree(proc)
    before = _records(tmp_path / "out")
    assert 1 <= len(before) < 16

    resumed = _run(job)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "16 tiles: 15 done, 1 skipped" in resumed.stdout and (tmp_path / "out" / "quicklook.png").exists()
    after = _records(tmp_path / "out")
    assert len(after) == 16
    assert {k: after[k] for k in before} == before  # finished tiles untouched (same attempt, same finish time)
    assert all(r["attempts"] == 1 for r in after.values())
    assert f"{16 - len(before)} computed now" in resumed.stdout and f"{len(before)} from earlier runs" in resumed.stdout

    a = zarr.open_group(str(tmp_path / "ref" / "tiles.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "out" / "tiles.zarr"), mode="r")
    assert a.attrs.asdict() == b.attrs.asdict()
    for name in ("data", "valid", "pooled", "origin"):
        assert np.array_equal(a[name][:], b[name][:], equal_nan=True), name
