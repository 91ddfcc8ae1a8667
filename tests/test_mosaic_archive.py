"""Embedding archives: int8 error bounds, GeoParquet per-tile vectors, provenance checks on open / append, idempotent
rebuilds and appends, one writer at a time."""

from __future__ import annotations

import copy
import logging
import shutil

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xarray as xr
from affine import Affine
from mosaic_fixtures import PROVENANCE, linear_model, load_s2_chip, write_tile_store

from pipeline.lease import LeaseHeldError, OutputLease
from pipeline.mosaic.archive import (
    DuplicateSourcesError,
    ProvenanceError,
    append_to_archive,
    build_archive,
    dequantize,
    open_archive,
    quantize,
)
from pipeline.mosaic.stitch import stitch_tiles


def _embeddings(bands: np.ndarray, n: int = 16, seed: int = 0) -> np.ndarray:
    """A per-pixel non-linear "embedding" of real S2 values (so channels have different ranges)."""
    return np.tanh(linear_model(bands * 4, n, seed=seed)).astype(np.float32) * np.linspace(0.5, 3, n)[:, None, None]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    bands, crs, transform = load_s2_chip()
    emb = _embeddings(bands).astype(np.float32)
    tiles = write_tile_store(str(root / "job"), emb, crs, transform, 32, 8, statuses={2: "failed"})
    mosaic = stitch_tiles(tiles, str(root / "job" / "mosaic.zarr"), chunks=64)
    return {"root": root, "emb": emb, "tiles": tiles, "mosaic": mosaic, "crs": crs, "transform": transform,
            "bands": bands}  # fmt: skip


def _cos(a_CN: np.ndarray, q_C: np.ndarray) -> np.ndarray:
    return (q_C @ a_CN) / (np.linalg.norm(a_CN, axis=0) * np.linalg.norm(q_C))


def test_int8_error_is_bounded_and_cosine_similarity_preserved(job):
    emb = xr.DataArray(job["emb"], dims=("band", "y", "x")).chunk({"y": 50, "x": 50})
    emb = emb.where(emb.x > 3)  # some no-data
    q = quantize(emb)
    assert q["embedding"].dtype == np.int8
    back = dequantize(q).values
    orig = emb.values
    np.testing.assert_array_equal(np.isnan(back), np.isnan(orig))
    err = np.abs(back - orig)
    bound = (np.nanmax(orig, axis=(1, 2)) - np.nanmin(orig, axis=(1, 2))) / 508  # documented: scale / 2
    float32_rounding = 2 * np.finfo(np.float32).eps * np.abs(orig)
    assert (err <= bound[:, None, None] * 1.0001 + float32_rounding)[~np.isnan(orig)].all()
    ok = ~np.isnan(orig).any(0)
    flat_f, flat_q = orig[:, ok], back[:, ok]
    rng = np.random.default_rng(0)
    for i in rng.choice(flat_f.shape[1], 5, replace=False):
        diff = np.abs(_cos(flat_q, flat_q[:, i]) - _cos(flat_f, flat_f[:, i]))
        assert diff.max() < 1e-2, diff.max()  # measured ~1e-3


def test_build_archive_layout(job):
    url = build_archive(job["mosaic"], job["tiles"], str(job["root"] / "arch"))
    archive = open_archive(url)
    assert archive.names == ["0000"] and archive.meta["quantized"]
    ds = archive.mosaic()
    assert ds["embedding"].dtype == np.int8 and ds.rio.crs.to_epsg() == 32633
    assert ds.rio.transform() == Affine(*job["transform"])
    emb = archive.embeddings()
    assert emb.dtype == np.float32 and emb.rio.crs.to_epsg() == 32633
    ok = ~np.isnan(emb.values)
    assert np.abs(emb.values[ok] - job["emb"][ok]).max() < 0.02

    table = gpd.read_parquet(job["root"] / "arch" / "tiles.parquet")
    assert table.crs.to_epsg() == 32633
    assert len(table) == 15  # 4 x 4 tiles, one failed
    assert {"tile_id", "geometry", "time_start", "time_end", "model", "code_version", "checkpoint",
            "checkpoint_sha256", "preprocessing", "vector"} <= set(table.columns)  # fmt: skip
    assert table["model"].iloc[0] == PROVENANCE["model"] and table["time_start"].iloc[0] == "2015-07-01"
    assert np.stack(table["vector"]).shape == (15, 16)
    # footprints: 32 x 32 pixels of the grid
    t = Affine(*job["transform"])
    assert table.geometry.area.round(3).unique().tolist() == [round(32 * 32 * t.a * -t.e, 3)]
    first = table[(table["row"] == 0) & (table["col"] == 0)].iloc[0]  # the top-left tile
    np.testing.assert_allclose(first["vector"], job["emb"][:, :32, :32].mean((1, 2)), rtol=1e-5, atol=1e-6)
    import pyarrow.parquet as pq

    vector_type = pq.read_schema(job["root"] / "arch" / "tiles.parquet").field("vector").type
    assert vector_type.list_size == 16 and vector_type.value_type == "float"


