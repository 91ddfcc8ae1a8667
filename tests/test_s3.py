"""A whole job on ``s3://`` URLs: cube, tile store, manifest, mosaic, COG and archive on a real S3 API.

The S3 server is moto's standalone server (a real HTTP S3 API, here on 127.0.0.1); s3fs talks to it through
``AWS_ENDPOINT_URL``, exactly as it would to AWS or MinIO. The job runs through local Ray actors, which inherit the
endpoint and credentials from the environment, and must give the same tiles as the same job on local paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: keep it on loopback

import numpy as np
import pytest
import xarray as xr
import yaml
import zarr
from infer_fixtures import SCENES, write_checkpoint, write_cube, write_job
from s3_server import moto_s3

pytest.importorskip("ray")
s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from pipeline.job.run import run_job  # noqa: E402
from pipeline.mosaic.archive import open_archive  # noqa: E402
from pipeline.spec import load_job  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SCENES.exists(), reason="eo-learn Slovenia sample data not available"),
]
BUCKET = "skypipe-test"


@pytest.fixture(scope="module")
def s3() -> Iterator[s3fs.S3FileSystem]:
    with moto_s3(BUCKET) as fs:
        yield fs


def _job(tmp_path: Path, cube: str, out: str, ckpt: str) -> Path:
    path = write_job(tmp_path / f"job-{abs(hash(out))}.yaml", cube, out, ckpt)
    spec = yaml.safe_load(path.read_text())
    spec["tiles"] = {"size": 32, "overlap": 8}  # 3 x 3 tiles on 64 x 64 px
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_job_on_s3_urls_matches_the_same_job_on_local_paths(s3, tmp_path):
    local_cube = write_cube(tmp_path / "cube.zarr", size=(64, 64))
    s3.put(local_cube, f"{BUCKET}/cube.zarr", recursive=True)
    ckpt = write_checkpoint(tmp_path / "micro.pt")

    remote = run_job(load_job(_job(tmp_path, f"s3://{BUCKET}/cube.zarr", f"s3://{BUCKET}/out", ckpt)), progress=False)
    local = run_job(load_job(_job(tmp_path, local_cube, str(tmp_path / "out"), ckpt)), progress=False)
    assert remote.ok and local.ok, remote.format()

    names = set(s3.ls(f"{BUCKET}/out", detail=False))
    for part in ("tiles.zarr", "mosaic.zarr", "embeddings.tif", "archive", "manifest", "quicklook.png"):
        assert f"{BUCKET}/out/{part}" in names, (part, names)
    records = s3.ls(f"{BUCKET}/out/manifest/tiles", detail=False)
    assert len(records) == 9

    a = zarr.open_group(f"s3://{BUCKET}/out/tiles.zarr", mode="r")
    b = zarr.open_group(str(tmp_path / "out" / "tiles.zarr"), mode="r")
    np.testing.assert_array_equal(a["data"][:], b["data"][:])  # CPU tiles are deterministic
    m = xr.open_zarr(f"s3://{BUCKET}/out/mosaic.zarr", decode_coords="all", consolidated=False)
    assert m.rio.crs.to_epsg() == 32633 and m["data"].shape == (64, 64, 64)
    with s3.open(f"{BUCKET}/out/embeddings.tif", "rb") as f:
        assert f.read(4) in (b"II*\x00", b"II+\x00")  # a TIFF / BigTIFF header
    archive = open_archive(f"s3://{BUCKET}/out/archive")
    assert archive.provenance["checkpoint_sha256"] == a.attrs["provenance"]["checkpoint_sha256"]
