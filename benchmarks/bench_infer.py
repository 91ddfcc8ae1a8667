"""Inference stage throughput: end to end (read Zarr + model + write tiles) vs the bare model forward.

    python benchmarks/bench_infer.py [--configs skysense_v2_tiny skysense_v2_base] [--tile 64] [--tiles 8]
                                     [--contexts 8 global] [--device cpu|cuda] [--cube CUBE] [--out results.json]

Both run in one process on the same tiles with the same per-tile micro-batching: the end-to-end pass is
:class:`pipeline.infer.actor.TileProcessor` (the per-batch logic the Ray actors wrap: a prefetch thread reads the
next batch while the model runs, then tiles and manifest records are written); the bare pass calls the same model on
inputs read beforehand. The two alternate batch by batch, so drift of a shared machine hits both sides alike.
km2/h counts each tile's new ground only (stride = tile - overlap) at 10 m pixels. ``--contexts`` lists the stage-3/4
attention modes to time: a neighbourhood radius (local context, the job default) and/or ``global``.
The cube defaults to the Sen1Floods11 S1 + S2 cube (``skypipe cube build jobs/cube-sen1floods11.yaml``); without it,
a cube is written from the eo-learn Slovenia S2 scenes (tests/infer_fixtures.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402

from pipeline.infer.actor import TileProcessor, pick_device  # noqa: E402
from pipeline.infer.runner import prepare_store  # noqa: E402
from pipeline.infer.tiling import locality_order  # noqa: E402

DEFAULT_CUBE = ROOT / "outputs" / "cube-sen1floods11.zarr"


def _cube(path: str | None, tmp: Path) -> tuple[str, list[str], tuple[str, str]]:
    if path or DEFAULT_CUBE.exists():
        url = str(path or DEFAULT_CUBE)
        attrs = dict(zarr.open_group(url, mode="r").attrs)
        return url, list(attrs["modalities"]), ("1900-01-01", "2100-01-01")
    sys.path.insert(0, str(ROOT / "tests"))
    from infer_fixtures import write_cube

    return write_cube(tmp / "cube.zarr", size=(101, 100), nodata_corner=0), ["s2"], ("2015-07-01", "2015-09-30")


def bench(
    config: str, cube: str, modalities: list[str], period: tuple[str, str], args: argparse.Namespace,
    radius: int | None = None,
) -> dict:  # fmt: skip
    """One model configuration: a warm-up tile, then bare and end-to-end passes alternating per batch."""
    device = pick_device(1.0 if args.device == "cuda" else 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        common = {"cube_url": cube, "checkpoint": config, "kind": "embeddings", "modalities": modalities,
                  "periods": [period]}  # fmt: skip
        plan = prepare_store(**common, output_url=tmp, tile_size=args.tile, overlap=args.overlap, context_radius=radius)
        proc = TileProcessor(**common, output_url=tmp, device=device)
        tiles = locality_order(plan.tiles, plan.grid.chunks)
        items = []
        for t in tiles:  # the first tiles with data
            item = proc.reader.read(t)
            if not item.all_nodata:
                items.append(item)
            if len(items) == args.tiles + 1:
                break
        warm, items = items[0], items[1:]
        step = proc.micro_batch if device.type == "cuda" else 1
        proc.forward([warm])
        if device.type == "cuda":
            torch.cuda.synchronize()

        def timed(fn: Callable[[], object]) -> tuple[float, float]:
            """(wall, CPU) seconds; CPU time of all threads does not count time lost to other processes."""
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start, time.process_time() - cpu

        proc.reader.cache.clear()  # cold chunk cache for the end-to-end pass
        batches = [items[i : i + args.batch] for i in range(0, len(items), args.batch)]
        bare_s = e2e_s = bare_cpu = e2e_cpu = 0.0
        pairs: list[float] = []  # per-batch bare / end-to-end wall ratio
        records: list[dict] = []
        for k, batch in enumerate(batches):  # alternate, so drift of a shared machine hits both sides alike
            wall, cpu = timed(lambda b=batch: [proc.forward(b[i : i + step]) for i in range(0, len(b), step)])
            bare_s, bare_cpu = bare_s + wall, bare_cpu + cpu
            ids = [it.tile.id for it in batch]
            nxt = [it.tile.id for it in batches[k + 1]] if k + 1 < len(batches) else []

            def e2e(ids: list[int] = ids, nxt: list[int] = nxt) -> None:
                proc.prefetch(nxt)  # as the actor does: read batch k+1 while batch k runs
                records.extend(proc.process([(t, 1) for t in ids]))

            wall_e2e, cpu = timed(e2e)
            e2e_s, e2e_cpu = e2e_s + wall_e2e, e2e_cpu + cpu
            pairs.append(wall / wall_e2e)
        assert all(r["status"] == "done" for r in records), records
    n = len(items)
    km2_per_tile = ((args.tile - args.overlap) * 10 / 1000) ** 2
    return {
        "config": config, "context": "global" if radius is None else f"local r={radius}", "device": str(device),
        "tile": args.tile, "overlap": args.overlap, "tiles": n,
        "modalities": modalities, "dates": {m: len(v) for m, v in proc.reader.dates(0).items()},
        "bare_tiles_per_s": n / bare_s, "e2e_tiles_per_s": n / e2e_s, "ratio": bare_s / e2e_s,
        "median_batch_ratio": statistics.median(pairs), "batch_ratios": pairs,
        "bare_s": bare_s, "e2e_s": e2e_s, "cpu_ratio": bare_cpu / e2e_cpu, "bare_cpu_s": bare_cpu,
        "e2e_cpu_s": e2e_cpu, "stats": dict(proc.stats),
        "e2e_km2_per_h": n / e2e_s * km2_per_tile * 3600, "bare_km2_per_h": n / bare_s * km2_per_tile * 3600,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["skysense_v2_tiny", "skysense_v2_base"])
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--overlap", type=int, default=8)
    p.add_argument("--tiles", type=int, default=8, help="timed tiles per configuration")
    p.add_argument("--batch", type=int, default=4, help="tiles per processor batch")
    p.add_argument("--contexts", nargs="+", default=["8", "global"], help="radius (local context) or 'global'")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cube", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cube, modalities, period = _cube(args.cube, Path(tmp))
        radii = [None if c == "global" else int(c) for c in args.contexts]
        results = [bench(c, cube, modalities, period, args, r) for c in args.configs for r in radii]
    meta = {
        "date": dt.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "cube": cube,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }  # fmt: skip
    for r in results:
        print(
            f"{r['config']:<18} {r['context']:<10} {r['device']:<5} tile {r['tile']} x{r['tiles']}:"
            f" end-to-end {r['e2e_tiles_per_s']:.3f}"
            f" tiles/s ({r['e2e_km2_per_h']:.1f} km2/h), bare forward {r['bare_tiles_per_s']:.3f} tiles/s"
            f" ({r['bare_km2_per_h']:.1f} km2/h), ratio {r['ratio']:.2f} (median per batch"
            f" {r['median_batch_ratio']:.2f}, CPU time {r['cpu_ratio']:.2f});"
            f" read {r['stats']['read_s']:.2f} s,"
            f" wait {r['stats']['wait_s']:.2f} s, write {r['stats']['write_s']:.2f} s"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
