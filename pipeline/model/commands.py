"""``skypipe model ...``: inspect configurations and checkpoints, write randomly initialised checkpoints."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from .config import MODEL_CONFIGS, get_config

if TYPE_CHECKING:
    from pipeline.finetune.checkpoint import TaskMeta


def _info(args: argparse.Namespace) -> int:
    from .params import count_parameters

    if args.name.endswith((".pt", ".ckpt", ".pth")) or "/" in args.name:
        from pipeline.finetune.checkpoint import ADAPTER_FORMAT, backbone_of, read_any, task_meta

        from .checkpoint import read_checkpoint
        from .config import SkySenseConfig

        payload = read_any(args.name)
        print(f"checkpoint     {args.name}")
        print(f"written by     {payload['code_version']}")
        for key, value in payload.get("provenance", {}).items():
            print(f"{key:<15}{value}")
        meta = task_meta(payload)
        if meta is not None:
            print(_task_lines(meta))
        if payload["format"] == ADAPTER_FORMAT:
            ref = payload["backbone"]
            print(f"adapter of     {ref.get('path')} (sha256 {str(ref.get('sha256'))[:16]}...)")
            payload = read_checkpoint(backbone_of(args.name, payload))
        config = SkySenseConfig.from_dict(payload["model"])
    else:
        config = get_config(args.name)
    print(f"model          {config.name}")
    print(f"dims           {config.dims}   depths {config.depths}   head dim {config.head_dim}")
    print(f"window         {config.window_size}   MoE: {config.num_experts} experts, top-{config.top_k}, "
          f"last {config.moe_blocks} blocks   prompts {config.num_prompts}/modality")  # fmt: skip
    print(f"fusion         dim {config.fusion_dim}, depth {config.fusion_depth}, heads {config.fusion_heads}")
    for m in config.modalities:
        print(f"modality {m.name:<5} bands {','.join(m.bands)}  [{m.units}]  GSD {m.gsd:g} m  "
              f"patch {config.patch_sizes[m.name]}")  # fmt: skip
    print()
    print(count_parameters(config).table())
    return 0


def _task_lines(meta: TaskMeta) -> str:
    """The fine-tuned task of a checkpoint: kind, classes with colours, adaptation, validation metrics, data."""
    lines = [f"task           {meta.kind} (adapt: {meta.adapt}; modalities {', '.join(meta.modalities)})"]
    if meta.class_names:
        colors = meta.class_colors or [""] * len(meta.class_names)
        lines.append("classes        " + ", ".join(f"{i} {n} {c}".rstrip() for i, (n, c) in
                                                   enumerate(zip(meta.class_names, colors))))  # fmt: skip
    if meta.label_nodata:
        lines.append(f"label nodata   {meta.label_nodata}")
    for split, values in (meta.metrics or {}).items():
        if isinstance(values, dict):
            shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, (int, float)))
            lines.append(f"metrics ({split}) {shown}")
    for d in (meta.data or {}).get("sources", []):
        lines.append(f"trained on     {d.get('format')} {d.get('path')} ({d.get('samples', '?')} samples)")
    return "\n".join(lines)


def _init(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save_checkpoint
    from .skysense import SkySenseV2

    torch.manual_seed(args.seed)
    overrides = json.loads(args.overrides) if args.overrides else {}
    model = SkySenseV2(get_config(args.name, **overrides))
    sha = save_checkpoint(model, args.out, provenance={"weights": f"random init (seed {args.seed})"})
    print(f"wrote {args.out} (sha256 {sha[:16]}...)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``model`` command group."""
    p = sub.add_parser("model", help="model configurations and checkpoints")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    info = msub.add_parser("info", help="architecture and parameter counts (no weights allocated)")
    info.add_argument("name", help=f"configuration ({', '.join(MODEL_CONFIGS)}) or checkpoint path")
    info.set_defaults(func=_info)
    init = msub.add_parser("init", help="write a randomly initialised, self-describing checkpoint")
    init.add_argument("name", choices=sorted(MODEL_CONFIGS))
    init.add_argument("--out", required=True, help="checkpoint path or fsspec URL")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--overrides", help="JSON config overrides, e.g. '{\"depths\": [1, 1, 1, 1]}'")
    init.set_defaults(func=_init)
