"""``skypipe pretrain JOB.yaml``: validate the spec, run (or resume) it on Ray Train, print the summary."""

from __future__ import annotations

import argparse


def _pretrain(args: argparse.Namespace) -> int:
    from .loop import run_pretrain
    from .spec import load_pretrain_spec

    spec = load_pretrain_spec(args.job)
    overrides = {k: v for k, v in (("steps", args.steps), ("storage", args.storage), ("workers", args.workers)) if v}
    if overrides:
        spec = type(spec).model_validate(spec.model_dump() | overrides)
    summary = run_pretrain(spec, progress=not args.no_progress)
    print(summary.text())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` command."""
    p = subparsers.add_parser("pretrain", help="self-supervised pre-training on Ray Train (resumes from storage)")
    p.add_argument("job", help="pre-training spec YAML (see jobs/pretrain-*.yaml)")
    p.add_argument("--steps", type=int, help="override the spec's total steps")
    p.add_argument("--storage", help="override the spec's storage path / URL")
    p.add_argument("--workers", type=int, help="override the number of Ray Train workers")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_pretrain)
