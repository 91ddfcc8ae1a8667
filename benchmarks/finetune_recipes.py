"""Fine-tuning benchmark (issue 10): each recipe of ``jobs/finetune-*.yaml``, pre-trained vs random init vs frozen.

For every recipe and variant the script trains the recipe (in process with :func:`pipeline.finetune.loop.run_loop`,
or on Ray Train as ``skypipe finetune`` does with ``--ray``), takes the model chosen on the VAL split, and scores it on
the test data-spec YAMLs of ``benchmarks/finetune_tests/`` exactly as ``skypipe eval <task> --test YAML --bootstrap
N`` does (same data adapter, same metric, per-sample bootstrap CI). Where frozen features apply it also fits frozen
probes of the same checkpoints on the same training split: kNN and logistic regression for RSSCN7, one-vs-rest
logistic regression for BigEarthNet. Results go to ``<out>/<recipe>/<variant>/result.json`` (a run whose result
exists is skipped unless ``--force``), then all of them to a JSON file and a markdown table.

Variants (the recipe as shipped is ``pretrained``):
    pretrained       the committed checkpoint (checkpoints/skysense_v2_tiny_ssl.pt), the recipe unchanged
    random           the same recipe from a random init of the same architecture (outputs/random-tiny.pt, written
                     by ``skypipe model init skysense_v2_tiny --overrides '{"num_experts": 4}' --seed 0``)
    <mode>           RSSCN7: the other adaptation modes (frozen / partial / full / lora), chosen between on VAL
    noscale          RSSCN7: without scale augmentation (``scale: [1, 1]``): what the zoom robustness costs or buys
    gsd-0.625        RSSCN7: images declared 0.5 m (-> 0.625 m, the pre-training GSD; centre 320 px on 256 px)
                     instead of 0.2 m (-> 0.3125 m, whole images): a VAL comparison of the views (tests are 0.3125 m)
    mean-pool        RSSCN7: a mean-pooling classifier instead of attention pooling
    s2, s2-random    BigEarthNet: Sentinel-2 only, to set beside S1+S2 (does fusion help?)
    frozen, frozen-random   dense tasks: only the decoder learns on a frozen backbone (the frozen-feature baseline)

Run from the repository root, single-threaded (the machine is shared; see benchmarks/RESULTS.md):

    OMP_NUM_THREADS=1 python benchmarks/finetune_recipes.py --recipes rsscn7 --variants pretrained random
    python benchmarks/finetune_recipes.py --report-only      # collect every result into the table
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_recipe_table import RECIPES, Recipe, TestSet, Variant, variants  # noqa: E402
from machine import cpu_name  # noqa: E402

TESTS = ROOT / "benchmarks" / "finetune_tests"
PRETRAINED = ROOT / "checkpoints" / "skysense_v2_tiny_ssl.pt"
RANDOM = ROOT / "outputs" / "random-tiny.pt"
PROBE_VIEW = {"gsd": 0.5}
"""RSSCN7 probes also at the pre-training GSD: declared 0.5 m -> 0.625 m, the centre 320 px on 256 px (at the
recipe's 0.3125 m the stage-3 -> 4 transition merges 2x2, a layer the checkpoint never trained: it saw HR only at
0.625 m, where that transition only projects)."""

log = logging.getLogger("finetune_recipes")


def ensure_random() -> str:
    """The random-init checkpoint of the recipes' architecture (``skypipe model init``, seed 0)."""
    if not RANDOM.exists():
        from pipeline.cli import main

        RANDOM.parent.mkdir(parents=True, exist_ok=True)
        code = main(["model", "init", "skysense_v2_tiny", "--overrides", '{"num_experts": 4}', "--seed", "0",
                     "--out", str(RANDOM)])  # fmt: skip
        if code:
            raise RuntimeError("skypipe model init failed")
    return str(RANDOM)


