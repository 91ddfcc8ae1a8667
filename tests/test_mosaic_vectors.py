"""Maps people act on, from class products: probabilities (not logits) blended, class polygons equal to polygonising
the whole map at once, areas per class, per-tile labels; and the stages that write them, resuming like the others.

The class scores are a real per-pixel model of a real Sentinel-2 chip: four NDVI classes (distance of each pixel's
NDVI to four quantiles of the chip), so the class map has about a thousand regions of every shape, cut by the
borders of 32-pixel blocks.
"""

from __future__ import annotations

import json
from collections import Counter

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyproj
import pytest
import rasterio
import rasterio.features
import shapely
import torch
from affine import Affine
from mosaic_fixtures import PROVENANCE, linear_model, load_s2_chip, tile_origins, write_tile_store

from pipeline.infer.store import TileManifest, open_or_create_store, open_tile_store, tiles_url, write_tile
from pipeline.kinds import get_kind
from pipeline.mosaic.areas import class_pixel_counts, mosaic_areas, pixel_area_m2, read_areas, write_areas
from pipeline.mosaic.cog import cog_info
from pipeline.mosaic.scores import write_score_cog
from pipeline.mosaic.stitch import open_mosaic, stitch_tiles
from pipeline.mosaic.tables import tile_label_counts, tile_labels_table, write_tile_labels
from pipeline.mosaic.vectors import class_polygons, write_polygons
from pipeline.palette import CLASS_NODATA

NAMES = ["water", "bare", "crops", "forest"]
BLOCK = 32


def ndvi_scores(bands_CHW: np.ndarray, k: int = 4) -> np.ndarray:
    """``(k, H, W)`` logits: minus the squared distance of each pixel's NDVI to ``k`` quantiles of the chip."""
    red, nir = bands_CHW[3].astype(np.float64), bands_CHW[7].astype(np.float64)  # B04, B08
    ndvi = (nir - red) / (nir + red)
    centres = np.quantile(ndvi, np.linspace(0.1, 0.85, k))
    return (-200.0 * (ndvi[None] - centres[:, None, None]) ** 2).astype(np.float32)


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """A segmentation job's tile store (probabilities, 32-px tiles, a no-data corner) and its mosaic."""
    root = tmp_path_factory.mktemp("vectors")
    bands, crs, transform = load_s2_chip()
    logits = ndvi_scores(bands)
    probs = activate("segmentation", logits[None])[0]
    valid = np.ones(probs.shape[1:], dtype=np.uint8)
    valid[:20, :30] = 0  # no input there: class 255, no polygons
    tiles = write_tile_store(str(root / "seg"), probs, crs, transform, 32, 8, kind="segmentation", channels=NAMES,
                             valid_HW=valid)  # fmt: skip
    mosaic = stitch_tiles(tiles, str(root / "seg" / "mosaic.zarr"), chunks=BLOCK)
    return {"root": root, "logits": logits, "probs": probs, "valid": valid, "tiles": tiles, "mosaic": mosaic,
            "crs": crs, "transform": Affine(*transform)}  # fmt: skip


def activate(kind: str, scores: np.ndarray) -> np.ndarray:
    """What the actor stores for a kind's raw scores (classes on axis 1)."""
    return get_kind(kind).activate(torch.from_numpy(np.ascontiguousarray(scores))).numpy()


def _class_map(seg) -> np.ndarray:
    return open_mosaic(seg["mosaic"])["classes"].values


# -- probabilities --------------------------------------------------------------------------------------------------


def test_blended_mosaic_and_score_cog_are_probabilities(seg):
    ds = open_mosaic(seg["mosaic"])
    data = ds["data"].values
    covered = ds["valid"].values == 1
    assert not covered.all() and covered.any()
    np.testing.assert_allclose(data[:, covered].sum(axis=0), 1.0, atol=1e-5)
    assert np.nanmin(data) >= 0 and np.nanmax(data) <= 1
    np.testing.assert_allclose(data[:, covered], seg["probs"][:, covered], atol=1e-6)
    path = write_score_cog(seg["mosaic"], str(seg["root"] / "segmentation.tif"), blocksize=32)
    info = cog_info(path)
    assert info["valid"], info["errors"]
    assert info["descriptions"] == [f"p({n})" for n in NAMES]
    assert json.loads(info["tags"]["class_names"]) == NAMES and info["tags"]["values"] == "class probabilities"
    with rasterio.open(path) as src:
        np.testing.assert_allclose(src.read()[:, covered], data[:, covered], atol=1e-6)


