"""Stitching: exact reconstruction of per-pixel models, weights summing to one, missing tiles, fsspec URLs."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from affine import Affine
from mosaic_fixtures import PROVENANCE, linear_model, load_s2_chip, tile_origins, write_tile_store

from pipeline.infer.store import open_tile_store
from pipeline.mosaic.blend import normalised_weights, taper_1d, tile_weights
from pipeline.mosaic.stitch import CLASS_NODATA, mosaic_dataset, open_mosaic, stitch_tiles


@pytest.fixture(scope="module")
def chip():
    bands, crs, transform = load_s2_chip()  # (13, 101, 100) real S2 reflectances, EPSG:32633
    return bands, crs, transform


@pytest.mark.parametrize("overlap", [0, 1, 5, 8, 16])
def test_taper_is_flat_inside_positive_and_a_partition_of_unity(overlap):
    w = taper_1d(32, overlap)
    assert w.min() > 0 and w.max() <= 1
    assert np.all(w[overlap : 32 - overlap] == 1)
    if overlap:  # the falling edge of one tile plus the rising edge of the next sum to one
        np.testing.assert_allclose(w[-overlap:] + w[:overlap], 1, atol=1e-12)
    assert np.array_equal(w, w[::-1])
    np.testing.assert_array_equal(tile_weights(32, overlap), np.outer(w, w))


@pytest.mark.parametrize(("size", "overlap"), [(32, 8), (24, 7), (40, 12), (64, 0), (128, 16)])
def test_weights_sum_to_one_everywhere(size, overlap):
    shape = (101, 100)  # 101 is not divisible by any of the strides
    origins = tile_origins(*shape, size, overlap)
    for blend in (True, False):
        w = normalised_weights(origins, size, overlap, shape, blend=blend)
        np.testing.assert_allclose(w.sum(axis=0), 1, atol=1e-12)
        assert (w >= 0).all()


@pytest.mark.parametrize(("overlap", "margin"), [(8, 2), (16, 4), (12, 6), (9, 4)])
def test_margin_zeroes_inner_edges_and_keeps_a_partition_of_unity(overlap, margin):
    w = taper_1d(32, overlap, margin)
    assert np.all(w[:margin] == 0) and np.all(w[32 - margin :] == 0)
    assert np.all(w[overlap : 32 - overlap] == 1)
    np.testing.assert_allclose(w[-overlap:] + w[:overlap], 1, atol=1e-12)
    open_start = taper_1d(32, overlap, margin, open_start=True)  # on the grid edge: no neighbour, no taper
    assert np.all(open_start[:overlap] == 1) and np.array_equal(open_start[overlap:], w[overlap:])


@pytest.mark.parametrize(("size", "overlap", "margin", "align"), [(32, 16, 4, 8), (48, 24, 12, 8), (40, 8, 4, 1)])
def test_weights_with_margin_sum_to_one_and_skip_inner_edges(size, overlap, margin, align):
    from pipeline.infer.tiling import origins_array, plan_tiles

    shape = (101, 100)
    origins = origins_array(plan_tiles(*shape, size, overlap, align))  # aligned tiles may stick out of the grid
    w = normalised_weights(origins, size, overlap, shape, margin=margin)
    np.testing.assert_allclose(w.sum(axis=0), 1, atol=1e-12)
    for i, (r, c) in enumerate(origins):
        if r > 0:  # an inner top edge: its margin rows get no weight from this tile
            assert not w[i, r : r + margin, max(c, 0) : c + size].any()


def test_stitched_equals_untiled_with_margin(chip, tmp_path):
    bands, crs, transform = chip
    untiled = linear_model(bands, 4)
    tiles = write_tile_store(str(tmp_path / "job"), untiled, crs, transform, 32, 16, margin=5)
    mosaic = open_mosaic(stitch_tiles(tiles, str(tmp_path / "mosaic.zarr"), chunks=40))
    np.testing.assert_allclose(mosaic["data"].values, untiled, rtol=0, atol=1e-6)
    assert mosaic.attrs["margin"] == 5


@pytest.mark.parametrize(
    ("size", "overlap", "chunks"),
    [(32, 8, 48), (24, 7, 40), (40, 12, 512), (64, 0, 33), (128, 16, 64)],  # 128: grid smaller than a tile
)
def test_stitched_equals_untiled_per_pixel_model(chip, tmp_path, size, overlap, chunks):
    bands, crs, transform = chip
    untiled = linear_model(bands, 6)  # (6, 101, 100): output at a pixel depends only on that pixel
    tiles = write_tile_store(str(tmp_path / "job"), untiled, crs, transform, size, overlap)
    mosaic = open_mosaic(stitch_tiles(tiles, str(tmp_path / "mosaic.zarr"), chunks=chunks))
    np.testing.assert_allclose(mosaic["data"].values, untiled, rtol=0, atol=1e-6)
    assert mosaic["valid"].values.all()
    assert mosaic.rio.crs.to_epsg() == 32633
    assert mosaic.rio.transform() == Affine(*transform)
    assert list(mosaic["band"].values) == [f"c{i:03d}" for i in range(6)]
    assert mosaic.attrs["provenance"] == PROVENANCE
    assert mosaic["data"].chunks[1][0] == min(chunks, 101)


def test_pixel_centre_coordinates(chip, tmp_path):
    bands, crs, transform = chip
    tiles = write_tile_store(str(tmp_path / "job"), linear_model(bands, 2), crs, transform, 32, 8)
    mosaic = open_mosaic(stitch_tiles(tiles, str(tmp_path / "m.zarr")))
    t = Affine(*transform)
    assert mosaic.x.values[0] == pytest.approx((t @ (0.5, 0.5))[0])
    assert mosaic.y.values[-1] == pytest.approx((t @ (0.5, 100.5))[1])


def test_failed_tiles_leave_nan_only_where_uncovered(chip, tmp_path):
    bands, crs, transform = chip
    untiled = linear_model(bands, 3)
    origins = tile_origins(101, 100, 32, 8)  # stride 24
    failed = {0: "failed", 5: "skipped", len(origins) - 1: "failed"}
    tiles = write_tile_store(str(tmp_path / "job"), untiled, crs, transform, 32, 8, statuses=failed)
    mosaic = open_mosaic(stitch_tiles(tiles, str(tmp_path / "m.zarr"), chunks=40))
    covered = np.zeros((101, 100), dtype=bool)
    for i, (r, c) in enumerate(origins):
        if i not in failed:
            covered[r : r + 32, c : c + 32] = True
    assert not covered.all()  # the failed corner tiles leave holes
    data = mosaic["data"].values
    np.testing.assert_array_equal(np.isnan(data).all(axis=0), ~covered)
    np.testing.assert_array_equal(mosaic["valid"].values.astype(bool), covered)
    np.testing.assert_allclose(data[:, covered], untiled[:, covered], atol=1e-6)


def test_invalid_pixels_inside_tiles_are_filled_by_neighbours(chip, tmp_path):
    bands, crs, transform = chip
    untiled = linear_model(bands, 2)
    valid = np.ones((101, 100), dtype=np.uint8)
    valid[40:45, 40:45] = 0  # e.g. clouds: no tile has these pixels
    tiles = write_tile_store(str(tmp_path / "job"), untiled, crs, transform, 32, 8, valid_HW=valid)
    data = open_mosaic(stitch_tiles(tiles, str(tmp_path / "m.zarr")))["data"].values
    assert np.isnan(data[:, 40:45, 40:45]).all()
    np.testing.assert_allclose(data[:, valid > 0], untiled[:, valid > 0], atol=1e-6)


def test_segmentation_blends_logits_and_stores_argmax(chip, tmp_path):
    bands, crs, transform = chip
    logits = linear_model(bands, 4, seed=3)
    tiles = write_tile_store(str(tmp_path / "job"), logits, crs, transform, 40, 12, kind="segmentation",
                             statuses={0: "failed"})  # fmt: skip
    mosaic = open_mosaic(stitch_tiles(tiles, str(tmp_path / "m.zarr"), chunks=50))
    classes = mosaic["classes"].values
    assert classes.dtype == np.uint8
    hole = np.isnan(mosaic["data"].values).all(0)
    assert hole.any()
    np.testing.assert_array_equal(classes[~hole], logits.argmax(0)[~hole])
    assert (classes[hole] == CLASS_NODATA).all()


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls(chip, tmp_path, scheme):
    bands, crs, transform = chip
    untiled = linear_model(bands, 2)
    root = f"memory://mosaic-test-{tmp_path.name}" if scheme == "memory" else f"file://{tmp_path}"
    tiles = write_tile_store(f"{root}/job", untiled, crs, transform, 32, 8, statuses={3: "failed"})
    out = stitch_tiles(tiles, f"{root}/job/mosaic.zarr", chunks=64)
    ds = xr.open_zarr(out, decode_coords="all", consolidated=False)
    assert ds.rio.crs.to_epsg() == 32633 and ds.rio.transform() == Affine(*transform)
    data = ds["data"].values
    ok = ~np.isnan(data)
    np.testing.assert_allclose(data[ok], untiled[ok], atol=1e-6)


def test_blocks_gather_only_intersecting_tiles(chip, tmp_path):
    from pipeline.mosaic.stitch import _tiles_by_block

    bands, crs, transform = chip
    tiles = write_tile_store(
        str(tmp_path / "job"), linear_model(bands, 2), crs, transform, 24, 4, statuses={3: "failed"}
    )
    store = open_tile_store(tiles)
    values = mosaic_dataset(store, chunks=32)["data"].data
    assert len(dict(values.__dask_graph__())) == values.npartitions  # one task per output block, nothing else
    by_block = _tiles_by_block(store, *values.chunks[1:])
    s = store.tile_size
    for bi, bj in np.ndindex(*values.numblocks[1:]):
        y0, x0 = bi * 32, bj * 32
        expected = [
            i for i, (r, c) in enumerate(store.origins.tolist())
            if i != 3 and r < y0 + 32 and r + s > y0 and c < x0 + 32 and c + s > x0
        ]  # fmt: skip
        assert [t[0] for t in by_block.get((bi, bj), [])] == expected


def test_not_a_tile_store(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "x.zarr"), mode="w")
    with pytest.raises(ValueError, match="not a tile store"):
        stitch_tiles(str(tmp_path / "x.zarr"), str(tmp_path / "m.zarr"))


def test_contract_with_the_inference_stage_writer(chip, tmp_path):
    """Stitch a store written by ``pipeline.infer.store`` itself (skipped while that stage is absent)."""
    store_mod = pytest.importorskip("pipeline.infer.store")
    tiling = pytest.importorskip("pipeline.infer.tiling")
    bands, crs, transform = chip
    untiled = linear_model(bands, 4)
    tiles = tiling.plan_tiles(101, 100, 40, 10)
    attrs = {
        "grid": {"crs": crs, "transform": list(transform), "height": 101, "width": 100}, "kind": "embeddings",
        "channels": ["a", "b", "c", "d"], "tile_size": 40, "overlap": 10, "padded": [0, 0], "n_tiles": len(tiles),
        "provenance": PROVENANCE,
    }  # fmt: skip
    out = str(tmp_path / "job")
    group = store_mod.open_or_create_store(store_mod.tiles_url(out), attrs, tiling.origins_array(tiles))
    manifest = store_mod.TileManifest(out)
    for t in tiles:
        rows, cols = t.window()
        if t.id != 1:
            data = untiled[:, rows, cols]
            store_mod.write_tile(group, t.id, data, np.ones((40, 40), np.uint8), data.mean((1, 2)))
        status = "done" if t.id != 1 else "failed"
        manifest.write({"tile_id": t.id, "index": t.id, "origin": [t.row, t.col], "status": status})
    mosaic = open_mosaic(stitch_tiles(store_mod.tiles_url(out), str(tmp_path / "m.zarr"), chunks=64))
    data = mosaic["data"].values
    ok = ~np.isnan(data)
    assert ok.mean() > 0.9 and not ok.all()
    np.testing.assert_allclose(data[ok], untiled[ok], atol=1e-6)
