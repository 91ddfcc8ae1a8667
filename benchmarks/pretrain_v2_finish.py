"""Score a pre-training run's checkpoints on VAL, pick one, score it on TEST, and (optionally) ship it (issue 15).

    python benchmarks/pretrain_v2_finish.py                       # score new checkpoints on VAL, print the curve
    python benchmarks/pretrain_v2_finish.py --test                # + pick the best on VAL, export it, score on TEST
    python benchmarks/pretrain_v2_finish.py --test --ship         # + copy it to checkpoints/ if it beats the old one

Run it from the repository root, niced (``nice -n 19``), as often as wanted (benchmarks/pretrain_v2_run.sh runs it
every 10 minutes during training): every checkpoint whose step is a multiple of ``--every`` (and the last) is scored
once; its result and its exported EMA teacher stay in ``<storage>/val/step_<N>.json`` / ``teacher_<N>.pt``, so the
training run may delete the checkpoint afterwards. The pick is the step with the best VAL kNN on the scale-shifted
views (ties: VAL kNN at zoom 1, then the later step); TEST is touched only for the picked teacher.
Shipping needs ``outputs/protocol/old-test.json`` (the shipped checkpoint scored on TEST) and the random-init TEST
result, and copies the candidate to ``checkpoints/skysense_v2_tiny_ssl.pt`` when ``pipeline.eval.ship.ship_decision``
says so (a clean candidate must beat a clean shipped checkpoint, or clear the +10 goal over random init when the
shipped one's pre-training saw the held-out images). Anything tied to the old backbone (the demo's water adapter),
the model card and benchmarks/RESULTS.md are then updated by hand from the printed tables and the JSON files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from pipeline.eval.protocol import format_table, run_protocol
from pipeline.eval.ship import HEADLINE, ship_decision
from pipeline.model.checkpoint import checkpoint_sha256 as sha256
from pipeline.model.checkpoint import read_checkpoint
from pipeline.train.spec import load_pretrain_spec
from pipeline.train.state import export_model, list_checkpoints

SHIPPED = Path("checkpoints/skysense_v2_tiny_ssl.pt")


def export_teacher(path: str, out: Path) -> None:
    """The EMA teacher of a training checkpoint as a model checkpoint whose provenance lists the data sources."""
    spec = read_checkpoint(path)["extra"].get("spec", {})
    prov = {"data_spec": spec.get("data", []), "steps_planned": spec.get("steps"), "recipe": spec.get("name")}
    export_model(path, str(out), which="teacher", provenance=prov)


def score_val(storage: str, linear: bool, every: int, last: int | None) -> dict[int, dict]:
    """VAL results of the run's scored steps (computing those of new checkpoints); their teachers are kept."""
    out = Path(storage) / "val"
    out.mkdir(parents=True, exist_ok=True)
    for step, path in list_checkpoints(storage):
        f = out / f"step_{step:07d}.json"
        if f.exists() or (step % every and step != last):
            continue
        teacher = out / f"teacher_{step:07d}.pt"
        export_teacher(path, teacher)
        r = run_protocol("val", checkpoint=str(teacher), linear=linear, log=None)
        r["model"]["checkpoint"] = f"{path} (EMA teacher)"
        f.write_text(json.dumps(r, indent=1))
    return {int(f.stem.split("_")[1]): json.loads(f.read_text()) for f in sorted(out.glob("step_*.json"))}


COLUMNS = (("kNN 1x", "rsscn7/knn/plain"), ("kNN shifted", HEADLINE), ("linear 1x", "rsscn7/linear/plain"),
           ("linear shifted", "rsscn7/linear/shifted"), ("BEN mAP", "bigearthnet/map"))  # fmt: skip


def _row(label: str, metrics: dict) -> str:
    cells = [f"{100 * metrics[k]['mean']:.2f}" if k in metrics else "-" for _, k in COLUMNS]
    return f"{label:>7s} " + " ".join(f"{c:>{len(h)}s}" for c, (h, _) in zip(cells, COLUMNS))


def curve(results: dict[int, dict], baseline: dict | None) -> str:
    """VAL metrics per step (percent), with the random-init mean as the last row."""
    lines = [f"{'step':>7s} " + " ".join(h for h, _ in COLUMNS)]
    lines += [_row(str(step), r["metrics"]) for step, r in sorted(results.items())]
    if baseline:
        lines.append(_row("random", baseline["metrics"]))
    return "\n".join(lines)


def pick(results: dict[int, dict]) -> int:
    """The step with the best VAL kNN on shifted views (ties: kNN at zoom 1, then the later step)."""
    m = {s: r["metrics"] for s, r in results.items()}
    return max(m, key=lambda s: (round(m[s][HEADLINE]["mean"], 6), round(m[s]["rsscn7/knn/plain"]["mean"], 6), s))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", default="jobs/pretrain-tiny-v2.yaml", help="the run's pre-training spec")
    p.add_argument("--random-val", default="outputs/protocol/random-val.json")
    p.add_argument("--random-test", default="outputs/protocol/random-test.json")
    p.add_argument("--old-test", default="outputs/protocol/old-test.json")
    p.add_argument("--quick", action="store_true", help="VAL without the linear probe")
    p.add_argument("--every", type=int, default=250, help="score the checkpoints of every N-th step (and the last)")
    p.add_argument("--test", action="store_true", help="pick on VAL, export and score on TEST")
    p.add_argument("--ship", action="store_true", help="copy to checkpoints/ if pipeline.eval.ship says so")
    args = p.parse_args()
    load = lambda f: json.loads(Path(f).read_text()) if Path(f).exists() else None  # noqa: E731
    job = load_pretrain_spec(args.job)
    storage = job.storage
    results = score_val(storage, linear=not args.quick, every=args.every, last=job.steps)
    if not results:
        print(f"no scored checkpoints under {storage} yet")
        return 1
    print(curve(results, load(args.random_val)))
    best = pick(results)
    print(f"best on VAL: step {best}")
    if not args.test:
        return 0
    cand = Path(storage) / "candidate.pt"
    shutil.copyfile(Path(storage) / "val" / f"teacher_{best:07d}.pt", cand)
    out = Path(f"outputs/protocol/{job.name}-test.json")
    test = load(out)
    if test and test["model"].get("picked_on_val", {}).get("step") == best and test["model"]["sha256"] == sha256(cand):
        print(f"TEST of step {best} was scored before: {out} (TEST is scored once per pick)")
    else:
        test = run_protocol("test", checkpoint=str(cand), log=None)
        test["model"]["picked_on_val"] = {"step": best, "val": results[best]["metrics"]}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(test, indent=1))
    for name, f in (("random init", args.random_test), ("old checkpoint", args.old_test)):
        if load(f):
            print(f"\nTEST, candidate (step {best}) vs {name}:\n{format_table(test, load(f))}")
    old, rand = load(args.old_test), load(args.random_test)
    if old is None or rand is None:
        print(f"\nnot decided: {args.old_test} and {args.random_test} are needed (skypipe eval protocol --split test)")
        return 0
    decision = ship_decision(test, old, rand)
    print(f"\n{'ship' if decision.ship else 'keep the shipped checkpoint'}: {decision.reason}")
    if args.ship and decision.ship:
        shutil.copyfile(cand, SHIPPED)
        print(f"shipped: {SHIPPED} ({SHIPPED.stat().st_size / 1e6:.1f} MB); retrain what is tied to the old backbone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
