"""A build killed with SIGKILL part-way and started again equals an uninterrupted build, byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_cube_support import REPO, S1F_BBOX, require_data, s1f_items, s1f_sources, slovenia_items, slovenia_source

from pipeline.cube import build_cube, open_modality
from pipeline.cube.manifest import ChunkManifest

SLO_BBOX = (14.5513, 45.8659, 14.5643, 45.8750)
KW = {"region": SLO_BBOX, "crs": "EPSG:32633", "chunks": (48, 48), "progress": False, "quicklooks": False}

BUILD_SCRIPT = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from test_cube_support import slovenia_items, slovenia_source
from pipeline.cube import build_cube
build_cube(sys.argv[1], {{"s2": slovenia_items()}}, {{"s2": slovenia_source()}}, workers=1, batch_chunks=2, **{KW!r})
"""

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _kill_midway(url: str, min_done: int, log: Path, timeout: float = 60.0) -> int:
    """Start a build in a subprocess and SIGKILL it once ``min_done`` chunks are recorded; returns that count."""
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, url], cwd=REPO, stderr=err)
    manifest = ChunkManifest(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest.plan() is not None and len(manifest.statuses("s2")) >= min_done:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the build ended before it could be killed: " + log.read_text()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return len(manifest.statuses("s2"))


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    require_data()
    killed, clean = tmp_path / "killed.zarr", tmp_path / "clean.zarr"
    done_before = _kill_midway(str(killed), min_done=8, log=tmp_path / "child.log")
    total = 5 * 3 * 3  # 5 dates x 3 x 3 chunks of 48 px on the 1 km grid
    assert 8 <= done_before < total

    resumed = build_cube(str(killed), {"s2": slovenia_items()}, {"s2": slovenia_source()}, **KW)
    assert resumed.chunks["s2"]["skipped"] >= done_before
    assert resumed.chunks["s2"]["skipped"] + resumed.chunks["s2"]["written"] == total
    build_cube(str(clean), {"s2": slovenia_items()}, {"s2": slovenia_source()}, **KW)

    for name in ("s2",):
        a, b = open_modality(str(killed), name), open_modality(str(clean), name)
        np.testing.assert_array_equal(a["data"].values, b["data"].values)
        np.testing.assert_array_equal(a["valid"].values, b["valid"].values)
        assert a.attrs == b.attrs
    fa, fb = _files(killed), _files(clean)
    assert sorted(fa) == sorted(fb)
    assert [k for k in fa if fa[k] != fb[k]] == []


def test_completed_build_is_a_no_op(tmp_path):
    require_data()
    url = str(tmp_path / "c.zarr")
    kw = {"region": S1F_BBOX, "chunks": (256, 256), "progress": False, "quicklooks": False}
    first = build_cube(url, s1f_items(), s1f_sources(), **kw)
    before = _files(Path(url))
    again = build_cube(url, s1f_items(), s1f_sources(), **kw)
    assert again.chunks["s2"] == {"total": first.chunks["s2"]["total"], "skipped": 6, "written": 0}
    assert _files(Path(url)) == before
