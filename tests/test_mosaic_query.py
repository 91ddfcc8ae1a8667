"""Similarity queries (library and ``skypipe archive query``) and PNG quicklooks."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from mosaic_fixtures import linear_model, load_s2_chip, write_tile_store
from PIL import Image
from rasterio.warp import transform as transform_coords

from pipeline.mosaic.archive import build_archive, open_archive
from pipeline.mosaic.cog import cog_info
from pipeline.mosaic.query import cosine_similarity, query_archive
from pipeline.mosaic.quicklook import PALETTE, quicklook
from pipeline.mosaic.stitch import stitch_tiles


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("query")
    bands, crs, transform = load_s2_chip()
    emb = np.tanh(linear_model(bands * 4, 12)).astype(np.float32)
    tiles = write_tile_store(str(root / "job"), emb, crs, transform, 32, 8, statuses={0: "failed"})
    mosaic = stitch_tiles(tiles, str(root / "job" / "mosaic.zarr"), chunks=64)
    archive = build_archive(mosaic, tiles, str(root / "archive"))
    return {"root": root, "emb": emb, "mosaic": mosaic, "archive": archive, "transform": Affine(*transform),
            "crs": crs, "bands": bands}  # fmt: skip


def _lonlat_of_pixel(job, row, col):
    x, y = job["transform"] @ (col + 0.5, row + 0.5)
    lon, lat = transform_coords(job["crs"], "EPSG:4326", [x], [y])
    return lon[0], lat[0]


def test_query_cli_lonlat(job):
    from pipeline.cli import main

    row, col = 60, 70
    lon, lat = _lonlat_of_pixel(job, row, col)
    prefix = str(job["root"] / "q" / "sim")
    assert main(["archive", "query", job["archive"], "--lonlat", str(lon), str(lat), "--out", prefix]) == 0
    info = cog_info(prefix + ".tif")
    assert info["valid"] and info["crs"].to_epsg() == 32633 and info["transform"] == job["transform"]
    assert info["descriptions"] == ["cosine_similarity"] and np.isnan(info["nodata"])
    with rasterio.open(prefix + ".tif") as src:
        sim = src.read(1)
    assert sim[row, col] == pytest.approx(1, abs=1e-5)
    assert np.nanmax(sim) <= 1 + 1e-5 and np.nanmin(sim) >= -1 - 1e-5
    assert np.isnan(sim[0, 0])  # the failed tile's corner
    emb = open_archive(job["archive"]).embeddings().values
    expected = (emb * emb[:, row, col][:, None, None]).sum(0) / (
        np.linalg.norm(emb, axis=0) * np.linalg.norm(emb[:, row, col])
    )
    np.testing.assert_allclose(sim, expected, atol=1e-5)
    png = Image.open(prefix + ".png")
    assert png.mode == "RGBA" and png.size == (100, 101)
    assert np.asarray(png)[0, 0, 3] == 0 and np.asarray(png)[row, col, 3] == 255


def test_query_xy_vector_and_errors(job, tmp_path):
    x, y = job["transform"] @ (10.5, 90.5)
    a = query_archive(job["archive"], str(tmp_path / "xy"), xy=(x, y))
    vec_file = tmp_path / "q.npy"
    np.save(vec_file, job["emb"][:, 90, 10])
    from pipeline.cli import main

    assert main(["archive", "query", job["archive"], "--vector", str(vec_file), "--out", str(tmp_path / "v")]) == 0
    with rasterio.open(a[0]) as s1, rasterio.open(tmp_path / "v.tif") as s2:
        np.testing.assert_allclose(s1.read(1), s2.read(1), atol=5e-3, equal_nan=True)  # int8 vs float query
    with pytest.raises(ValueError, match="outside"):
        query_archive(job["archive"], str(tmp_path / "out"), xy=(0.0, 0.0))
    with pytest.raises(ValueError, match="no data"):
        query_archive(job["archive"], str(tmp_path / "out"), xy=tuple(job["transform"] @ (1.5, 1.5)))
    with pytest.raises(ValueError, match="12 channels"):
        query_archive(job["archive"], str(tmp_path / "out"), vector=np.ones(3))
    assert main(["archive", "query", job["archive"], "--xy", "0", "0", "--out", str(tmp_path / "e")]) == 2


def test_cosine_similarity_is_lazy(job):
    emb = open_archive(job["archive"]).embeddings()
    sim = cosine_similarity(emb, np.ones(12))
    assert sim.chunks is not None and sim.dims == ("y", "x")


def test_quicklooks(job, tmp_path):
    bands, crs, transform = job["bands"], job["crs"], tuple(job["transform"])[:6]
    path = quicklook(job["mosaic"], str(tmp_path / "emb.png"))
    rgba = np.asarray(Image.open(path))
    assert rgba.shape == (101, 100, 4)
    assert rgba[0, 0, 3] == 0 and (rgba[..., 3] == 255).mean() > 0.9  # failed tile transparent
    assert rgba[rgba[..., 3] == 255][:, :3].std(0).min() > 20  # three informative components

    logits = linear_model(bands, 5, seed=4)
    tiles = write_tile_store(str(tmp_path / "seg"), logits, crs, transform, 48, 8, kind="segmentation",
                             statuses={0: "failed"})  # fmt: skip
    seg = stitch_tiles(tiles, str(tmp_path / "seg" / "mosaic.zarr"))
    full = np.asarray(Image.open(quicklook(seg, str(tmp_path / "seg.png"))))
    assert full.shape[0] > 101 and (full[101:, ..., 3] == 255).all()  # an opaque legend band below the map
    legend = full[101:, :, :3].reshape(-1, 3)
    for colour in PALETTE[:5]:  # every class has its swatch
        assert (legend == colour).all(axis=1).any()
    rgba = full[:101, :100]
    ok = rgba[..., 3] == 255
    np.testing.assert_array_equal(rgba[ok][:, :3], PALETTE[logits.argmax(0)][ok])
    assert not ok[0, 0]

    small = np.asarray(Image.open(quicklook(job["mosaic"], str(tmp_path / "small.png"), max_size=40)))
    assert max(small.shape[:2]) <= 40
    sim = query_archive(job["archive"], str(tmp_path / "s"), xy=tuple(job["transform"] @ (50.5, 50.5)))[0]
    ramp = np.asarray(Image.open(quicklook(sim, str(tmp_path / "sim.png"))))
    assert ramp.shape == (101, 100, 4) and ramp[0, 0, 3] == 0


def test_cli_stitch_cog_quicklook_build(job, tmp_path):
    from pipeline.cli import main

    tiles = str(job["root"] / "job" / "tiles.zarr")
    mosaic, cog, png, arch = (str(tmp_path / n) for n in ("m.zarr", "m.tif", "m.png", "arch"))
    assert main(["mosaic", "stitch", tiles, "--out", mosaic, "--chunks", "64"]) == 0
    assert main(["mosaic", "cog", mosaic, "--out", cog, "--bands", "c000,c003"]) == 0
    assert cog_info(cog)["descriptions"] == ["c000", "c003"]
    assert main(["mosaic", "quicklook", mosaic, "--out", png, "--max-size", "50"]) == 0
    assert max(Image.open(png).size) <= 50
    assert main(["archive", "build", mosaic, tiles, "--out", arch]) == 0
    # the int8 archive mosaic renders like the float one
    q8 = np.asarray(Image.open(quicklook(f"{arch}/mosaics/0000.zarr", str(tmp_path / "q8.png"), "pca")))
    f32 = np.asarray(Image.open(quicklook(mosaic, str(tmp_path / "f32.png"))))
    assert np.abs(q8.astype(int) - f32.astype(int)).mean() < 3