# -- polygons -------------------------------------------------------------------------------------------------------


def _whole_map_polygons(classes: np.ndarray, transform: Affine) -> list[tuple[int, shapely.Geometry]]:
    found = rasterio.features.shapes(classes, mask=classes != CLASS_NODATA, connectivity=4, transform=transform)
    return [(int(v), shapely.geometry.shape(g)) for g, v in found]


def _signature(class_id: int, geom: shapely.Geometry) -> tuple:
    c = geom.centroid
    return class_id, round(geom.area, 2), round(c.x, 3), round(c.y, 3), len(geom.interiors)


def test_polygons_equal_a_whole_map_polygonisation(seg):
    classes = _class_map(seg)
    assert classes.shape[0] > 3 * BLOCK and classes.shape[1] > 3 * BLOCK  # 4 x 4 blocks
    table = class_polygons(seg["mosaic"])  # blocks = the mosaic's 32 x 32 chunks
    ref = _whole_map_polygons(classes, seg["transform"])
    assert len(ref) > 500  # a real, fragmented map
    assert len(table) == len(ref)
    inverse = ~seg["transform"]
    lo, hi = (np.round(np.array([inverse @ xy for xy in corners])) for corners in zip(*(
        ((g.bounds[0], g.bounds[3]), (g.bounds[2], g.bounds[1])) for _, g in ref)))  # fmt: skip
    crossing = ((lo // BLOCK) != ((hi - 1) // BLOCK)).any(axis=1)  # pixel extents that contain a block border
    assert crossing.sum() > 50  # many regions span block borders: they must come out in one piece
    # polygon by polygon: same class, area, centroid and holes (no region split at a block border)
    assert Counter(_signature(c, g) for c, g in ref) == Counter(
        _signature(c, g) for c, g in zip(table["class_id"], table.geometry)
    )
    for k, name in enumerate(NAMES):
        ours = table[table["class_id"] == k]
        theirs = shapely.union_all([g for c, g in ref if c == k])
        assert set(ours["class"]) == {name}
        assert shapely.union_all(ours.geometry.values).symmetric_difference(theirs).area < 1e-3
        np.testing.assert_allclose(ours["area_m2"].sum(), (classes == k).sum() * pixel_area_m2(seg["crs"],
                                   seg["transform"]), rtol=1e-9)  # fmt: skip
    assert shapely.is_valid(table.geometry.values).all()
    assert set(table["class_id"]) <= set(range(len(NAMES)))  # no-data gets no polygons
    np.testing.assert_allclose(table["area_m2"], table.geometry.area, rtol=1e-9)  # UTM metres
    nodata = shapely.box(*(seg["transform"] @ (0, 20)), *(seg["transform"] @ (30, 0)))
    assert table.geometry.intersection(nodata).area.max() < 1e-6


def test_polygons_do_not_depend_on_the_block_size(seg):
    signatures = [
        Counter(_signature(c, g) for c, g in zip(t["class_id"], t.geometry))
        for t in (class_polygons(seg["mosaic"], block=b) for b in (17, 101))
    ]
    assert signatures[0] == signatures[1]


def test_min_area_drops_specks(seg):
    pixel = pixel_area_m2(seg["crs"], seg["transform"])
    everything = class_polygons(seg["mosaic"])
    kept = class_polygons(seg["mosaic"], min_area_m2=3 * pixel)
    assert (everything["area_m2"] < 3 * pixel).sum() > 100  # specks: 1-2 pixels
    assert len(kept) == (everything["area_m2"] >= 3 * pixel).sum() and kept["area_m2"].min() >= 3 * pixel


def test_polygons_geoparquet(seg):
    url, n = write_polygons(seg["mosaic"], str(seg["root"] / "out" / "polygons.parquet"), job="ljubljana")
    table = gpd.read_parquet(url)
    assert len(table) == n > 0
    assert table.crs.equals(pyproj.CRS.from_user_input(seg["crs"])) and table.crs.to_epsg() == 32633
    assert list(table.columns) == ["class", "class_id", "area_m2", "job", "kind", "model", "code_version",
                                   "checkpoint", "checkpoint_sha256", "time_start", "time_end", "geometry"]  # fmt: skip
    row = table.iloc[0]
    assert (row["job"], row["kind"], row["model"]) == ("ljubljana", "segmentation", PROVENANCE["model"])
    assert row["checkpoint_sha256"] == PROVENANCE["checkpoint_sha256"]
    assert (row["time_start"], row["time_end"]) == tuple(PROVENANCE["time"])
    geo = json.loads(pq.read_metadata(url).metadata[b"geo"])
    assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["geometry_types"] == ["Polygon"]


def test_continuous_mosaic_has_no_polygons_or_areas(tmp_path):
    bands, crs, transform = load_s2_chip()
    tiles = write_tile_store(str(tmp_path), linear_model(bands[:, :40, :40], 3), crs, transform, 32, 8)
    mosaic = stitch_tiles(tiles, str(tmp_path / "mosaic.zarr"))
    with pytest.raises(ValueError, match="not a class mosaic"):
        class_polygons(mosaic)
    with pytest.raises(ValueError, match="not a class mosaic"):
        mosaic_areas(mosaic)
    assert cog_info(write_score_cog(mosaic, str(tmp_path / "e.tif")))["descriptions"] == ["c000", "c001", "c002"]


# -- areas ----------------------------------------------------------------------------------------------------------


def test_areas_match_pixel_counts_and_polygons(seg):
    classes = _class_map(seg)
    pixel = pixel_area_m2(seg["crs"], seg["transform"])
    assert pixel == pytest.approx(9.99479222007154 * 9.997448467363668)
    csv, js = str(seg["root"] / "t" / "areas.csv"), str(seg["root"] / "t" / "areas.json")
    table = write_areas(seg["mosaic"], csv, js, job="ljubljana")
    counts = np.bincount(classes.ravel(), minlength=256)
    np.testing.assert_array_equal(class_pixel_counts(open_mosaic(seg["mosaic"])["classes"].data), counts)
    frame = pd.read_csv(csv)
    assert list(frame.columns) == ["class_id", "class", "pixels", "area_km2", "share"]
    assert list(frame["class"]) == NAMES
    np.testing.assert_array_equal(frame["pixels"], counts[: len(NAMES)])
    np.testing.assert_allclose(frame["area_km2"], counts[: len(NAMES)] * pixel / 1e6, rtol=1e-12)
    mapped = (classes != CLASS_NODATA).sum()
    assert counts[CLASS_NODATA] == (seg["valid"] == 0).sum() > 0
    assert frame["pixels"].sum() == mapped == table.mapped_pixels
    np.testing.assert_allclose(frame["area_km2"].sum(), mapped * pixel / 1e6, rtol=1e-12)
    np.testing.assert_allclose(frame["share"].sum(), 1.0, rtol=1e-12)
    stored = json.loads((seg["root"] / "t" / "areas.json").read_text())
    assert stored["nodata_pixels"] == counts[CLASS_NODATA] and stored["provenance"]["job"] == "ljubljana"
    assert pyproj.CRS.from_user_input(stored["crs"]).to_epsg() == 32633
    assert read_areas(js).rows == table.rows
    # the polygons of each class cover its area
    polygons = class_polygons(seg["mosaic"]).groupby("class")["area_m2"].sum() / 1e6
    np.testing.assert_allclose(polygons[NAMES].values, frame["area_km2"].values, rtol=1e-9)
    lines = table.lines()
    assert lines[0].split() == ["class", "km2", "pixels", "share"] and lines[-1].startswith("mapped")
    assert all(any(line.startswith(n) for line in lines) for n in NAMES)


# -- tile labels ----------------------------------------------------------------------------------------------------


def _tile_vector_store(job_url: str, product: str, vectors: np.ndarray, origins: np.ndarray, grid: tuple,
                       statuses: dict[int, str]) -> str:  # fmt: skip
    """A store of one class-probability vector per tile (the ``pooled`` array; the maps stay empty)."""
    crs, transform, (height, width) = grid
    kind = {"tile_classes": "classification", "tile_labels": "multilabel"}[product]
    attrs = {
        "grid": {"crs": crs, "transform": list(transform), "height": height, "width": width}, "kind": kind,
        "product": product, "periods": 1, "class_names": NAMES, "class_colors": ["#000000"] * 4, "channels": NAMES,
        "tile_size": 48, "overlap": 8, "margin": 0, "context_radius": None, "n_tiles": len(origins),
        "provenance": PROVENANCE,
    }  # fmt: skip
    url = tiles_url(job_url)
    group = open_or_create_store(url, attrs, origins)
    manifest = TileManifest(job_url)
    for i, (r, c) in enumerate(origins.tolist()):
        status = statuses.get(i, "done")
        if status == "done":
            nan_map = np.full((len(NAMES), 48, 48), np.nan, dtype=np.float32)
            write_tile(group, i, nan_map, np.ones((48, 48), dtype=np.uint8), vectors[i])
        manifest.write({"tile_id": i, "index": i, "origin": [r, c], "status": status})
    return url


@pytest.fixture(scope="module")
def per_tile(tmp_path_factory):
    """Per-tile class probabilities of a real chip: softmax of each 48-px tile's mean NDVI-class logits."""
    bands, crs, transform = load_s2_chip()
    logits = ndvi_scores(bands)
    origins = np.array([(r, c) for r in (0, 40, 80) for c in (0, 40, 80)], dtype=np.int64)  # the last ones stick out
    means = np.stack([logits[:, r : r + 48, c : c + 48].mean(axis=(1, 2)) for r, c in origins.tolist()])
    return {"root": tmp_path_factory.mktemp("tiles"), "logits": means, "origins": origins,
            "grid": (crs, transform, logits.shape[1:])}  # fmt: skip


def test_tile_labels_table(per_tile):
    probs = activate("classification", per_tile["logits"])  # (n, K)
    url = _tile_vector_store(str(per_tile["root"] / "cls"), "tile_classes", probs, per_tile["origins"],
                             per_tile["grid"], {4: "failed", 7: "skipped"})  # fmt: skip
    table = tile_labels_table(url, job="ljubljana")
    done = [i for i in range(9) if i not in (4, 7)]
    assert list(table["tile_id"]) == done
    assert table.crs.to_epsg() == 32633
    expected = probs[done].argmax(1)
    assert list(table["label"]) == [NAMES[k] for k in expected] and list(table["class_id"]) == list(expected)
    np.testing.assert_allclose(table["score"], probs[done].max(1), rtol=1e-6)
    p = table[[f"p_{n}" for n in NAMES]].to_numpy()
    np.testing.assert_allclose(p, probs[done], rtol=1e-6)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    assert len(set(table["label"])) > 1
    store = open_tile_store(url)
    for i, geom in zip(done, table.geometry):  # footprints clipped to the 101 x 100 grid
        assert geom.equals(shapely.box(*store.footprint_bounds(i)))
    t = Affine(*per_tile["grid"][1])
    assert table.geometry.iloc[-1].bounds[2] == pytest.approx((t @ (100, 0))[0])  # the grid's right edge, not 128
    assert (table["job"] == "ljubljana").all() and (table["checkpoint_sha256"] == PROVENANCE["checkpoint_sha256"]).all()
    out, counts = write_tile_labels(url, str(per_tile["root"] / "cls" / "tile_labels.parquet"), job="ljubljana")
    back = gpd.read_parquet(out)
    assert back.crs.to_epsg() == 32633 and list(back["label"]) == list(table["label"])
    assert counts == {n: int((expected == k).sum()) for k, n in enumerate(NAMES)} and sum(counts.values()) == 7
    assert tile_label_counts(out) == (counts, 7)


def test_tile_labels_multi_label_and_logits_refused(per_tile):
    probs = activate("multilabel", per_tile["logits"] / 10 + 0.5)  # independent: rows need not sum to 1
    url = _tile_vector_store(str(per_tile["root"] / "ml"), "tile_labels", probs, per_tile["origins"],
                             per_tile["grid"], {})  # fmt: skip
    table = tile_labels_table(url)
    assert [list(v) for v in table["labels"]] == [[n for n, q in zip(NAMES, row) if q >= 0.5] for row in probs]
    counts, n = tile_label_counts(write_tile_labels(url, str(per_tile["root"] / "ml" / "t.parquet"))[0])
    assert n == 9 and counts == {name: int((probs[:, k] >= 0.5).sum()) for k, name in enumerate(NAMES)}
    logits = _tile_vector_store(str(per_tile["root"] / "lg"), "tile_classes", per_tile["logits"], per_tile["origins"],
                                per_tile["grid"], {})  # fmt: skip
    with pytest.raises(ValueError, match=r"not probabilities.*activate"):
        tile_labels_table(logits)


def test_segmentation_store_gives_tile_labels_of_mean_probabilities(seg):
    table = tile_labels_table(seg["tiles"])
    store = open_tile_store(seg["tiles"])
    assert len(table) == len(store.done) == len(tile_origins(101, 100, 32, 8))
    r0, r1, c0, c1 = store.footprint(5)
    window = seg["probs"][:, r0:r1, c0:c1]
    np.testing.assert_allclose(table.iloc[5][[f"p_{n}" for n in NAMES]].to_numpy(float),
                               window[:, seg["valid"][r0:r1, c0:c1] == 1].mean(1), rtol=1e-5)  # fmt: skip
