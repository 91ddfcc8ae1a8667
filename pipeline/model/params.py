"""Parameter accounting without allocating weights (meta device)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SkySenseConfig
from .layers.moe import MoEFeedForward
from .skysense import SkySenseV2


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one configuration.

    Attributes:
        tokenizers: per-modality patch embeddings.
        backbone_dense: the shared backbone as if each MoE layer were one dense feed-forward (no gate).
        backbone_moe: the shared backbone as built (all experts and gates).
        fusion: the temporal/multi-modal fusion transformer.
        total: everything.
        active_per_token: what one token of one modality touches: its tokenizer, the backbone with top-k
            experts per MoE layer plus the gates, and the fusion.

    """

    tokenizers: int
    backbone_dense: int
    backbone_moe: int
    fusion: int
    total: int
    active_per_token: int

    def table(self) -> str:
        """Human-readable table."""
        rows = [
            ("tokenizers", self.tokenizers),
            ("backbone (dense)", self.backbone_dense),
            ("backbone (with MoE)", self.backbone_moe),
            ("fusion", self.fusion),
            ("total", self.total),
            ("active per token", self.active_per_token),
        ]
        return "\n".join(f"{name:<22}{n:>16,d}  ({_human(n)})" for name, n in rows)


def _human(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(config: SkySenseConfig) -> ParamCounts:
    """Build ``config`` on the meta device and count its parameters by part."""
    with torch.device("meta"):
        model = SkySenseV2(config)
    backbone = model.backbone
    tokenizers = _numel(backbone.tokenizers)
    backbone_moe = _numel(backbone) - tokenizers
    moe_layers = [m for m in backbone.modules() if isinstance(m, MoEFeedForward)]
    per_expert = [(_numel(m) - m.gate.weight.numel()) // m.num_experts for m in moe_layers]
    gates = [m.gate.weight.numel() for m in moe_layers]
    moe_total = sum(_numel(m) for m in moe_layers)
    backbone_dense = backbone_moe - moe_total + sum(per_expert)
    active = backbone_dense + sum(gates) + sum(pe * (config.top_k - 1) for pe in per_expert)
    fusion = _numel(model.fusion)
    largest_tokenizer = max(_numel(t) for t in backbone.tokenizers.values())
    return ParamCounts(
        tokenizers=tokenizers,
        backbone_dense=backbone_dense,
        backbone_moe=backbone_moe,
        fusion=fusion,
        total=_numel(model),
        active_per_token=largest_tokenizer + active + fusion,
    )
