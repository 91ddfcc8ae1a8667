"""``skypipe eval protocol``: score a checkpoint or a random initialisation with the fixed protocol."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def _protocol(args: argparse.Namespace) -> int:
    from .protocol import DEFAULT_SPLIT_DIR, describe_model, format_table, run_protocol, split_rsscn7

    if args.split_only:
        from pipeline.catalog.recipe import shared_data_dir

        root = Path(args.data) if args.data else shared_data_dir()
        parts = split_rsscn7(root / "rsscn7", args.split_dir or DEFAULT_SPLIT_DIR)
        print("\n".join(f"{k} {v}" for k, v in parts.items()))
        return 0
    if (args.checkpoint is None) == (args.random_init is None):
        raise ValueError("give exactly one of --checkpoint PATH or --random-init MODEL_NAME (or --split-only)")
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = json.loads(args.overrides) if args.overrides else None
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint and args.teacher:  # a training checkpoint: score its EMA teacher
            from pipeline.train.state import export_model

            checkpoint = str(Path(tmp) / "teacher.pt")
            export_model(args.checkpoint, checkpoint, which="teacher")
        result = run_protocol(args.split, checkpoint=checkpoint, random_init=args.random_init, overrides=overrides,
                              seeds=seeds, linear=not args.no_linear, data_root=args.data,
                              split_dir=args.split_dir or DEFAULT_SPLIT_DIR, batch_size=args.batch_size)  # fmt: skip
    if args.checkpoint and args.teacher:
        result["model"]["checkpoint"] = f"{args.checkpoint} (EMA teacher)"
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    print(describe_model(result))
    print(format_table(result, baseline))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


def register_protocol(sub: argparse._SubParsersAction) -> None:
    """Add ``eval protocol`` to the ``eval`` sub-commands."""
    p = sub.add_parser("protocol", help="the fixed protocol: RSSCN7 kNN/linear at zoom 1 and 0.5-2x, BigEarthNet mAP")
    p.add_argument("--checkpoint", help="skypipe checkpoint path or URL")
    p.add_argument("--teacher", action="store_true", help="--checkpoint is a training checkpoint: score its teacher")
    p.add_argument("--random-init", metavar="MODEL_NAME", help="randomly initialised configuration (baseline)")
    p.add_argument("--overrides", help="JSON config overrides for --random-init")
    p.add_argument("--split", choices=("val", "test"), default="test", help="choose on val, report on test")
    p.add_argument("--seeds", default="0,1,2,3,4", help="weight seeds (random init) or probe seeds (checkpoint)")
    p.add_argument("--no-linear", action="store_true", help="skip the RSSCN7 linear probe (quick checks)")
    p.add_argument("--baseline", help="a result JSON of the same split to print side by side (e.g. random init)")
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--data", help="shared data folder (default: $SKYPIPE_SHARED_DATA or ../shared/data)")
    p.add_argument("--split-dir", help="where the RSSCN7 split folders are written (default outputs/rsscn7-split)")
    p.add_argument("--split-only", action="store_true", help="only write the RSSCN7 split folders")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_protocol)
