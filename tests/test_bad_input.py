"""Bad input through the real CLI: the exit code, a message of one or two lines naming the culprit, no traceback, and
nothing already written changed.

A finished job (cube, tiles, mosaic, COG, archive) is made once; every case then runs ``skypipe`` against it (or
against a broken catalog of real Sentinel-2 scenes) and checks the output folder and the cube byte for byte.
Exit codes: 2 user error, 1 failed run, 3 partial result (``pipeline.errors``).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
import zarr
from infer_fixtures import SCENES, write_checkpoint, write_cube, write_job

from pipeline.cli import main
from pipeline.lease import OutputLease

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SCENES.exists(), reason="Slovenia sample data not available")]
pytest_plugins = ["catalog_fixtures"]

SKIP_NAMES = (".lease.json", ".lease.lock")  # the lease of a refused run comes and goes; nothing else may change


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (lease files aside)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.name not in SKIP_NAMES:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished micro job: the reference every case must leave untouched."""
    root = tmp_path_factory.mktemp("bad-input")
    cube = write_cube(root / "cube.zarr", size=(32, 32), nodata_corner=8)
    ckpt = write_checkpoint(root / "micro.pt")
    job = write_job(root / "job.yaml", cube, str(root / "out"), ckpt, tiles={"size": 24, "overlap": 8})
    assert main(["run", str(job), "--no-progress"]) == 0
    return {"root": root, "cube": Path(cube), "out": root / "out", "ckpt": Path(ckpt), "job": job}


