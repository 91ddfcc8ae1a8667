"""COG writing: valid COG with overviews, CRS / transform / nodata / band names right, values unchanged; a killed
or failed write keeps the previous COG and its leftovers are removed by the next write."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from mosaic_fixtures import linear_model, load_s2_chip, write_tile_store

from pipeline.mosaic.cog import _work_prefix, cog_info, dataarray_to_cog, remove_stale_work_dirs, write_cog
from pipeline.mosaic.stitch import CLASS_NODATA, open_mosaic, stitch_tiles


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
    # opens coloured and labelled: a colour table, class names in the tags and the QGIS / GDAL sidecars
    names = ["water", "forest", "urban"]
    assert json.loads(info["tags"]["class_names"]) == names
    colors = json.loads(info["tags"]["class_colors"])
    with rasterio.open(path) as src:
        cmap = src.colormap(1)
    for i, colour in enumerate(colors):
        assert "#{:02x}{:02x}{:02x}".format(*cmap[i][:3]) == colour and cmap[i][3] == 255
    assert cmap[CLASS_NODATA][3] == 0
    qml = (mosaics["root"] / "classes.qml").read_text()
    assert all(f'label="{n}"' in qml for n in names) and f'color="{colors[1]}"' in qml
    assert "<Category>forest</Category>" in (mosaics["root"] / "classes.tif.aux.xml").read_text()
    probs = cog_info(write_cog(mosaics["seg_url"], str(mosaics["root"] / "logits.tif")))
    assert probs["valid"] and probs["descriptions"] == ["water", "forest", "urban"]


def test_cog_to_fsspec_url(mosaics):
    import fsspec

    url = "memory://cog-test/out/emb.tif"
    write_cog(mosaics["emb_url"], url, bands=["c000"])
    data = fsspec.filesystem("memory").cat_file("/cog-test/out/emb.tif")
    with rasterio.MemoryFile(data) as mem, mem.open() as src:
        assert src.crs.to_epsg() == 32633 and src.descriptions == ("c000",)


# A COG write that takes ~10 s (every 32 x 32 block sleeps), to be killed in the middle.
SLOW_WRITER = r"""
import sys, time
import dask.array as da
import numpy as np
import rioxarray  # noqa: F401
import xarray as xr
from pipeline.mosaic.cog import dataarray_to_cog

def slow(block):
    time.sleep(0.3)
    return block

data = da.ones((2, 256, 256), dtype="float32", chunks=(2, 32, 32)).map_blocks(slow)
coords = {"y": 5e6 - 10 * np.arange(256), "x": 5e5 + 10 * np.arange(256)}
arr = xr.DataArray(data, dims=("band", "y", "x"), coords=coords)
dataarray_to_cog(arr.rio.write_crs(32633), sys.argv[1], blocksize=32)
"""


def _work_dirs(folder) -> list:
    return sorted(p for p in folder.iterdir() if p.name.startswith(".cog-"))


def test_killed_write_keeps_the_previous_cog_and_the_next_write_cleans_up(mosaics, tmp_path):
    path = tmp_path / "out" / "emb.tif"
    write_cog(mosaics["emb_url"], str(path), blocksize=32)
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(path)])
    try:
        deadline = time.monotonic() + 60
        while not any((d / "raw.tif").exists() for d in _work_dirs(path.parent)):  # the write is under way
            assert proc.poll() is None and time.monotonic() < deadline, "the writer ended before it was killed"
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(_work_dirs(path.parent)) == 1  # the killed run's leftovers
    assert path.read_bytes() == before and cog_info(path)["valid"]

    # a live writer's work folder (this process) and a recent one of another machine are left alone
    live = tempfile.mkdtemp(dir=path.parent, prefix=_work_prefix())
    foreign = path.parent / ".cog-123-0badcafe-abc"
    foreign.mkdir()
    write_cog(mosaics["emb_url"], str(path), bands=["c001"], blocksize=32)
    info = cog_info(path)
    assert info["valid"] and info["descriptions"] == ["c001"]
    assert [p.name for p in _work_dirs(path.parent)] == sorted([foreign.name, Path(live).name])
    assert remove_stale_work_dirs(str(path.parent), max_age_s=0) == [str(foreign)]  # old enough: gone


def test_failed_write_leaves_the_previous_cog(mosaics, tmp_path):
    path = tmp_path / "emb.tif"
    write_cog(mosaics["emb_url"], str(path), bands=["c000"], blocksize=32)
    before = path.read_bytes()

    def boom(block, block_info=None):
        if block_info[0]["chunk-location"] == (0, 1, 1):
            raise RuntimeError("disk on fire")
        return block

    arr = open_mosaic(mosaics["emb_url"])["data"]
    arr = arr.copy(data=arr.data.map_blocks(boom, dtype=arr.dtype))
    with pytest.raises(RuntimeError, match="disk on fire"):
        dataarray_to_cog(arr, str(path), blocksize=32)
    assert path.read_bytes() == before and not _work_dirs(tmp_path)
