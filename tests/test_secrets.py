"""A signed-catalog cube build through the real CLI leaves its token in no file, log line or stream.

The catalog is the eo-learn Slovenia S2 time series served by the real loopback STAC API (rustac) and range-request
asset server, with ``signing: sas-token``: every asset href is signed with a SAS token (from ``$SKYPIPE_SAS_TOKEN``,
as a user would export it) whose signature is a unique marker. One scene is missing (HTTP 404), one has a truncated
header (skipped when planning) and one is a COG cut short in its pixel data (chunk failures at read time), so
skipped-asset records, failure records and warnings are all written. Then every file under the test's folder (the
cube, ``<cube>.manifest/``, ``<cube>.quicklooks/``, temporary files) and every line of stdout and stderr (logging at
DEBUG, where rasterio names each dataset it opens) is searched for the marker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import rasterio
import yaml
import zarr

from pipeline.catalog.config import REPO_ROOT, load_catalog
from pipeline.catalog.index import build_local_catalog, read_static_catalog, write_collection
from pipeline.catalog.serve import LocalStacServer
from pipeline.catalog.signing import SAS_TOKEN_ENV

pytest_plugins = ["catalog_fixtures"]

COLLECTION = "eolearn-slovenia-s2-l1c"
MISSING, CUT_HEADER, CUT_PIXELS = "S2L1C_20150731", "S2L1C_20150820", "S2L1C_20150830"


def _cut_pixels_cog(src: Path, dst: Path) -> None:
    """``src`` rewritten as a COG (header first, 32 px tiles), then cut to 75 %: it opens, its lower tiles fail."""
    with rasterio.open(src) as ds:
        profile, data, tags, descriptions = ds.profile, ds.read(), ds.tags(), ds.descriptions
    for key in ("blockxsize", "blockysize", "tiled", "interleave"):
        profile.pop(key, None)
    profile.update(driver="COG", blocksize=32, overviews="NONE", compress="DEFLATE")
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
        out.update_tags(**tags)
        out.descriptions = descriptions
    dst.write_bytes(dst.read_bytes()[: int(dst.stat().st_size * 0.75)])


@pytest.fixture
def broken_catalog(tmp_path: Path, shared_data: Path) -> Path:
    """The Slovenia collection with its scenes copied: one deleted, one header cut, one pixel data cut."""
    built = tmp_path / "index"
    report = build_local_catalog(built, collections=[COLLECTION])
    if COLLECTION not in report.items:
        pytest.skip(f"collection {COLLECTION} could not be built: {report.skipped}")
    collection, items = read_static_catalog(built)[COLLECTION]
    assets = tmp_path / "assets"
    assets.mkdir()
    for item in items:
        src = Path(item["assets"]["toa"]["href"])
        dst = assets / src.name
        if item["id"] == CUT_PIXELS:
            _cut_pixels_cog(src, dst)
        elif item["id"] != MISSING:
            shutil.copy(src, dst)
        if item["id"] == CUT_HEADER:  # eo-learn keeps its IFD at the end: the header is gone
            dst.write_bytes(dst.read_bytes()[:120_000])
        item["assets"]["toa"]["href"] = str(dst)
    catalog_dir = tmp_path / "catalog"
    write_collection(catalog_dir, collection, items)
    shutil.rmtree(built)
    return catalog_dir


@pytest.fixture
def served(broken_catalog: Path) -> Iterator[LocalStacServer]:
    """The catalog on loopback; the asset server on a port containing "404" where one is free."""
    for port in [*range(40400, 40420), 0]:
        try:
            with LocalStacServer(broken_catalog, assets_port=port) as srv:
                yield srv
            return
        except OSError:
            continue


def _write_job(tmp_path: Path, api_url: str) -> Path:
    source = load_catalog("local-slovenia").source("s2").model_dump(exclude_defaults=True)
    catalog = {
        "name": "signed-slovenia",
        "kind": "local",
        "url": api_url,
        "signing": "sas-token",
        "description": "test: the local Slovenia catalog behind SAS-signed hrefs",
        "modalities": {"s2": source},
    }
    (tmp_path / "signed-slovenia.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    job = yaml.safe_load((REPO_ROOT / "jobs" / "cube-slovenia.yaml").read_text())
    job["catalog"] = str(tmp_path / "signed-slovenia.yaml")
    job["cube"]["path"] = str(tmp_path / "out" / "cube.zarr")
    job["output"]["path"] = str(tmp_path / "out" / "embeddings")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def test_signed_cube_build_writes_and_logs_no_token(tmp_path: Path, served: LocalStacServer):
    marker = f"SKYPIPETOKEN{uuid.uuid4().hex}"
    token = f"st=2026-01-01T00%3A00%3A00Z&se=2099-01-01T00%3A00%3A00Z&sp=rl&sv=2024-05-04&sr=c&sig={marker}"
    job = _write_job(tmp_path, served.url)
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, SAS_TOKEN_ENV: token, "TMPDIR": str(tmp_path / "tmp"), "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "pipeline.cli", "--verbose", "cube", "build", str(job), "--no-progress"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: built, some inputs unreadable

    # The reads went out signed ...
    assert any(marker in path for _, path, _ in served.asset_server.requests)
    # ... the logs met the token (rasterio names every dataset it opens) and masked it ...
    assert "sig=REDACTED" in proc.stderr
    for stream in (proc.stdout, proc.stderr):
        assert marker not in stream
    # ... and no file anywhere under the test's folder holds it: cube, manifest, quicklooks, temporary files.
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    cube = tmp_path / "out" / "cube.zarr"
    assert any(p.is_relative_to(cube) for p in written)
    assert any(p.is_relative_to(tmp_path / "out" / "cube.zarr.manifest") for p in written)
    assert any(p.is_relative_to(tmp_path / "out" / "cube.zarr.quicklooks") for p in written)
    leaks = [str(p) for p in written if marker.encode() in p.read_bytes()]
    assert not leaks

    # The failures were recorded (so the check above covered them), with causes and hrefs without tokens.
    attrs = zarr.open_group(str(cube), mode="r")["s2"].attrs
    skipped = {s["item"]: s for s in attrs["skipped_assets"]}
    assert skipped[MISSING]["error"] == "not found (HTTP 404)"
    assert "truncated or corrupt" in skipped[CUT_HEADER]["error"]
    for s in skipped.values():
        assert s["href"].startswith(served.assets_url) and "?" not in s["href"]
    assert attrs["failures"] and all(f["items"] == [CUT_PIXELS] for f in attrs["failures"])
    hrefs = [h for entries in attrs["items"].values() for e in entries for h in e["hrefs"].values()]
    assert hrefs and all("?" not in h for h in hrefs)
    plan = json.loads((tmp_path / "out" / "cube.zarr.manifest" / "plan.json").read_text())
    assert {s["item"] for s in plan["skipped_assets"]["s2"]} == {MISSING, CUT_HEADER}
    assert "not found (HTTP 404)" in proc.stderr and "could not be read" in proc.stderr
