"""Does writing a COG keep its memory flat as the mosaic grows? Peak RSS of :func:`dataarray_to_cog` per mosaic size.

Each size runs in a fresh process: it writes a smooth, compressible ``(band, y, x)`` float32 mosaic to Zarr (chunks
like the stitcher's), opens it lazily, records the process's resident memory, writes the COG and records the peak.
A writer that streams block by block shows the same peak growth at every size (bounded by ``_BATCH_BYTES`` and the
GDAL cache); one that gathers the mosaic grows with it. ``--bands 128`` is a tiny model's embedding mosaic.

    .venv/bin/python benchmarks/bench_cog_memory.py [--sides 512 1024 2048] [--bands 128] [--out outputs/bench-cog]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name

REPO = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def make(side: int, bands: int, out: Path) -> None:
    """Write the test mosaic (its own process, so its memory does not count against the COG's)."""
    import dask.array as da
    import numpy as np
    import xarray as xr

    sys.path.insert(0, str(REPO))
    from pipeline.mosaic.stitch import block_side

    chunk = block_side(bands, 512)
    yy = da.arange(side, chunks=chunk, dtype=np.float32)[:, None]
    xx = da.arange(side, chunks=chunk, dtype=np.float32)[None, :]
    data = da.stack([da.sin(yy / (7 + b) + xx / (11 + b)) for b in range(bands)]).rechunk((bands, chunk, chunk))
    step = 10.0
    arr = xr.DataArray(
        data,
        dims=("band", "y", "x"),
        coords={
            "band": [f"emb_{b}" for b in range(bands)],
            "y": 4_000_000 - step * (np.arange(side) + 0.5),
            "x": 400_000 + step * (np.arange(side) + 0.5),
        },
    )
    zarr_path = out / f"mosaic-{side}.zarr"
    arr.to_dataset(name="data").to_zarr(zarr_path, mode="w")


def one(side: int, out: Path) -> dict:
    """Write the COG of the test mosaic in this process; return the memory and time it took."""
    import rioxarray  # noqa: F401
    import xarray as xr

    sys.path.insert(0, str(REPO))
    from pipeline.memory import single_arena
    from pipeline.mosaic.cog import dataarray_to_cog

    single_arena()  # as the skypipe CLI does
    lazy = xr.open_zarr(out / f"mosaic-{side}.zarr")["data"].rio.write_crs("EPSG:32618")
    bands, chunk = lazy.shape[0], lazy.data.chunksize[1]
    before = _rss_mib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    cog = dataarray_to_cog(lazy, str(out / f"mosaic-{side}.tif"))
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "side": side,
        "bands": bands,
        "mosaic_mib": side * side * bands * 4 / 2**20,
        "chunk": chunk,
        "rss_before_mib": before,
        "peak_before_mib": peak_before,
        "peak_mib": peak,
        "cog_growth_mib": peak - max(before, 0),
        "wall_s": wall,
        "cog_mib": os.path.getsize(cog) / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--bands", type=int, default=128)
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench-cog"))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--make", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.make:
        make(args.make, args.bands, out)
        return
    if args.one:
        print(json.dumps(one(args.one, out)))
        return
    rows = []
    for side in args.sides:
        common = ["--bands", str(args.bands), "--out", str(out)]
        subprocess.run([sys.executable, __file__, "--make", str(side), *common], check=True)
        run = subprocess.run([sys.executable, __file__, "--one", str(side), *common], capture_output=True, text=True,
                             check=True)  # fmt: skip
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        for p in out.glob(f"mosaic-{side}.*"):
            subprocess.run(["rm", "-rf", str(p)], check=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print("| side px | bands | mosaic MiB | RSS before MiB | peak MiB | COG growth MiB | wall s | COG MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['side']} | {r['bands']} | {r['mosaic_mib']:.0f} | {r['rss_before_mib']:.0f} | {r['peak_mib']:.0f} "
            f"| {r['cog_growth_mib']:.0f} | {r['wall_s']:.1f} | {r['cog_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
