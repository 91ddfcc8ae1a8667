"""Task models: a SkySense V2 model plus a head, consuming the backbone only through its feature API.

A task model maps inputs (one period, or a before and an after period for change) to

* a dense map ``(B, K, H, W)``: embeddings on the 10 m grid; class scores / values at the finest input resolution;
* or one vector ``(B, K)`` per sample (scene classification, multi-label).

Heads own only their layers; :meth:`TaskModel.head_config` returns the keyword arguments that rebuild the same head,
so a checkpoint can carry it (:func:`pipeline.model.heads.build_task`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..skysense import ModalityInput, SkySenseV2

Inputs = Mapping[str, ModalityInput | Tensor]


class TaskModel(nn.Module):
    """Base: a backbone plus a head producing ``out_channels`` values per location (or per sample)."""

    kind: str = ""
    dense: bool = True  # (B, K, H, W) maps; False: (B, K) vectors

    def __init__(self, model: SkySenseV2) -> None:
        super().__init__()
        self.model = model
        self.out_channels = model.config.fusion_dim
        self.channel_names: list[str] = []

    def head_config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this head (stored in checkpoints)."""
        return {}

    def forward(self, inputs: Inputs, inputs_after: Inputs | None = None) -> Tensor:
        """Inputs of one date range (and a second one for change) -> ``(B, K, H, W)`` or ``(B, K)``."""
        raise NotImplementedError


class EmbeddingTask(TaskModel):
    """The fused embedding map itself, on the 10 m grid."""

    kind = "embeddings"

    def __init__(self, model: SkySenseV2) -> None:
        super().__init__(model)
        self.channel_names = [f"emb_{i:03d}" for i in range(self.out_channels)]

    def forward(self, inputs, inputs_after=None):  # noqa: D102
        return self.model(inputs)


def output_size(inputs: Inputs) -> tuple[int, int]:
    """``(H, W)`` of the finest input (the most pixels per side): dense outputs come out at this resolution."""
    sizes = [tuple((v.x if isinstance(v, ModalityInput) else v).shape[-2:]) for v in inputs.values()]
    return max(sizes)  # type: ignore[return-value]


def pyramid(inter: Mapping[str, list[Tensor] | Tensor]) -> list[Tensor]:
    """The 4 stage maps ``(B, C_s, H_s, W_s)`` of the modalities present, averaged over dates and modalities.

    Where modalities' maps of one stage differ in size (HR stages 1-2 are finer than S2's), the coarser ones are
    resized to the finest before averaging.
    """
    per_mod = [v for k, v in inter.items() if isinstance(v, list)]
    levels = []
    for s in range(len(per_mod[0])):
        maps = [m[s].mean(dim=1) for m in per_mod]  # (B, C_s, H, W) each: temporal mean
        size = max(tuple(m.shape[-2:]) for m in maps)
        maps = [m if tuple(m.shape[-2:]) == size else F.interpolate(m, size=size, mode="bilinear") for m in maps]
        levels.append(torch.stack(maps).mean(0))
    return levels
