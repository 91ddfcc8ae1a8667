"""``skypipe eval classification|multilabel|segmentation|change|regression|detection``: score a fine-tuned checkpoint.

``--test`` is a data-spec YAML (any format of :mod:`pipeline.finetune.data`; its ``--split``, default ``test``) or a
folder in the layout of the task (class folders for classification, ``A/ B/ label/`` for change, BigEarthNet patch
folders for multilabel, DOTA ``images/ labelTxt/`` for detection; every sample of the folder is scored). The
per-class table is printed, then the overall numbers, and as the last line the headline metric (``accuracy 0.8123``,
``map50 0.4321``); ``--bootstrap N`` adds a 95 % interval (samples resampled,
:func:`pipeline.eval.metrics.bootstrap_ci`), ``--report PATH`` writes JSON and a figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

TASK_FORMATS = {"classification": "class_folders", "change": "change_folders", "multilabel": "bigearthnet",
                "detection": "dota"}  # fmt: skip
"""The folder layout ``--test FOLDER`` is read as, per task (other tasks need a data-spec YAML)."""
NAMED_BY_CHECKPOINT = ("dota",)
"""Folder formats whose classes are the checkpoint's (object classes: a test folder may hold only some of them)."""


def data_spec_for_test(task: str, test: str, size: int | None, gsd: float | None,
                       classes: list[str] | None = None) -> tuple[Any, str]:  # fmt: skip
    """The data spec and split to score: from a YAML file, or a whole folder in the task's layout.

    ``classes`` (the checkpoint's) name the classes of folder formats in :data:`NAMED_BY_CHECKPOINT`.
    """
    import yaml

    from pipeline.finetune.data import parse_data_spec

    path = Path(test)
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"test data spec {test!r} not found")
        return parse_data_spec(yaml.safe_load(path.read_text()), base_dir=path.parent, source=str(path)), ""
    if task not in TASK_FORMATS:
        raise ValueError(f"{task} test data needs a data-spec YAML (--test data.yaml), not a folder")
    if not path.is_dir():
        raise FileNotFoundError(f"test folder {test!r} not found")
    data: dict[str, Any] = {"format": TASK_FORMATS[task], "path": str(path), "split": {"fractions": [1, 0, 0]}}
    data |= {k: v for k, v in (("size", size), ("gsd", gsd)) if v is not None}
    if classes is not None and TASK_FORMATS[task] in NAMED_BY_CHECKPOINT:
        data["classes"] = list(classes)
    return parse_data_spec(data, source=str(path)), "train"  # the whole folder is one split


def _eval(args: argparse.Namespace) -> int:
    import torch

    from pipeline.eval.metrics import bootstrap_ci
    from pipeline.eval.report import format_report, write_report
    from pipeline.finetune.data import open_dataset
    from pipeline.finetune.evaluate import evaluate
    from pipeline.infer.task import resolve_task

    resolved = resolve_task(args.checkpoint, None)
    if resolved.kind.name != args.task:
        have = resolved.meta.kind if resolved.meta else "no fine-tuned task (a plain backbone)"
        raise ValueError(f"{args.checkpoint} cannot do {args.task}: it has {have}; use `skypipe eval {have}` or "
                         "fine-tune a checkpoint for this task (skypipe finetune)")  # fmt: skip
    spec, split = data_spec_for_test(args.task, args.test, args.size, args.gsd, resolved.class_names)
    config = resolved.config
    wanted = resolved.meta.modalities if resolved.meta and resolved.meta.modalities else list(config.modality_names)
    specs = {m: config.modality(m) for m in wanted}
    source = open_dataset(spec, split or args.split, specs, train=False)
    if not len(source):
        raise ValueError(f"{args.test}: split {split or args.split!r} has no samples")
    names = resolved.class_names
    if names is not None and list(source.classes) != list(names):
        raise ValueError(f"{args.test} has classes {list(source.classes)}, the checkpoint {list(names)}; they must "
                         "be the same classes in the same order")  # fmt: skip
    task = resolved.build(context_radius=None)
    device = torch.device("cuda" if args.gpu and torch.cuda.is_available() else "cpu")
    metric = evaluate(task.to(device), resolved.kind, [source], class_names=names, device=device,
                      batch_size=args.batch_size, per_sample=args.bootstrap > 0)  # fmt: skip
    result = metric.compute()
    if args.bootstrap:
        result["ci"] = bootstrap_ci(metric, args.bootstrap, seed=args.seed)
    print(f"{args.checkpoint}: {resolved.kind.name} on {len(source)} samples of {args.test}")
    if args.report:
        for path in write_report(args.report, result):
            print(f"wrote {path}")
    print(format_report(result, names))
    return 0


def register_task_evals(sub: argparse._SubParsersAction) -> None:
    """Add one ``skypipe eval <task>`` sub-command per trainable task."""
    from pipeline.kinds import KINDS

    for kind in (k for k in KINDS.values() if k.trainable):
        p = sub.add_parser(kind.name, help=f"score a fine-tuned {kind.name} checkpoint on labelled test data")
        p.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint or adapter")
        p.add_argument("--test", required=True, help="data-spec YAML, or a folder in the task's layout")
        p.add_argument("--split", default="test", help="split of a data-spec YAML to score (default: test)")
        p.add_argument("--size", type=int, help="sample side in pixels (a folder; default: the format's)")
        p.add_argument("--gsd", type=float, help="declared GSD of a folder's images (no georeference)")
        p.add_argument("--bootstrap", type=int, default=0, metavar="N", help="95 %% CI from N resamples of samples")
        p.add_argument("--report", metavar="PATH", help="write PATH.json and a confusion-matrix / AP figure")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
        p.add_argument("--gpu", action="store_true", help="run on CUDA when there is one")
        p.set_defaults(func=_eval, task=kind.name)
