"""``skypipe eval knn|linear|bigearthnet|split|protocol|<task>``: frozen-feature and fine-tuned evaluations.

knn/linear/bigearthnet print their metric last; ``protocol`` (``protocol_cli.py``) is the fixed protocol that every
checkpoint is reported with; ``classification``, ``segmentation``, ... (``task_cli.py``) score fine-tuned models.
"""

from __future__ import annotations

import argparse
import json
import time


def _model(args: argparse.Namespace):
    from .features import describe, load_model

    overrides = json.loads(args.overrides) if args.overrides else None
    model = load_model(args.checkpoint, args.random_init, args.seed, overrides)
    print(describe(model, args.checkpoint, args.random_init, args.seed))
    return model


def _class_features(args: argparse.Namespace):
    from .features import check_same_classes, class_folder_source, extract

    model = _model(args)
    spec = model.config.modality(args.modality)
    train = class_folder_source(args.train, spec, args.size, args.gsd)
    test = class_folder_source(args.test, spec, args.size, args.gsd)
    check_same_classes(train, test)
    t0 = time.perf_counter()
    tr = extract(model, train, args.feature, args.batch_size, args.loader_workers)
    te = extract(model, test, args.feature, args.batch_size, args.loader_workers)
    print(f"features {args.feature} ({tr[0].shape[1]}-d) of {len(tr[0])} train / {len(te[0])} test "
          f"{args.modality} images at {args.size} px ({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    return train.classes, tr, te


def _knn(args: argparse.Namespace) -> int:
    from .knn import knn_accuracy

    classes, (xtr, ytr), (xte, yte) = _class_features(args)
    temp = None if args.majority else args.temperature
    r = knn_accuracy(xtr, ytr, xte, yte, k=args.k, temperature=temp, classes=classes)
    vote = "majority vote" if temp is None else f"weighted vote T={temp:g}"
    print("per class " + ", ".join(f"{c} {a:.2f}" for c, a in r.per_class.items()))
    print(f"kNN k={r.k} ({vote}), cosine similarity")
    print(f"accuracy {r.accuracy:.4f}")
    return 0


def _linear(args: argparse.Namespace) -> int:
    from .linear import linear_probe

    _, (xtr, ytr), (xte, yte) = _class_features(args)
    r = linear_probe(xtr, ytr, xte, yte, seed=args.seed)
    print(f"logistic regression, C={r.C:g} (chosen by cross-validation on train)")
    print(f"accuracy {r.accuracy:.4f}")
    return 0


def _bigearthnet(args: argparse.Namespace) -> int:
    import numpy as np

    from pipeline.train.sources import BigEarthNetSource

    from .features import extract
    from .linear import multilabel_probe

    model = _model(args)
    parts = {}
    for split in ("train", "val", "test"):
        src = BigEarthNetSource(args.data, split=split, size=args.size)
        x, y = extract(model, _Only(src, args.modalities), args.feature, args.batch_size)
        parts[split] = (x, y)
        classes = src.classes
    xtr = np.concatenate([parts["train"][0], parts["val"][0]])
    ytr = np.concatenate([parts["train"][1], parts["val"][1]])
    r = multilabel_probe(xtr, ytr, *parts["test"], classes=classes)
    print(f"BigEarthNet v1 {'+'.join(args.modalities)}: one-vs-rest logistic regression on {args.feature} features, "
          f"train+val {r.n_train} / test {r.n_test} patches, centre crop {args.size} px")  # fmt: skip
    print("AP " + ", ".join(f"{c} {a:.2f}" for c, a in r.per_class_ap.items()))
    print(f"mAP over the {r.classes_scored} classes with train and test positives (tiny sample: indicative only)")
    print(f"mAP {r.mAP:.4f}")
    return 0


class _Only:
    """A source restricted to some of its modalities (labels kept)."""

    def __init__(self, source, modalities: list[str]) -> None:
        self.source, self.keep = source, set(modalities) | {"label"}
        self.modalities = tuple(modalities)

    def __len__(self) -> int:
        return len(self.source)

    def get(self, index: int, rng=None) -> dict:
        return {k: v for k, v in self.source.get(index, rng).items() if k in self.keep}


def _split(args: argparse.Namespace) -> int:
    from .features import split_class_folders

    r = split_class_folders(args.source, args.out, args.train_count, args.test_count)
    print(f"train {r['train']}\ntest {r['test']}")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="skypipe checkpoint path or fsspec URL")
    g.add_argument("--random-init", metavar="MODEL_NAME", help="randomly initialised configuration (baseline)")
    p.add_argument("--overrides", help="JSON config overrides for --random-init")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init and of the CV folds")
    p.add_argument("--feature", choices=("fused", "stage4", "both"), default="fused",
                   help="pooled fused embedding (default), pooled stage-4 map, or both concatenated")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32)


def _add_folder_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--modality", choices=("hr", "s2", "s1"), default="hr")
    p.add_argument("--train", required=True, help="folder with one sub-folder of images per class")
    p.add_argument("--test", required=True, help="folder with the same class sub-folders")
    p.add_argument("--size", type=int, default=128, help="images are resized to SIZE x SIZE pixels")
    p.add_argument("--gsd", type=float, help="GSD assigned to the resized images (default: the modality's)")
    p.add_argument("--loader-workers", type=int, default=0)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` command group."""
    ev = subparsers.add_parser("eval", help="evaluate: frozen features (kNN, linear, protocol) or fine-tuned tasks")
    sub = ev.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    knn = sub.add_parser("knn", help="weighted kNN on frozen features (k=20, T=0.07, cosine)")
    _add_folder_args(knn)
    knn.add_argument("--k", type=int, default=20)
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--majority", action="store_true", help="plain majority vote instead of weighted")
    knn.set_defaults(func=_knn)
    lin = sub.add_parser("linear", help="logistic-regression probe on frozen features")
    _add_folder_args(lin)
    lin.set_defaults(func=_linear)
    ben = sub.add_parser("bigearthnet", help="BigEarthNet v1 multi-label linear probe (mAP) from its splits")
    _add_model_args(ben)
    ben.add_argument("--data", required=True, help="the bigearthnet_v1 folder")
    ben.add_argument("--modalities", type=lambda s: s.split(","), default=["s2", "s1"], help="e.g. s2,s1 or s2")
    ben.add_argument("--size", type=int, default=32, help="centre crop side in 10 m pixels (patches are 120)")
    ben.set_defaults(func=_bigearthnet)
    sp = sub.add_parser("split", help="split a class-per-folder tree into train/test folders of symlinks")
    sp.add_argument("source")
    sp.add_argument("out")
    sp.add_argument("--train", dest="train_count", type=int, required=True, help="first N images per class")
    sp.add_argument("--test", dest="test_count", type=int, help="next M images per class (default: the rest)")
    sp.set_defaults(func=_split)
    from .protocol_cli import register_protocol
    from .task_cli import register_task_evals

    register_protocol(sub)
    register_task_evals(sub)
