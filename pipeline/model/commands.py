"""``skypipe model ...``: inspect configurations and checkpoints, write randomly initialised checkpoints."""

from __future__ import annotations

import argparse
import json

from .config import MODEL_CONFIGS, get_config


def _info(args: argparse.Namespace) -> int:
    from .params import count_parameters

    if args.name.endswith((".pt", ".ckpt", ".pth")) or "/" in args.name:
        from .checkpoint import read_checkpoint
        from .config import SkySenseConfig

        payload = read_checkpoint(args.name)
        config = SkySenseConfig.from_dict(payload["model"])
        print(f"checkpoint     {args.name}")
        print(f"written by     {payload['code_version']}")
        for key, value in payload.get("provenance", {}).items():
            print(f"{key:<15}{value}")
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