def test_float_archive_is_exact(job):
    archive = open_archive(build_archive(job["mosaic"], job["tiles"], str(job["root"] / "f32"), quantize=False))
    emb = archive.embeddings().values
    ok = ~np.isnan(emb)
    np.testing.assert_allclose(emb[ok], job["emb"][ok], atol=1e-6)


def test_append_same_model_and_refuse_other_model(job, tmp_path):
    url = build_archive(job["mosaic"], job["tiles"], str(tmp_path / "arch"))
    # a second job (another time) with the same model and preprocessing
    prov2 = copy.deepcopy(PROVENANCE) | {"time": ["2015-08-01", "2015-08-31"]}
    emb2 = _embeddings(job["bands"] * 0.9)
    tiles2 = write_tile_store(str(tmp_path / "job2"), emb2, job["crs"], job["transform"], 48, 8, provenance=prov2)
    append_to_archive(url, stitch_tiles(tiles2, str(tmp_path / "job2" / "mosaic.zarr")), tiles2)
    archive = open_archive(url)
    assert archive.names == ["0000", "0001"]
    assert sorted(archive.tiles["time_start"].unique()) == ["2015-07-01", "2015-08-01"]
    assert archive.tiles.groupby("mosaic").size().to_dict() == {"0000": 15, "0001": 9}

    other = copy.deepcopy(PROVENANCE) | {"model": "other-model", "checkpoint_sha256": "b" * 64}
    tiles3 = write_tile_store(str(tmp_path / "job3"), emb2, job["crs"], job["transform"], 48, 8, provenance=other)
    mosaic3 = stitch_tiles(tiles3, str(tmp_path / "job3" / "mosaic.zarr"))
    with pytest.raises(ProvenanceError, match=r"(?s)other-model.*b{64}.*skysense-v2-tiny.*a{64}"):
        append_to_archive(url, mosaic3, tiles3)
    pre = copy.deepcopy(PROVENANCE)
    pre["preprocessing"]["s2"]["mean"] = [0.2] * 4
    tiles4 = write_tile_store(str(tmp_path / "job4"), emb2, job["crs"], job["transform"], 48, 8, provenance=pre)
    with pytest.raises(ProvenanceError, match="preprocessing differ"):
        append_to_archive(url, stitch_tiles(tiles4, str(tmp_path / "job4" / "m.zarr")), tiles4)
    assert open_archive(url).names == ["0000", "0001"]  # nothing was written by the refused appends


def test_open_archive_checks_expected_provenance(job, tmp_path):
    url = build_archive(job["mosaic"], job["tiles"], f"memory://archive-test-{tmp_path.name}/arch")
    assert open_archive(url, expect=PROVENANCE).provenance["model"] == PROVENANCE["model"]
    with pytest.raises(ProvenanceError, match=r"c{64}"):
        open_archive(url, expect=PROVENANCE | {"checkpoint_sha256": "c" * 64})


def _second_job(job, root) -> tuple[str, str]:
    """Another month of the same area and model: ``(mosaic, tiles)``."""
    prov2 = copy.deepcopy(PROVENANCE) | {"time": ["2015-08-01", "2015-08-31"]}
    emb2 = _embeddings(job["bands"] * 0.9)
    tiles2 = write_tile_store(str(root / "job2"), emb2, job["crs"], job["transform"], 48, 8, provenance=prov2)
    return stitch_tiles(tiles2, str(root / "job2" / "mosaic.zarr")), tiles2


