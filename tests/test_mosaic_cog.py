"""COG writing: valid COG with overviews, CRS / transform / nodata / band names right, values unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from mosaic_fixtures import linear_model, load_s2_chip, write_tile_store

from pipeline.mosaic.cog import cog_info, write_cog
from pipeline.mosaic.stitch import CLASS_NODATA, stitch_tiles


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory):
    root = tmp_path_factory.mktemp("cog")
    bands, crs, transform = load_s2_chip()
    emb = linear_model(bands, 6)
    tiles = write_tile_store(str(root / "emb"), emb, crs, transform, 32, 8, statuses={0: "failed"})
    logits = linear_model(bands, 3, seed=1)
    seg_tiles = write_tile_store(str(root / "seg"), logits, crs, transform, 48, 8, kind="segmentation",
                                 channels=["water", "forest", "urban"], statuses={0: "failed"})  # fmt: skip
    return {
        "root": root, "emb": emb, "logits": logits, "transform": Affine(*transform),
        "emb_url": stitch_tiles(tiles, str(root / "emb" / "mosaic.zarr"), chunks=64),
        "seg_url": stitch_tiles(seg_tiles, str(root / "seg" / "mosaic.zarr"), chunks=64),
    }  # fmt: skip


def test_embedding_cog_is_valid_and_georeferenced(mosaics):
    path = write_cog(mosaics["emb_url"], str(mosaics["root"] / "emb.tif"), blocksize=32)
    info = cog_info(path)
    assert info["valid"], info["errors"]
    assert info["overviews"] == [2, 4]
    assert info["crs"].to_epsg() == 32633
    assert info["transform"] == mosaics["transform"]
    assert np.isnan(info["nodata"])
    assert info["descriptions"] == [f"c{i:03d}" for i in range(6)]
    assert info["dtype"] == "float32" and info["count"] == 6
    assert info["compression"].name == "deflate"
    with rasterio.open(path) as src:
        pixels = src.read()
        assert src.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "3"
    hole = np.isnan(pixels).all(0)
    assert hole[0, 0] and not hole[-1, -1]  # the failed first tile, covered by no other tile at the corner
    np.testing.assert_allclose(pixels[:, ~hole], mosaics["emb"][:, ~hole], atol=1e-6)


def test_band_subset_and_unknown_band(mosaics):
    path = write_cog(mosaics["emb_url"], str(mosaics["root"] / "sub.tif"), bands=["c004", "c001"])
    info = cog_info(path)
    assert info["valid"] and info["descriptions"] == ["c004", "c001"]
    with rasterio.open(path) as src:
        np.testing.assert_allclose(src.read(1)[-1], mosaics["emb"][4, -1], atol=1e-6)
    with pytest.raises(KeyError, match="c999"):
        write_cog(mosaics["emb_url"], str(mosaics["root"] / "bad.tif"), bands=["c999"])


def test_segmentation_class_cog(mosaics):
    path = write_cog(mosaics["seg_url"], str(mosaics["root"] / "classes.tif"), variable="classes", blocksize=32)
    info = cog_info(path)
    assert info["valid"] and info["dtype"] == "uint8" and info["nodata"] == CLASS_NODATA
    assert info["tags"]["kind"] == "segmentation"
    with rasterio.open(path) as src:
        classes = src.read(1)
    covered = classes != CLASS_NODATA
    assert not covered.all()
    np.testing.assert_array_equal(classes[covered], mosaics["logits"].argmax(0)[covered])
    probs = cog_info(write_cog(mosaics["seg_url"], str(mosaics["root"] / "logits.tif")))
    assert probs["valid"] and probs["descriptions"] == ["water", "forest", "urban"]


def test_cog_to_fsspec_url(mosaics):
    import fsspec

    url = "memory://cog-test/out/emb.tif"
    write_cog(mosaics["emb_url"], url, bands=["c000"])
    data = fsspec.filesystem("memory").cat_file("/cog-test/out/emb.tif")
    with rasterio.MemoryFile(data) as mem, mem.open() as src:
        assert src.crs.to_epsg() == 32633 and src.descriptions == ("c000",)
