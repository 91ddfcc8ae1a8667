"""The built wheel, installed (not editable) into a fresh virtualenv, runs from any working directory.

The wheel is built from this checkout with ``pip wheel --no-deps``; the new virtualenv gets only the wheel, and
sees the dependencies of the project's ``.venv`` through a ``.pth`` line (no network, no 5 GB of torch again). From
a folder far from the checkout, ``skypipe`` must find its catalogs, example jobs and demo checkpoint in the installed
data files (``<venv>/share/skypipe``), and run a whole job.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from infer_fixtures import SCENES, write_checkpoint, write_cube, write_job

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pkg")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(REPO)], check=True, timeout=600)  # fmt: skip
    wheel = next((root / "dist").glob("skypipe-*.whl"))
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    sp = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                      text=True).strip())  # fmt: skip
    (sp / "skypipe-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # the project's dependencies
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   timeout=600)  # fmt: skip
    return env_dir


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "SKYPIPE_HOME"))}
    return env | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def test_installed_wheel_finds_its_files_from_anywhere(installed: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    skypipe = str(installed / "bin" / "skypipe")
    where = subprocess.run([skypipe, "demo", "--where"], cwd=elsewhere, env=_env(), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert where.returncode == 0, where.stderr
    share = str(installed / "share" / "skypipe")
    assert f"job {share}/jobs/demo.yaml" in where.stdout and f"catalogs {share}/catalogs" in where.stdout
    assert f"checkpoint {share}/checkpoints/skysense_v2_tiny_ssl.pt\n" in where.stdout + "\n"
    module = subprocess.run([str(installed / "bin" / "python"), "-c", "import pipeline; print(pipeline.__file__)"],
                            cwd=elsewhere, env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert str(installed) in module.stdout and str(REPO) not in module.stdout  # the wheel, not the checkout
    info = subprocess.run([skypipe, "model", "info", f"{share}/checkpoints/skysense_v2_tiny_ssl.pt"], cwd=elsewhere,
                          env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert info.returncode == 0 and "skysense_v2_tiny" in info.stdout


@pytest.mark.skipif(not SCENES.exists(), reason="Slovenia sample data not available")
def test_installed_wheel_runs_a_job_from_another_directory(installed: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.yaml", write_cube(tmp_path / "cube.zarr", size=(32, 32)), str(tmp_path / "out"),
                    write_checkpoint(tmp_path / "micro.pt"))  # fmt: skip
    run = subprocess.run([str(installed / "bin" / "skypipe"), "run", str(job), "--no-progress"], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out" / "quicklook.png").exists() and "archive" in run.stdout