def _variant(done: dict[str, Path], name: str, **changes: object) -> Path:
    """The finished job's spec with some fields changed, as a new file (same cube, same outputs)."""
    spec = yaml.safe_load(done["job"].read_text())
    for key, value in changes.items():
        target, *path = key.split(".")
        node = spec
        for part in [target, *path][:-1]:
            node = node.setdefault(part, {})
        node[[target, *path][-1]] = value
    path = done["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _corrupt_checkpoint(done: dict[str, Path]) -> str:
    bad = done["root"] / "corrupt.pt"
    data = bytearray(done["ckpt"].read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    bad.write_bytes(bytes(data))
    return str(bad)


def _wrong_band_checkpoint(done: dict[str, Path]) -> str:
    """A checkpoint whose S2 input is 11 bands (B01 added): the cube's 10 bands do not fit it."""
    import torch

    from pipeline.modalities import DEFAULT_MODALITIES, S2
    from pipeline.model import create_model
    from pipeline.model.checkpoint import save_checkpoint

    s2 = replace(S2, bands=("B01", *S2.bands), mean=(1.0, *S2.mean), std=(1.0, *S2.std))
    torch.manual_seed(0)
    mods = tuple(s2 if m.name == "s2" else m for m in DEFAULT_MODALITIES.values())
    model = create_model("skysense_v2_tiny", modalities=mods, dims=(32, 64, 96, 128), depths=(1, 1, 1, 1),
                         fusion_dim=64, fusion_heads=2)  # fmt: skip
    path = done["root"] / "b01.pt"
    save_checkpoint(model, path)
    return str(path)


CASES: dict[str, tuple[Callable[[dict[str, Path]], list[str]], int, str]] = {
    "unknown spec field": (lambda d: ["run", str(_variant(d, "f", tile={"size": 8}))], 2, r"tile: unknown field"),
    "missing spec file": (lambda d: ["run", str(d["root"] / "nope.yaml")], 2, r"job spec .*nope.yaml.* not found"),
    "region too large": (lambda d: ["run", str(_variant(d, "big", region=[-10, 35, 30, 60]))], 2, r"max_area_km2"),
    "geographic crs": (lambda d: ["run", str(_variant(d, "crs", crs="EPSG:4326"))], 2, r"not a projected CRS"),
    "unknown output kind": (lambda d: ["run", str(_variant(d, "k", **{"output.kind": "pictures"}))], 2,
                            r"unknown output kind 'pictures'"),
    "misspelled model name": (lambda d: ["run", str(_variant(d, "m", checkpoint="skysense_v2_tinny"))], 2,
                              r"did you mean the model name 'skysense_v2_tiny'"),
    "missing checkpoint": (lambda d: ["run", str(_variant(d, "c", checkpoint=str(d["root"] / "gone.pt")))], 2,
                           r"checkpoint '.*gone.pt' not found"),
    "corrupt checkpoint": (lambda d: ["run", str(_variant(d, "crc", checkpoint=_corrupt_checkpoint(d)))], 2,
                           r"corrupt.*re-download or re-export"),
    "checkpoint of another job": (lambda d: ["run", str(_variant(d, "other", checkpoint="skysense_v2_tiny"))], 2,
                                  r"holds tiles of a different job"),
    "cube without the model's bands": (lambda d: ["run", str(_variant(d, "b01", checkpoint=_wrong_band_checkpoint(d),
                                                                       **{"output.path": str(d["root"] / "o2")}))],
                                       2, r"needs bands .*B01.*missing \['B01'\]"),
    "no date in the time range": (lambda d: ["run", str(_variant(d, "t", time={"start": "2016-01-01",
                                                                                "end": "2016-02-01"}))],
                                  2, r"no modality of \['s2'\] has a date in every period"),
    "gpus that do not exist": (lambda d: ["run", str(_variant(d, "gpu", gpus_per_actor=1,
                                                              **{"output.path": str(d["root"] / "o3")}))],
                               2, r"asks for 1 GPU\(s\) per actor, but this machine's Ray has 0"),
    "not a cube": (lambda d: ["cube", "info", str(d["out"])], 2, r"not a skypipe cube|no Zarr cube"),
    "query vector of another width": (lambda d: ["archive", "query", str(d["out"] / "archive"), "--vector",
                                                 str(_vector(d, 7)), "--out", str(d["root"] / "q")],
                                      2, r"7 .*channels|channels"),
}  # fmt: skip


def _vector(done: dict[str, Path], n: int) -> Path:
    path = done["root"] / f"v{n}.npy"
    np.save(path, np.ones(n, dtype=np.float32))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_changes_nothing(done, case, capsys):
    build, code, pattern = CASES[case]
    args = build(done)  # before the snapshot: some cases write their own inputs (a bad checkpoint, a vector)
    before = snapshot(done["out"], done["cube"])
    capsys.readouterr()
    assert main(args) == code
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("skypipe:")]
    assert lines and "Traceback" not in err, err
    message = err.strip()[err.strip().index(lines[-1]) :]
    assert re.search(pattern, message), message
    assert len(message.splitlines()) <= 2, message
    assert snapshot(done["out"], done["cube"]) == before


def test_a_second_run_on_the_same_output_is_refused(done, capsys):
    before = snapshot(done["out"], done["cube"])
    with OutputLease(str(done["out"]), what="a concurrent run"):  # another live run holds the outputs
        capsys.readouterr()
        assert main(["run", str(done["job"]), "--no-progress"]) == 2
        err = capsys.readouterr().err
    assert "another run holds its lease" in err and "--break-lease" in err and "Traceback" not in err
    assert snapshot(done["out"], done["cube"]) == before


def test_all_nodata_cube_fails_the_run(done, tmp_path, capsys):
    cube = write_cube(tmp_path / "empty.zarr", size=(32, 32), nodata_corner=32)  # no valid pixel at all
    job = write_job(tmp_path / "job.yaml", cube, str(tmp_path / "out"), str(done["ckpt"]))
    assert main(["run", str(job), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no valid input pixel" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "mosaic.zarr").exists()


# --- unreadable inputs: real scenes served by the real loopback STAC API, some of them broken -------------------


def _broken_catalog(tmp_path: Path, broken: Callable[[str, Path], None]) -> Path:
    from pipeline.catalog.index import build_local_catalog, read_static_catalog, write_collection

    built = tmp_path / "index"
    report = build_local_catalog(built, collections=["eolearn-slovenia-s2-l1c"])
    if "eolearn-slovenia-s2-l1c" not in report.items:
        pytest.skip(f"collection could not be built: {report.skipped}")
    collection, items = read_static_catalog(built)["eolearn-slovenia-s2-l1c"]
    assets = tmp_path / "assets"
    assets.mkdir()
    for item in items:
        src = Path(item["assets"]["toa"]["href"])
        dst = assets / src.name
        shutil.copy(src, dst)
        broken(item["id"], dst)
        item["assets"]["toa"]["href"] = str(dst)
    write_collection(tmp_path / "catalog", collection, items)
    return tmp_path / "catalog"


def _catalog_job(tmp_path: Path, url: str) -> Path:
    from pipeline.catalog.config import REPO_ROOT, load_catalog

    source = load_catalog("local-slovenia").source("s2").model_dump(exclude_defaults=True)
    catalog = {"name": "broken", "kind": "local", "url": url, "modalities": {"s2": source}}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    job = yaml.safe_load((REPO_ROOT / "jobs" / "cube-slovenia.yaml").read_text())
    job.update(catalog=str(tmp_path / "broken.yaml"), checkpoint=str(write_checkpoint(tmp_path / "m.pt")))
    job["cube"]["path"] = str(tmp_path / "cube.zarr")
    job["output"]["path"] = str(tmp_path / "out")
    job["tiles"] = {"size": 48, "overlap": 8}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def test_every_input_unreadable_fails_before_writing(tmp_path, shared_data, capsys):
    from pipeline.catalog.serve import LocalStacServer

    catalog = _broken_catalog(tmp_path, lambda _id, dst: dst.unlink())  # every scene is missing (HTTP 404)
    with LocalStacServer(catalog) as srv:
        job = _catalog_job(tmp_path, srv.url)
        assert main(["run", str(job), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no s2 input could be read" in err and "not found (HTTP 404)" in err and "Traceback" not in err
    assert not (tmp_path / "cube.zarr").exists() and not (tmp_path / "out" / "tiles.zarr").exists()


def test_a_truncated_scene_gives_a_partial_result(tmp_path, shared_data, capsys):
    from pipeline.catalog.serve import LocalStacServer

    def cut(item_id: str, dst: Path) -> None:
        if item_id == "S2L1C_20150711":  # a clear date: its pixels matter
            with rasterio.open(dst) as src:
                profile, data, tags, desc = src.profile, src.read(), src.tags(), src.descriptions
            profile.update(driver="COG", blocksize=32, overviews="NONE", compress="DEFLATE")
            for key in ("blockxsize", "blockysize", "tiled", "interleave"):
                profile.pop(key, None)
            with rasterio.open(dst, "w", **profile) as out:
                out.write(data)
                out.update_tags(**tags)
                out.descriptions = desc
            dst.write_bytes(dst.read_bytes()[: int(dst.stat().st_size * 0.75)])  # header fine, pixel data cut

    catalog = _broken_catalog(tmp_path, cut)
    with LocalStacServer(catalog) as srv:
        job = _catalog_job(tmp_path, srv.url)
        assert main(["run", str(job), "--no-progress"]) == 3
        first = capsys.readouterr().out
        assert "PARTIAL RESULT" in first and "S2L1C_20150711" in first
        assert (tmp_path / "out" / "quicklook.png").exists()
        attrs = zarr.open_group(str(tmp_path / "cube.zarr"), mode="r")["s2"].attrs
        assert attrs["failures"], "the failed chunks are recorded with the cube"
        report = tmp_path / "out" / "report.json"  # the record of each run (rewritten by every run), not an output

        def outputs() -> dict[str, str]:
            return {k: v for k, v in snapshot(tmp_path / "out", tmp_path / "cube.zarr").items() if k != str(report)}

        before = outputs()
        assert main(["run", str(job), "--no-progress"]) == 3  # a rerun still reports it, and rewrites nothing
        assert "PARTIAL RESULT" in capsys.readouterr().out
        assert outputs() == before and report.exists()
        assert main(["status", str(job)]) == 0
        assert "problem: [s2]" in capsys.readouterr().out