def variant_spec(recipe: Recipe, variant: Variant, storage: Path, steps: int | None) -> Any:
    """The recipe's spec with the variant's changes and the benchmark's storage."""
    from pipeline.finetune.spec import FinetuneSpec, load_finetune

    spec = load_finetune(recipe.path)
    d = spec.model_dump()
    d["name"] = f"{spec.name}-{variant.name}"
    d["storage"], d["out"] = str(storage), None
    if variant.random:
        d["backbone"] = ensure_random()
    if variant.adapt:
        d["adapt"] = d["adapt"] | variant.adapt
    if variant.modalities is not None:
        d["modalities"] = list(variant.modalities)
    if variant.head:
        d["head"] = d["head"] | variant.head
    for entry in d["data"] if isinstance(d["data"], list) else [d["data"]]:
        entry |= variant.data
    if steps is not None:
        d["steps"] = steps
    return FinetuneSpec.model_validate(d)


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def train(spec: Any, use_ray: bool) -> dict[str, Any]:
    """Train (or resume) one variant; returns the loop's summary without the per-step losses."""
    if use_ray:
        from pipeline.finetune.loop import run_finetune

        summary = run_finetune(spec, progress=False)
    else:
        from pipeline.finetune.loop import run_loop

        summary = run_loop(spec, progress=False)
    losses = summary.pop("losses", None) or []
    k = max(1, min(20, len(losses) // 5))
    summary["loss_first"] = float(np.mean(losses[:k])) if losses else None
    summary["loss_last"] = float(np.mean(losses[-k:])) if losses else None
    return summary


def _class_ci(metric: Any, index: int, n: int) -> dict[str, Any]:
    """Bootstrap CI of one class's IoU: the same per-sample resampling as the headline, on a view of the metric."""
    from pipeline.eval.metrics import bootstrap_ci

    view = copy.deepcopy(metric)
    view.headline_name = "class_iou"
    view._overall = lambda s: {"class_iou": s["iou"][..., index]}
    return bootstrap_ci(view, n, seed=0)


def open_test(model_path: str, test: TestSet) -> tuple[Any, Any]:
    """The resolved task of a fine-tuned model and its test source, as ``skypipe eval <task> --test YAML`` opens it."""
    from pipeline.eval.task_cli import data_spec_for_test
    from pipeline.finetune.data import open_dataset
    from pipeline.infer.task import resolve_task

    resolved = resolve_task(model_path, None)
    spec, _ = data_spec_for_test(resolved.kind.name, str(TESTS / test.yaml), None, None)
    wanted = resolved.meta.modalities if resolved.meta and resolved.meta.modalities else None
    wanted = wanted or list(resolved.config.modality_names)
    source = open_dataset(spec, "test", {m: resolved.config.modality(m) for m in wanted}, train=False)
    return resolved, source


def score(model_path: str, test: TestSet, n_boot: int, report: Path | None) -> dict[str, Any]:
    """Headline metric (+ bootstrap CI) of a fine-tuned model on a test set, and the positive class's IoU."""
    from pipeline.eval.metrics import bootstrap_ci
    from pipeline.eval.report import write_report
    from pipeline.finetune.evaluate import evaluate

    t0 = time.perf_counter()
    resolved, source = open_test(model_path, test)
    names = resolved.class_names
    task = resolved.build(context_radius=None)
    metric = evaluate(task, resolved.kind, [source], class_names=names, per_sample=True)
    result = metric.compute()
    result["ci"] = bootstrap_ci(metric, n_boot, seed=0)
    if report is not None:
        write_report(report, result)
    out = {"test": test.label, "yaml": test.yaml, "n_samples": result["n_samples"], "metric": result["headline"],
           "value": result["overall"][result["headline"]], "low": result["ci"]["low"], "high": result["ci"]["high"],
           "overall": result["overall"]}  # fmt: skip
    if test.positive is not None and names:
        i = list(names).index(test.positive)
        ci = _class_ci(metric, i, n_boot)
        iou = result["per_class"][test.positive]["iou"]
        out["positive"] = {"class": test.positive, "iou": iou, "low": ci["low"], "high": ci["high"]}
    out["seconds"] = time.perf_counter() - t0
    return out


@torch.no_grad()
def features(model: Any, source: Any, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Frozen fused features (masked mean over the 10 m grid, as ``skypipe eval knn``) of a labelled source."""
    from torch.utils.data import DataLoader

    from pipeline.eval.features import pool
    from pipeline.finetune.evaluate import _Plain
    from pipeline.finetune.sample import batch_inputs, collate

    loader = DataLoader(_Plain(source), batch_size=batch_size, collate_fn=collate)
    xs, ys = [], []
    for batch in loader:
        inter = model.forward_intermediates(batch_inputs(batch, "cpu")[0])
        xs.append(pool(inter, "fused").float())
        ys.append(batch["label"])
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def _ci_of(metric: Any, n_boot: int) -> dict[str, Any]:
    from pipeline.eval.metrics import bootstrap_ci

    r = metric.compute()
    ci = bootstrap_ci(metric, n_boot, seed=0)
    return {"n_samples": r["n_samples"], "metric": r["headline"], "value": r["overall"][r["headline"]],
            "low": ci["low"], "high": ci["high"], "overall": r["overall"]}  # fmt: skip


def probe_classification(recipe: Recipe, random: bool, n_boot: int, view: dict[str, Any] | None = None,
                         label: str = "") -> list[dict[str, Any]]:  # fmt: skip
    """kNN (k=20, T=0.07) and logistic regression on frozen features: recipe's train split -> each test set.

    ``view``: data-spec fields changed in the train split and in the first test set (only that one is scored), to
    probe the checkpoint at another view of the same images (``label`` names it).
    """
    from pipeline.eval.knn import knn_predict
    from pipeline.eval.linear import fit_linear_probe
    from pipeline.eval.metrics import ClassificationMetrics
    from pipeline.finetune.data import open_dataset
    from pipeline.finetune.spec import load_finetune
    from pipeline.model.checkpoint import load_checkpoint

    spec = load_finetune(recipe.path)
    model, _ = load_checkpoint(ensure_random() if random else str(PRETRAINED))
    model.eval()
    specs = {m: model.config.modality(m) for m in spec.modalities}
    train_spec = spec.datasets[0].model_copy(update=view or {})
    train_src = open_dataset(train_spec, "train", specs, train=False, seed=spec.seed)
    t0 = time.perf_counter()
    xtr, ytr = features(model, train_src)
    linear, c = fit_linear_probe(xtr, ytr, seed=0)
    rows = []
    for test in recipe.tests[:1] if view else recipe.tests:
        source = _test_source(test, specs, view)
        xte, yte = features(model, source)
        for name, pred in (("kNN k=20", knn_predict(xtr, ytr, xte, 20, 0.07, len(source.classes))),
                           (f"linear (C={c:g})", linear.predict(xte))):  # fmt: skip
            metric = ClassificationMetrics(class_names=source.classes, per_sample=True)
            metric.update(torch.as_tensor(pred), torch.as_tensor(yte))
            rows.append({"test": test.label, "yaml": test.yaml, "probe": f"{name}{label}"} | _ci_of(metric, n_boot))
    for r in rows:
        r["seconds"] = time.perf_counter() - t0
    return rows


def _test_source(test: TestSet, specs: dict[str, Any], view: dict[str, Any] | None = None) -> Any:
    import yaml

    from pipeline.finetune.data import open_dataset, parse_data_spec

    path = TESTS / test.yaml
    data = yaml.safe_load(path.read_text()) | (view or {})
    return open_dataset(parse_data_spec(data, base_dir=path.parent, source=str(path)), "test", specs, train=False)


def probe_multilabel(recipe: Recipe, random: bool, modalities: tuple[str, ...], n_boot: int) -> list[dict[str, Any]]:
    """One-vs-rest logistic regression (C=1, as ``skypipe eval bigearthnet``) on frozen features of the train split.

    Classes without a positive (or without a negative) in train cannot be learnt; they get their training
    prevalence as a constant score, as a fine-tuned head that never saw them would, and every class with a test
    positive is scored (the fine-tuned models' mAP counts the same classes).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    from pipeline.eval.metrics import MultilabelMetrics
    from pipeline.finetune.data import open_dataset
    from pipeline.finetune.spec import load_finetune
    from pipeline.model.checkpoint import load_checkpoint

    spec = load_finetune(recipe.path)
    model, _ = load_checkpoint(ensure_random() if random else str(PRETRAINED))
    model.eval()
    specs = {m: model.config.modality(m) for m in modalities}
    t0 = time.perf_counter()
    xtr, ytr = features(model, open_dataset(spec.datasets[0], "train", specs, train=False, seed=spec.seed))
    rows = []
    for test in recipe.tests:
        source = _test_source(test, specs)
        xte, yte = features(model, source)
        keep = np.flatnonzero((ytr.sum(0) > 0) & (ytr.sum(0) < len(ytr)))
        scaler = StandardScaler().fit(xtr)
        clf = OneVsRestClassifier(LogisticRegression(max_iter=5000, C=1.0)).fit(scaler.transform(xtr), ytr[:, keep])
        scores = np.tile(ytr.mean(0), (len(xte), 1)).astype(np.float32)
        scores[:, keep] = clf.predict_proba(scaler.transform(xte))
        metric = MultilabelMetrics(class_names=source.classes, logits=False)
        metric.update(torch.as_tensor(scores), torch.as_tensor(yte))
        rows.append({"test": test.label, "yaml": test.yaml, "probe": "linear (one-vs-rest, C=1)"}
                    | _ci_of(metric, n_boot))  # fmt: skip
    for r in rows:
        r["seconds"] = time.perf_counter() - t0
    return rows


def run_variant(recipe: Recipe, variant: Variant, args: argparse.Namespace) -> dict[str, Any] | None:
    """Train one variant, score it on every test set, write and return its result (None: another process has it)."""
    where = Path(args.out) / recipe.name / variant.name
    result_path = where / "result.json"
    if result_path.exists() and not args.force:
        log.info("%s/%s: done already (%s)", recipe.name, variant.name, result_path)
        return json.loads(result_path.read_text())
    lock = where / "running.pid"
    if lock.exists() and _alive(int(lock.read_text() or 0)):
        log.info("%s/%s: process %s is training it, skipped", recipe.name, variant.name, lock.read_text())
        return None
    if args.force:
        shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True, exist_ok=True)
    lock.write_text(str(os.getpid()))
    try:
        return _run_variant(recipe, variant, args, where)
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0


def _run_variant(recipe: Recipe, variant: Variant, args: argparse.Namespace, where: Path) -> dict[str, Any]:
    from pipeline.finetune.checkpoint import read_task_meta

    spec = variant_spec(recipe, variant, where / "run", args.steps)
    log.info("%s/%s: training %d steps (%s, adapt %s)", recipe.name, variant.name, spec.steps, spec.backbone,
             spec.adapt.mode)  # fmt: skip
    load0, t0 = _load(), time.time()
    summary = train(spec, args.ray)
    load1 = _load()
    meta = read_task_meta(spec.model_path)
    tests = [score(spec.model_path, t, args.bootstrap, where / f"test-{t.yaml.removesuffix('.yaml')}")
             for t in recipe.tests]  # fmt: skip
    result = {
        "recipe": recipe.name, "variant": variant.name, "what": variant.what, "backbone": spec.backbone,
        "adapt": spec.adapt.mode, "modalities": spec.modalities, "steps": spec.steps, "batch_size": spec.batch_size,
        "val": (meta.metrics or {}).get("val"), "train": summary, "tests": tests,
        "wall_s": time.time() - t0, "load_start": load0, "load_after_training": load1, "load_end": _load(),
        "threads": torch.get_num_threads(), "ray": args.ray, "cpu": cpu_name(), "cores": os.cpu_count(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    (where / "result.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    log.info("%s/%s: %s", recipe.name, variant.name, "; ".join(f"{t['test']} {t['metric']} {t['value']:.4f}"
                                                                for t in tests))  # fmt: skip
    return result


def run_probes(recipe: Recipe, args: argparse.Namespace) -> None:
    """Frozen-feature probes of the pre-trained and the random checkpoint (written to ``<out>/<recipe>/probes``)."""
    path = Path(args.out) / recipe.name / "probes.json"
    if recipe.probe is None or (path.exists() and not args.force):
        return
    rows = []
    for random in (False, True):
        backbone = "random" if random else "pretrained"
        if recipe.probe == "classification":
            found = probe_classification(recipe, random, args.bootstrap)
            found += probe_classification(recipe, random, args.bootstrap, PROBE_VIEW, " @0.625 m")
            rows += [r | {"backbone": backbone, "modalities": ["hr"]} for r in found]
        else:
            for mods in (("s2", "s1"), ("s2",)):
                found = probe_multilabel(recipe, random, mods, args.bootstrap)
                rows += [r | {"backbone": backbone, "modalities": list(mods)} for r in found]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1, default=float) + "\n")


def _pct(v: float | None, scale: float = 100.0) -> str:
    return "-" if v is None or v != v else f"{scale * v:.1f}"


def collect(out: Path) -> dict[str, Any]:
    """Every variant's result and every probe under ``out``."""
    found: dict[str, Any] = {"runs": [], "probes": []}
    for path in sorted(out.glob("*/*/result.json")):
        found["runs"].append(json.loads(path.read_text()))
    for path in sorted(out.glob("*/probes.json")):
        name = path.parent.name
        found["probes"] += [r | {"recipe": name} for r in json.loads(path.read_text())]
    return found


def table(found: dict[str, Any]) -> str:
    """Markdown: per recipe and test set, every variant and probe, metric in % with its 95 % bootstrap CI.

    Columns: the model (variant, modalities), what learnt, the headline on VAL of the model kept (the best
    validation), the headline on the test set with its CI, the positive class's IoU where a test names one, the
    training wall time and the 1-minute load average when training started.
    """
    lines = []
    order = {n: i for i, n in enumerate(RECIPES)}
    runs = sorted(found["runs"], key=lambda r: (order.get(r["recipe"], 99), r["variant"] != "pretrained",
                                                r["variant"]))  # fmt: skip
    for name in sorted({r["recipe"] for r in runs} | {p["recipe"] for p in found["probes"]}, key=order.get):
        recipe = RECIPES[name]
        lines += [f"#### {name} (`jobs/finetune-{name}.yaml`)", ""]
        for test in recipe.tests:
            rows = [(r, t) for r in runs if r["recipe"] == name for t in r["tests"] if t["yaml"] == test.yaml]
            probes = [p for p in found["probes"] if p["recipe"] == name and p["yaml"] == test.yaml]
            metric = next((t["metric"] for _, t in rows), next((p["metric"] for p in probes), "metric"))
            pos = test.positive
            head = f"| model | adapt | val {metric} | test {metric} (95 % CI) |"
            head += f" IoU {pos} (95 % CI) |" if pos else ""
            lines += [f"*{test.label}* (`benchmarks/finetune_tests/{test.yaml}`)", "", head + " train s | load |",
                      "|---|---|---|---|" + ("---|" if pos else "") + "---|---|"]  # fmt: skip
            for r, t in rows:
                val = r["val"] or {}
                cell = f"{_pct(t['value'])} ({_pct(t['low'])}-{_pct(t['high'])})"
                extra = ""
                if pos:
                    p = t.get("positive") or {}
                    extra = f" {_pct(p.get('iou'))} ({_pct(p.get('low'))}-{_pct(p.get('high'))}) |"
                mods = "+".join(m.upper() for m in r["modalities"])
                lines.append(f"| {r['variant']} ({mods}) | {r['adapt']} | {_pct(val.get(metric))} | {cell} |{extra} "
                             f"{r['train']['seconds']:.0f} | {r['load_start'][0]:.0f} |")  # fmt: skip
            for p in probes:
                mods = "+".join(m.upper() for m in p["modalities"])
                cell = f"{_pct(p['value'])} ({_pct(p['low'])}-{_pct(p['high'])})"
                lines.append(f"| frozen {p['probe']}, {p['backbone']} ({mods}) | - | - | {cell} |"
                             + (" - |" if pos else "") + " - | - |")  # fmt: skip
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    """Parse the command line, run what it asks, write the collected table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--variants", nargs="+", help="variant names (default: all of each recipe)")
    p.add_argument("--probes", action="store_true", help="also the frozen-feature probes (RSSCN7, BigEarthNet)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "finetune-bench"))
    p.add_argument("--table", default=str(ROOT / "benchmarks" / "finetune_results"),
                   help="writes TABLE.md and TABLE.json with every result found under --out")  # fmt: skip
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--steps", type=int, help="override every recipe's steps (smoke tests)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in process (1 on a shared machine)")
    p.add_argument("--ray", action="store_true", help="train on Ray Train, as skypipe finetune does")
    p.add_argument("--force", action="store_true", help="train again even when a result exists")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if not args.report_only:
        for name in args.recipes:
            recipe = RECIPES[name]
            if args.probes:
                run_probes(recipe, args)
            for vname, variant in variants(recipe).items():
                if args.variants is None or vname in args.variants:
                    run_variant(recipe, variant, args)
    found = collect(Path(args.out))
    found["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count()}
    Path(args.table + ".json").write_text(json.dumps(found, indent=1, default=float) + "\n")
    Path(args.table + ".md").write_text(table(found) + "\n")
    print(table(found))


if __name__ == "__main__":
    main()
