"""Write the short trial recipes that chose jobs/pretrain-tiny-v2.yaml (issue 15) to outputs/trials/<name>.yaml.

Every trial runs the same short schedule (``--steps`` steps, 60 warm-up steps, teacher momentum 0.994 as the
1,500-step recipe), so recipes are compared at equal compute on the protocol's VAL split:

    python benchmarks/pretrain_v2_trials.py --steps 300
    nohup nice -n 19 skypipe pretrain outputs/trials/v2.yaml --no-progress > outputs/trials/v2.log 2>&1 &
    skypipe eval protocol --split val --teacher --checkpoint outputs/trials/v2/checkpoints/step_0000300.pt

Trials:
    v2         jobs/pretrain-tiny-v2.yaml as it is (all sources, fair modality shares, zoom 0.5-2x / RSSCN7 0.5-3x).
    v2-nozoom  the same sources without scale variation: zoom [1, 1], RSSCN7 crops of 50-100 % on 128 px only
               (the 1,500-step recipe's crops), no 64 px RSSCN7 entry.
    v1-pool    the 1,500-step recipe (jobs/pretrain-tiny.yaml) on the RSSCN7 pool and BigEarthNet train+val only.
    v2-hr      v2 with the S2/S1 weights halved (HR batches ~60 % instead of 44 %): does their share cost HR quality?
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import yaml

POOL = "outputs/rsscn7-split/pool"


def short(job: dict, name: str, steps: int, threads: int) -> dict:
    job = copy.deepcopy(job)
    job["cpus_per_worker"] = threads
    job["name"], job["steps"], job["storage"] = f"trial-{name}", steps, f"outputs/trials/{name}"
    job["optim"] = job["optim"] | {"warmup_steps": 60}
    job["ssl"] = job["ssl"] | {"momentum": 0.994}
    job["checkpoint_every"], job["keep_checkpoints"] = max(steps // 3, 1), 10
    return job


def no_zoom(job: dict) -> dict:
    data = []
    for d in job["data"]:
        if d["kind"] == "images" and d["size"] == 64:
            continue
        d = dict(d)
        if d["kind"] == "scenes":
            d["zoom"] = [1.0, 1.0]
        if d["kind"] in ("images", "change_pairs"):
            d["scale"] = [0.5, 1.0]
        data.append(d)
    return job | {"data": data}


def v1_pool(old: dict) -> dict:
    data = []
    for d in old["data"]:
        d = dict(d)
        if d["kind"] == "images":
            d["path"] = POOL
        if d["kind"] == "bigearthnet":
            data += [d | {"split": "train", "weight": d["weight"] / 2}, d | {"split": "val", "weight": d["weight"] / 2}]
            continue
        data.append(d)
    return old | {"data": data}


def hr_heavy(job: dict) -> dict:
    data = [dict(d) | ({"weight": d["weight"] / 2} if not _has_hr(d) else {}) for d in job["data"]]
    return job | {"data": data}


def _has_hr(d: dict) -> bool:
    return d["kind"] in ("images", "change_pairs") or (d["kind"] == "scenes" and d.get("modality", "hr") == "hr")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial (two trials can run side by side)")
    p.add_argument("--out", default="outputs/trials")
    args = p.parse_args()
    v2 = yaml.safe_load(Path("jobs/pretrain-tiny-v2.yaml").read_text())
    v1 = yaml.safe_load(Path("jobs/pretrain-tiny.yaml").read_text())
    trials = {"v2": v2, "v2-nozoom": no_zoom(v2), "v1-pool": v1_pool(v1), "v2-hr": hr_heavy(v2)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name, job in trials.items():
        path = Path(args.out) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(short(job, name, args.steps, args.threads), sort_keys=False))
        print(path)


if __name__ == "__main__":
    main()
