"""``skypipe finetune SPEC.yaml [--out CHECKPOINT]``: a thin wrapper over :func:`.loop.run_finetune`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` command."""
    p = subparsers.add_parser("finetune", help="train a task head (and adapt the backbone) on labelled data")
    p.add_argument("spec", help="fine-tuning spec YAML (see jobs/finetune-*.yaml)")
    p.add_argument("--out", help="where to write the best model (default: the spec's out, else <storage>/model.pt)")
    p.add_argument("--steps", type=int, help="override the spec's number of steps")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    from pipeline.finetune.loop import run_finetune
    from pipeline.finetune.spec import load_finetune

    spec = load_finetune(args.spec)
    changes = {k: v for k, v in (("out", args.out), ("steps", args.steps)) if v is not None}
    if changes:
        from pipeline.finetune.spec import FinetuneSpec

        spec = FinetuneSpec.model_validate({**spec.model_dump(), **changes})
    result = run_finetune(spec, progress=not args.no_progress)
    metrics = (result.get("metric") or {}).get("val") or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"fine-tuned {spec.name}: {result['steps']} steps in {result['seconds']:.0f} s")
    print(f"model {result['model']}" + (f" (best at step {result['best_step']}: {shown})" if shown else ""))
    return 0
