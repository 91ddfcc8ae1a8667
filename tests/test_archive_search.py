"""Patch table, patch index (build, append, resume after SIGKILL, staleness, provenance) and top-k search.

Layout and bookkeeping on archives of the real S2 chip with a fixed per-pixel linear "model" (fast, exactly known);
search correctness against exact search on real archives of the committed checkpoint (``archive_fixtures``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pyproj
import pytest
from mosaic_fixtures import PROVENANCE, linear_model, load_s2_chip, write_tile_store

from pipeline.cli import main as cli
from pipeline.mosaic import ann
from pipeline.mosaic.archive import (
    ProvenanceError,
    append_to_archive,
    archive_meta,
    build_archive,
    dequantize,
    open_archive,
)
from pipeline.mosaic.patch_index import PatchIndex
from pipeline.mosaic.patches import PatchGrid, quantize_rows
from pipeline.mosaic.search import ArchiveSearcher, search_archive
from pipeline.mosaic.stitch import stitch_tiles

pytest_plugins = ["archive_fixtures"]


def _emb(bands: np.ndarray, seed: int = 0) -> np.ndarray:
    return np.tanh(linear_model(bands * 4, 16, seed=seed)).astype(np.float32)


@pytest.fixture(scope="module")
def chip(tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    bands, crs, transform = load_s2_chip()
    emb = _emb(bands)
    emb[:, 80:, 70:] = np.nan  # a no-data corner
    valid = np.isfinite(emb).all(0).astype(np.uint8)
    tiles = write_tile_store(str(root / "job"), np.nan_to_num(emb), crs, transform, 32, 8, valid_HW=valid)
    mosaic = stitch_tiles(tiles, str(root / "job" / "mosaic.zarr"), chunks=64)
    prov2 = PROVENANCE | {"time": ["2015-08-01", "2015-08-31"]}
    tiles2 = write_tile_store(str(root / "job2"), _emb(bands * 0.9), crs, transform, 48, 8, provenance=prov2)
    mosaic2 = stitch_tiles(tiles2, str(root / "job2" / "mosaic.zarr"))
    return {"root": root, "tiles": tiles, "mosaic": mosaic, "tiles2": tiles2, "mosaic2": mosaic2}


def _files(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_patch_table_rows_vectors_and_geometry(chip, tmp_path):
    url = build_archive(chip["mosaic"], chip["tiles"], str(tmp_path / "arch"), patch_size=4, rows_per_file=200)
    meta = archive_meta(url)
    record = meta["sources"]["0000"]["patches"]
    assert meta["patches"] == {"size": 4, "min_valid": 0.5, "rows_per_file": 200}
    assert len(record["files"]) > 1 and all(f["path"].startswith("patches/0000/part-") for f in record["files"])
    table = gpd.read_parquet(tmp_path / "arch" / "patches" / "0000")  # the folder reads as one table
    assert len(table) == record["rows"] == sum(f["rows"] for f in record["files"])
    assert table.crs.to_epsg() == 32633 and set(table.geom_type) == {"Polygon"}
    schema = pq.read_schema(tmp_path / "arch" / record["files"][0]["path"])
    assert schema.field("vector").type.value_type == "int8" and schema.field("vector").type.list_size == 16
    # every vector is the mean of the stored (dequantised) pixels of its patch, within the row quantisation
    emb = dequantize(open_archive(url).mosaic()).values  # (C, 101, 100)
    grid_rows, grid_cols = -(-101 // 4), -(-100 // 4)
    expected = {}
    for pr in range(grid_rows):
        for pc in range(grid_cols):
            block = emb[:, pr * 4 : pr * 4 + 4, pc * 4 : pc * 4 + 4].reshape(16, -1)
            ok = np.isfinite(block).all(0)
            if ok.sum() >= 8:  # min_valid 0.5 of 16 pixels
                expected[pr, pc] = (block[:, ok].mean(1), ok.sum() / 16)
    assert set(zip(table["prow"], table["pcol"])) == set(expected)
    for row in table.sample(40, random_state=0).itertuples():
        mean, share = expected[row.prow, row.pcol]
        vec = np.asarray(row.vector, np.float32) * row.scale
        assert np.abs(vec - mean).max() <= row.scale / 2 + 1e-6
        assert row.valid_fraction == pytest.approx(share)
        assert row.patch_id == row.prow * grid_cols + row.pcol and (row.row, row.col) == (row.prow * 4, row.pcol * 4)
    # footprints: 4 x 4 pixels from the grid's origin; the last row is cut at the grid's edge (101 rows)
    px = abs(open_archive(url).mosaic().rio.transform().a)
    inner = table[(table["prow"] < grid_rows - 1)]
    assert np.allclose(inner.geometry.area, (4 * px) * (4 * 9.99740), rtol=1e-3)
    assert grid_rows - 1 not in set(table["prow"])  # 1 of 4 pixel rows in the grid: under min_valid
    grid = PatchGrid.from_json(record["grid"])
    cut = grid.boxes(np.array([grid_rows - 1]), np.array([0]))[0]
    assert cut.area == pytest.approx(inner.geometry.area.iloc[0] / 4, rel=1e-3)  # cut at the grid's edge
    lon, lat = table["lon"].to_numpy(), table["lat"].to_numpy()
    assert (lon > 14.55).all() and (lon < 14.57).all() and (lat > 45.86).all() and (lat < 45.88).all()
    assert table["time_start"].unique().tolist() == ["2015-07-01"] and table["model"].iloc[0] == PROVENANCE["model"]


def test_row_quantisation_bound():
    x = np.random.default_rng(0).normal(size=(50, 64)).astype(np.float32) * np.linspace(0.1, 5, 50)[:, None]
    q, scale = quantize_rows(x)
    assert np.all(np.abs(q.astype(np.float32) * scale[:, None] - x) <= scale[:, None] / 2 + 1e-6)


def test_append_adds_files_and_shards_without_rewriting(chip, tmp_path):
    url = build_archive(chip["mosaic"], chip["tiles"], str(tmp_path / "arch"), patch_size=4, rows_per_file=200)
    before = _files(tmp_path / "arch" / "patches") | _files(tmp_path / "arch" / "index" / "shards")
    state = ann.read_state(url)
    append_to_archive(url, chip["mosaic2"], chip["tiles2"])
    after = _files(tmp_path / "arch" / "patches") | _files(tmp_path / "arch" / "index" / "shards")
    assert {p: after[p] for p in before} == before  # nothing of the first mosaic was rewritten
    new = sorted(p.relative_to(tmp_path / "arch").as_posix() for p in set(after) - set(before))
    assert new and all(p.startswith(("patches/0001/", "index/shards/0001/")) for p in new)
    state2 = ann.read_state(url)
    assert state2["trained"] == state["trained"] and state2["next_id"] > state["next_id"]
    assert [s["mosaic"] for s in state2["shards"]].count("0001") == len(
        archive_meta(url)["sources"]["0001"]["patches"]["files"]
    )
    assert ann.index_status(url, archive_meta(url)).fresh
    append_to_archive(url, chip["mosaic2"], chip["tiles2"])  # the same append again: nothing changes
    assert ann.read_state(url) == state2


def _index_cmd(url: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    code = "import sys; from pipeline.cli import main; sys.exit(main(['archive', 'index', sys.argv[1]]))"
    return subprocess.run([sys.executable, "-c", code, url], env={**os.environ, **env}, capture_output=True, text=True)


def test_killed_index_build_resumes(chip, tmp_path):
    url = build_archive(chip["mosaic"], chip["tiles"], str(tmp_path / "arch"), patch_size=2, rows_per_file=200)
    reference = ann.read_state(url)
    assert len(reference["shards"]) >= 5
    ref_hits = ArchiveSearcher(url).search(ArchiveSearcher(url).index.vectors(np.array([7]))[0], 20).hits
    ann.update_index(url, archive_meta(url), rebuild=True)  # a fresh index, then killed while encoding shards
    import shutil

    shutil.rmtree(tmp_path / "arch" / "index")
    killed = _index_cmd(url, {ann.KILL_AFTER_ENV: "2"})
    assert killed.returncode == -9, killed.stderr
    state = ann.read_state(url)
    assert len(state["shards"]) == 2
    kept = _files(tmp_path / "arch" / "index" / "shards")
    status = ann.index_status(url, archive_meta(url))
    assert not status.fresh and "not indexed" in status.describe()
    with pytest.raises(ann.StaleIndexError, match=r"stale .* run `skypipe archive index"):
        PatchIndex.open(url, archive_meta(url), update=False)
    done = _index_cmd(url, {})
    assert done.returncode == 0, done.stderr
    final = ann.read_state(url)
    assert {p: _files(tmp_path / "arch" / "index" / "shards")[p] for p in kept} == kept  # resumed, not redone
    assert final["next_id"] == reference["next_id"] and len(final["shards"]) == len(reference["shards"])
    hits = ArchiveSearcher(url).search(ArchiveSearcher(url).index.vectors(np.array([7]))[0], 20).hits
    assert hits[["mosaic", "prow", "pcol"]].equals(ref_hits[["mosaic", "prow", "pcol"]])


def test_stale_index_is_updated_before_a_search(chip, tmp_path):
    url = build_archive(chip["mosaic"], chip["tiles"], str(tmp_path / "arch"), patch_size=2, rows_per_file=300)
    # an append whose index update was killed: archive.json lists mosaic 0001, the index does not
    env = {ann.KILL_AFTER_ENV: "1"}
    code = ("import sys; from pipeline.mosaic.archive import append_to_archive; "
            "append_to_archive(sys.argv[1], sys.argv[2], sys.argv[3])")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code, url, chip["mosaic2"], chip["tiles2"]],
                         env={**os.environ, **env}, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == -9
    assert archive_meta(url)["mosaics"] == ["0000", "0001"]
    assert not ann.index_status(url, archive_meta(url)).fresh
    searcher = ArchiveSearcher(url)  # brings the index up to date first (and says so in the log)
    assert ann.index_status(url, archive_meta(url)).fresh
    assert searcher.index.size == sum(s["patches"]["rows"] for s in archive_meta(url)["sources"].values())
    assert set(searcher.search(searcher.index.vectors(np.array([0]))[0], 500).hits["mosaic"]) == {"0000", "0001"}


def test_index_refuses_rows_of_another_model(chip, tmp_path):
    url = build_archive(chip["mosaic"], chip["tiles"], str(tmp_path / "arch"), patch_size=4)
    meta = archive_meta(url)
    path = tmp_path / "arch" / meta["sources"]["0000"]["patches"]["files"][0]["path"]
    table = pq.read_table(path)
    col = table.schema.get_field_index("checkpoint_sha256")
    import pyarrow as pa

    table = table.set_column(col, "checkpoint_sha256", pa.array(["b" * 64] * len(table)))
    pq.write_table(table, path)
    with pytest.raises(ProvenanceError, match=r"b{64}.*a{64}"):
        ann.update_index(url, meta, rebuild=True)


def test_archive_without_patch_table_gets_one_from_skypipe_archive_index(chip, tmp_path, capsys):
    url = build_archive(chip["mosaic"], chip["tiles"], str(tmp_path / "arch"))
    # what an archive of the previous version looks like: no patches/, no index/, nothing about them in archive.json
    import shutil

    shutil.rmtree(tmp_path / "arch" / "patches")
    shutil.rmtree(tmp_path / "arch" / "index")
    meta = json.loads((tmp_path / "arch" / "archive.json").read_text())
    meta.pop("patches")
    meta["sources"]["0000"].pop("patches")
    (tmp_path / "arch" / "archive.json").write_text(json.dumps(meta))
    assert cli(["archive", "search", url, "--lonlat", "14.556", "45.87", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no patch table" in err[0] and "skypipe archive index" in err[0]
    assert cli(["archive", "index", url, "--patch-size", "4"]) == 0
    assert cli(["archive", "search", url, "--lonlat", "14.556", "45.87", "--k", "5", "--out", str(tmp_path / "s")]) == 0
    assert len(gpd.read_parquet(tmp_path / "s" / "hits.parquet")) == 5


def _exact_top(vectors: np.ndarray, query: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = x @ (query / np.linalg.norm(query))
    cand = np.arange(len(x)) if rows is None else rows
    return cand[np.argsort(-sims[cand], kind="stable")[:k]]


def test_search_agrees_with_exact_search_on_a_real_archive(slovenia_archives, tmp_path):
    job = slovenia_archives["july"]
    url = build_archive(str(job / "mosaic.zarr"), str(job / "tiles.zarr"), str(tmp_path / "p1"), patch_size=1)
    searcher = ArchiveSearcher(url)
    state = searcher.index.state
    assert state["trained"]["nlist"] > 16 and state["nprobe"] < state["trained"]["nlist"]  # a real IVF search
    everything = searcher.index.vectors(np.arange(searcher.index.size))
    rng = np.random.default_rng(0)
    found, total = 0, 0
    for row in rng.choice(searcher.index.size, size=40, replace=False):
        hits = searcher.search(everything[row], 10)
        truth = _exact_top(everything, everything[row], 10)
        got = searcher._rows_of("0000", hits.hits["prow"].to_numpy(), hits.hits["pcol"].to_numpy())
        found += len(set(got) & set(truth))
        total += 10
        assert (np.diff(hits.hits["score"].to_numpy()) <= 1e-6).all()  # best first
    assert found / total >= 0.9, found / total  # measured: see benchmarks/RESULTS.md for the 1 M case
    # a bounding-box prefilter: only patches inside, and (narrow filter: exact path) exactly the exact top-k
    lon, lat = searcher.index.columns["lon"], searcher.index.columns["lat"]
    bbox = (float(np.quantile(lon, 0.2)), float(np.quantile(lat, 0.2)), float(np.quantile(lon, 0.5)),
            float(np.quantile(lat, 0.5)))  # fmt: skip
    hits = searcher.search(everything[3], 25, bbox=bbox).hits
    assert (
        (hits["lon"] >= bbox[0]) & (hits["lon"] <= bbox[2]) & (hits["lat"] >= bbox[1]) & (hits["lat"] <= bbox[3])
    ).all()
    inside = np.flatnonzero((lon >= bbox[0]) & (lon <= bbox[2]) & (lat >= bbox[1]) & (lat <= bbox[3]))
    got = searcher._rows_of("0000", hits["prow"].to_numpy(), hits["pcol"].to_numpy())
    assert list(got) == list(_exact_top(everything, everything[3], 25, inside))


def test_search_cli_outputs_filters_and_bad_input(slovenia_archives, tmp_path, capsys):
    july, september = slovenia_archives["july"], slovenia_archives["september"]
    url = build_archive(str(july / "mosaic.zarr"), str(july / "tiles.zarr"), str(tmp_path / "arch"), patch_size=2)
    append_to_archive(url, str(september / "mosaic.zarr"), str(september / "tiles.zarr"))
    out = tmp_path / "hits"
    assert cli(["archive", "search", url, "--lonlat", "14.5540", "45.8720", "--k", "30", "--out", str(out)]) == 0
    hits = gpd.read_parquet(out / "hits.parquet")
    assert hits.crs.to_epsg() == 4326 and len(hits) == 30 and hits["rank"].tolist() == list(range(1, 31))
    assert {"score", "mosaic", "time_start", "time_end", "patch_id", "geometry"} <= set(hits.columns)
    assert "0000" in set(hits["mosaic"])  # the query's own date first (the September mosaic: see --time below)
    assert hits["score"].iloc[0] > 0.99 and hits.geometry.iloc[0].contains(gpd.points_from_xy([14.5540], [45.8720])[0])
    assert (out / "quicklook.png").stat().st_size > 1000
    query = json.loads((out / "query.json").read_text())
    assert query["provenance"]["checkpoint_sha256"] == archive_meta(url)["provenance"]["checkpoint_sha256"]
    # the saved query vector gives the same hits; time and mosaic filters keep one date
    again_argv = ["--vector", str(out / "query.json"), "--k", "30", "--no-quicklook", "--out", str(tmp_path / "v")]
    assert cli(["archive", "search", url, *again_argv]) == 0
    again = gpd.read_parquet(tmp_path / "v" / "hits.parquet")
    assert again[["mosaic", "patch_id"]].equals(hits[["mosaic", "patch_id"]])
    assert not (tmp_path / "v" / "quicklook.png").exists()
    # as a command: its answer, not libraries' INFO lines (faiss probing its CPU builds, numexpr's threads)
    cmd = [sys.executable, "-m", "pipeline.cli", "archive", "search", url, *again_argv[:-1], str(tmp_path / "w")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "30 hits of" in proc.stdout, proc.stderr
    assert "faiss" not in proc.stderr and "numexpr" not in proc.stderr, proc.stderr
    assert cli(["archive", "search", url, "--vector", str(out / "query.json"), "--time", "2015-08-01", "2015-12-31",
                "--out", str(tmp_path / "t")]) == 0  # fmt: skip
    assert set(gpd.read_parquet(tmp_path / "t" / "hits.parquet")["mosaic"]) == {"0001"}
    assert cli(["archive", "search", url, "--vector", str(out / "query.json"), "--mosaic", "0000",
                "--out", str(tmp_path / "m")]) == 0  # fmt: skip
    assert set(gpd.read_parquet(tmp_path / "m" / "hits.parquet")["mosaic"]) == {"0000"}
    # a polygon query: the mean of the patches inside
    poly = tmp_path / "area.geojson"
    gpd.GeoDataFrame(geometry=gpd.GeoSeries.from_wkt(["POLYGON((14.552 45.872, 14.554 45.872, 14.554 45.874, "
                     "14.552 45.874, 14.552 45.872))"]), crs="EPSG:4326").to_file(poly)  # fmt: skip
    result, _ = search_archive(url, str(tmp_path / "g"), geometry=str(poly), k=5)
    assert result.query["kind"] == "geometry" and result.query["patches"] > 4 and len(result.hits) == 5
    capsys.readouterr()

    def error(*argv: str) -> str:
        assert cli(["archive", "search", url, *argv, "--out", str(tmp_path / "e")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert "lon/lat (10.0, 50.0) has no patch" in error("--lonlat", "10", "50") and "covers lon" in error(
        "--lonlat", "10", "50"
    )
    grid = PatchGrid.from_json(archive_meta(url)["sources"]["0000"]["patches"]["grid"])
    x, y = grid.centres(np.array([grid.rows - 1]), np.array([grid.cols - 1]))  # the cube's nodata corner
    lon, lat = pyproj.Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True).transform(x[0], y[0])
    assert "no embedding (no data there)" in error("--lonlat", str(lon), str(lat))
    np.save(tmp_path / "q.npy", np.asarray(query["vector"], np.float32))
    assert "--trust-vector" in error("--vector", str(tmp_path / "q.npy"))
    assert cli(["archive", "search", url, "--vector", str(tmp_path / "q.npy"), "--trust-vector", "--out",
                str(tmp_path / "n")]) == 0  # fmt: skip
    other = dict(query, provenance=query["provenance"] | {"checkpoint_sha256": "f" * 64, "model": "other"})
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert "refusing to mix embeddings" in error("--vector", str(tmp_path / "other.json"))
    empty = tmp_path / "empty.geojson"
    empty.write_text('{"type": "FeatureCollection", "features": []}')
    assert "holds no feature" in error("--geometry", str(empty))
    assert "has no mosaic(s) ['9999']" in error("--lonlat", "14.554", "45.872", "--mosaic", "9999")
