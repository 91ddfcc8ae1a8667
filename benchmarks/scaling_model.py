"""What a continent-sized job costs, from measured per-stage rates (docs/scaling.md quotes this script's output).

Input: the ``results.json`` of ``bench_scale.py`` (the runs' own ``report.json``: CPU-seconds, bytes written and area
per stage). The largest run gives the per-km2 rates; everything else is an explicit assumption, printed with the
result, and a command-line option:

- date-images: the benchmark cube holds one Sentinel-2 date; cube reads scale with date-images x bands (an S1 date,
  2 bands, costs ``--s1-cube-factor`` of an S2 date, 10 bands) and inference with date-images (every date goes
  through the backbone; the fusion over time is small next to it);
- the model: the benchmark runs ``skysense_v2_tiny``; ``--model-cost`` multiplies the inference CPU time (22.7 for
  ``skysense_v2_base``: 159 vs 7.0 CPU-s per 128 px tile in the Inference section of RESULTS.md);
- GPUs: not measured (no GPU was lent); ``--gpu-flops-per-km2-date`` with ``--gpu-tflops`` and ``--mfu`` turn
  measured FLOPs into GPU-hours, which is a bound to replace with a measured rate;
- tiling: the benchmark's tiles (the demo's 128 px with 48 px overlap) compute every pixel (128/80)^2 = 2.56 times;
  inference CPU and tile-store bytes are rescaled to the job's ``--tile-px`` / ``--tile-overlap``;
- prices: US dollars per CPU-hour and GPU-hour (list prices of on-demand instances; spot is ~1/3).

    python benchmarks/scaling_model.py outputs/bench-scale/results.json [--area-km2 1e7] [--s2-dates 12] ...
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

TB = 1e12


def rates(report: dict) -> dict[str, dict[str, float]]:
    """Per stage: CPU-seconds and bytes written per km2 of the run."""
    area = report["area_km2"]
    return {e["name"]: {"cpu_s": e["cpu_s"] / area, "bytes": e["bytes_written"] / area} for e in report["stages"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results.json of bench_scale.py")
    ap.add_argument("--area-km2", type=float, default=1e7)
    ap.add_argument("--s2-dates", type=int, default=12, help="S2 dates per location (e.g. one clear date a month)")
    ap.add_argument("--s1-dates", type=int, default=12, help="S1 dates per location")
    ap.add_argument("--s1-cube-factor", type=float, default=0.2, help="cube cost of an S1 date vs an S2 date")
    ap.add_argument("--model-cost", type=float, default=1.0, help="inference cost vs skysense_v2_tiny (base: 22.7)")
    ap.add_argument("--emb-channels", type=int, default=128, help="embedding channels (tiny 128; outputs scale)")
    ap.add_argument("--cpu-hour", type=float, default=0.048, help="USD per vCPU-hour (m6i.4xlarge $0.768/h / 16)")
    ap.add_argument("--gpu-hour", type=float, default=4.10, help="USD per GPU-hour (p4d.24xlarge $32.77/h / 8)")
    ap.add_argument("--gpu-flops-per-km2-date", type=float, default=None,
                    help="model FLOPs per km2 and date-image, without tile overlap")  # fmt: skip
    ap.add_argument("--gpu-tflops", type=float, default=312.0, help="peak dense bf16 TFLOPS of one GPU (A100)")
    ap.add_argument("--mfu", type=float, default=0.3, help="assumed fraction of peak the forward reaches")
    ap.add_argument("--nodes-cpu", type=int, default=24, help="CPU nodes (16 vCPU each)")
    ap.add_argument("--gpus", type=int, default=16, help="GPUs")
    ap.add_argument("--chunk-px", type=int, default=512, help="cube chunk side")
    ap.add_argument("--tile-px", type=int, default=256, help="inference tile side")
    ap.add_argument("--tile-overlap", type=int, default=48)
    ap.add_argument("--bench-tile", type=int, default=128, help="tile side of the benchmark runs (jobs/demo.yaml)")
    ap.add_argument("--bench-overlap", type=int, default=48)
    args = ap.parse_args()

    runs = json.loads(Path(args.results).read_text())
    run = max(runs, key=lambda r: r["area_km2"])
    r = rates(run)
    a = args.area_km2
    s2_eq = args.s2_dates + args.s1_dates * args.s1_cube_factor  # cube work in S2-date equivalents
    dates = args.s2_dates + args.s1_dates  # backbone passes per location
    emb = args.emb_channels / 128
    redo = (args.tile_px / (args.tile_px - args.tile_overlap)) ** 2
    redo /= (args.bench_tile / (args.bench_tile - args.bench_overlap)) ** 2  # computed pixels per km2, job / bench
    cube_cpu_h = r["cube"]["cpu_s"] * a * s2_eq / 3600
    infer_cpu_h = r["inference"]["cpu_s"] * a * dates * args.model_cost * redo / 3600
    post = ("mosaic", "cog", "archive", "quicklook")
    post_cpu_h = sum(r[s]["cpu_s"] for s in post if s in r) * a * emb / 3600
    cube_tb = r["cube"]["bytes"] * a * s2_eq / TB
    out_tb = {s: r[s]["bytes"] * a * emb * (redo if s == "inference" else 1) / TB
              for s in ("inference", "mosaic", "cog", "archive") if s in r}  # fmt: skip

    print(f"measured on: {run['job']} ({run['area_km2']:.1f} km2), per km2: "
          + ", ".join(f"{s} {v['cpu_s']:.3f} CPU-s / {v['bytes'] / 1e6:.2f} MB" for s, v in r.items()))  # fmt: skip
    print(f"job: {a:,.0f} km2, {args.s2_dates} S2 + {args.s1_dates} S1 dates, model cost x{args.model_cost}, "
          f"{args.emb_channels}-channel embeddings")  # fmt: skip
    print("| stage | CPU-hours | on | hours on the cluster | USD |")
    print("|---|---|---|---|---|")
    cpus = args.nodes_cpu * 16
    rows = [("cube (S1+S2)", cube_cpu_h, f"{args.nodes_cpu} x 16 vCPU"),
            ("inference, CPU", infer_cpu_h, f"{args.nodes_cpu} x 16 vCPU"),
            ("mosaic + COG + archive + quicklook", post_cpu_h, f"{args.nodes_cpu} x 16 vCPU")]  # fmt: skip
    for name, h, on in rows:
        print(f"| {name} | {h:,.0f} | {on} | {h / cpus:,.1f} | {h * args.cpu_hour:,.0f} |")
    if args.gpu_flops_per_km2_date:
        flops = args.gpu_flops_per_km2_date * a * dates * (args.tile_px / (args.tile_px - args.tile_overlap)) ** 2
        gpu_h = flops / (args.gpu_tflops * 1e12 * args.mfu) / 3600
        print(f"| inference, GPU (bound: {args.mfu:.0%} of {args.gpu_tflops:.0f} TFLOPS) | {gpu_h:,.0f} GPU-h | "
              f"{args.gpus} GPUs | {gpu_h / args.gpus:,.1f} | {gpu_h * args.gpu_hour:,.0f} |")  # fmt: skip
    print(f"storage: cube {cube_tb:,.1f} TB; "
          + ", ".join(f"{'tiles' if k == 'inference' else k} {v:,.1f} TB" for k, v in out_tb.items()))  # fmt: skip
    chunk_km2 = (args.chunk_px * 10 / 1000) ** 2
    chunks = a / chunk_km2 * (args.s2_dates + args.s1_dates)
    step = args.tile_px - args.tile_overlap
    tiles = a / (step * 10 / 1000) ** 2
    print(f"objects: {chunks:,.0f} cube chunk-dates x 3 PUTs (data, mask, manifest) = {3 * chunks:,.0f}; "
          f"{tiles:,.0f} inference tiles x ~4 PUTs = {4 * tiles:,.0f}")  # fmt: skip
    cube_hours = cube_cpu_h / cpus
    print(f"cube PUT rate at {cpus} vCPUs: {3 * chunks / (cube_hours * 3600):,.0f}/s "
          f"(S3: 3,500 PUT/s per prefix partition)" if cube_hours > 0 else "")  # fmt: skip
    print(f"tiles per 100,000 km2 job (max_area_km2 default): {100_000 / (step * 10 / 1000) ** 2:,.0f}; "
          f"jobs: {math.ceil(a / 100_000)}")  # fmt: skip


if __name__ == "__main__":
    main()