def test_rebuilding_the_same_archive_is_a_no_op(job, tmp_path, caplog):
    url = str(tmp_path / "arch")
    build_archive(job["mosaic"], job["tiles"], url)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "arch").rglob("*") if p.is_file()}
    caplog.set_level(logging.INFO, logger="pipeline.mosaic.archive")
    build_archive(job["mosaic"], job["tiles"], url)  # a second run of the same job
    assert "up to date" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "arch").rglob("*") if p.is_file()} == files
    archive = open_archive(url)
    assert len(archive.tiles) == 15 and archive.names == ["0000"]
    assert archive.meta["sources"]["0000"]["tiles"] == 15 and len(archive.meta["sources"]["0000"]["fingerprint"]) == 64
    assert not (tmp_path / "arch" / ".lease.json").exists()  # released

    build_archive(job["mosaic"], job["tiles"], url, quantize=False)  # other settings: rebuilt, still no duplicates
    archive = open_archive(url)
    assert not archive.meta["quantized"] and len(archive.tiles) == 15


def test_appending_twice_never_duplicates_rows(job, tmp_path):
    url = build_archive(job["mosaic"], job["tiles"], str(tmp_path / "arch"))
    mosaic2, tiles2 = _second_job(job, tmp_path)
    append_to_archive(url, mosaic2, tiles2)
    append_to_archive(url, mosaic2, tiles2)  # a rerun of the same append
    append_to_archive(url, mosaic2, tiles2, name="0001")
    append_to_archive(url, job["mosaic"], job["tiles"])  # the first mosaic's tiles again
    archive = open_archive(url)
    assert archive.names == ["0000", "0001"]
    assert archive.tiles.groupby("mosaic").size().to_dict() == {"0000": 15, "0001": 9}
    assert not archive.tiles.duplicated(["mosaic", "tile_id"]).any()
    with pytest.raises(DuplicateSourcesError, match=r"already holds the tiles of .*job2.* as mosaic '0001'"):
        append_to_archive(url, mosaic2, tiles2, name="august")
    # the same tiles copied elsewhere are recognised (the fingerprint is of the content, not the URL)
    shutil.copytree(tmp_path / "job2", tmp_path / "copy")
    append_to_archive(url, str(tmp_path / "copy" / "mosaic.zarr"), str(tmp_path / "copy" / "tiles.zarr"))
    assert open_archive(url).names == ["0000", "0001"]


def test_append_after_a_killed_append_drops_its_orphan_rows(job, tmp_path):
    url = build_archive(job["mosaic"], job["tiles"], str(tmp_path / "arch"))
    mosaic2, tiles2 = _second_job(job, tmp_path)
    # what an append killed after writing the table but before archive.json leaves behind
    other = build_archive(mosaic2, tiles2, str(tmp_path / "other"), name="0001")
    table = tmp_path / "arch" / "tiles.parquet"
    half = pa.concat_tables([pq.read_table(table), pq.read_table(tmp_path / "other" / "tiles.parquet")])
    pq.write_table(half, table)
    assert open_archive(url).names == ["0000"] and len(pq.read_table(table)) == 24
    append_to_archive(url, mosaic2, tiles2)
    archive = open_archive(url)
    assert archive.tiles.groupby("mosaic").size().to_dict() == {"0000": 15, "0001": 9}
    assert open_archive(other).names == ["0001"]


def test_archive_writes_hold_the_lease(job, tmp_path):
    url = build_archive(job["mosaic"], job["tiles"], str(tmp_path / "arch"))
    mosaic2, tiles2 = _second_job(job, tmp_path)
    with OutputLease(url, what="embedding archive"):  # another writer (here: this process, which is alive)
        with pytest.raises(LeaseHeldError, match=r"(?s)embedding archive.*--break-lease"):
            append_to_archive(url, mosaic2, tiles2)
        with pytest.raises(LeaseHeldError):
            build_archive(job["mosaic"], job["tiles"], url, quantize=False)
    assert open_archive(url).names == ["0000"]
    append_to_archive(url, mosaic2, tiles2)
    assert open_archive(url).names == ["0000", "0001"]
