"""Per-sample heads: scene classification and multi-label classification from the fused embedding map.

Pooling over the map's valid grid cells [ours]: ``attention`` (default) lets a learned query weigh the cells
(one multi-head attention layer: scenes are often decided by a part of the image); ``mean`` is the plain masked
mean (a linear probe on pooled features). Both ignore cells without any valid input.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..skysense import SkySenseV2
from .base import Inputs, TaskModel

Pooling = Literal["attention", "mean"]


class CellPool(nn.Module):
    """``(B, D, Hg, Wg)`` map + ``(B, Hg, Wg)`` validity -> ``(B, D)``, by attention or by mean."""

    def __init__(self, dim: int, pooling: Pooling = "attention", heads: int = 4) -> None:
        super().__init__()
        self.pooling = pooling
        if pooling == "attention":
            self.query = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.trunc_normal_(self.query, std=0.02)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        elif pooling != "mean":
            raise ValueError(f"pooling must be 'attention' or 'mean', got {pooling!r}")
        self.norm = nn.LayerNorm(dim)

    def forward(self, fused: Tensor, valid: Tensor) -> Tensor:  # noqa: D102
        tokens = fused.flatten(2).transpose(1, 2)  # (B, N, D)
        keep = valid.flatten(1)  # (B, N)
        keep = keep | ~keep.any(dim=1, keepdim=True)  # a sample without any valid cell pools all (no NaN)
        if self.pooling == "mean":
            w = keep[..., None].to(tokens.dtype)
            return self.norm((tokens * w).sum(1) / w.sum(1))
        q = self.query.expand(tokens.shape[0], -1, -1)
        out, _ = self.attn(q, tokens, tokens, key_padding_mask=~keep, need_weights=False)
        return self.norm(out[:, 0])


class ClassificationTask(TaskModel):
    """One class score vector per sample (scene classification)."""

    kind = "classification"
    dense = False

    def __init__(self, model: SkySenseV2, num_classes: int, class_names: list[str] | None = None,
                 pooling: Pooling = "attention") -> None:  # fmt: skip
        super().__init__(model)
        self.out_channels, self.pooling = num_classes, pooling
        self.channel_names = list(class_names or [f"class_{i}" for i in range(num_classes)])
        if len(self.channel_names) != num_classes:
            raise ValueError(f"{len(self.channel_names)} class names for {num_classes} classes")
        dim = model.config.fusion_dim
        self.head = nn.ModuleDict({"pool": CellPool(dim, pooling), "classifier": nn.Linear(dim, num_classes)})

    def head_config(self) -> dict[str, Any]:  # noqa: D102
        return {"pooling": self.pooling}

    def forward(self, inputs: Inputs, inputs_after: Inputs | None = None) -> Tensor:  # noqa: D102
        feats = self.model.forward_features(inputs)
        return self.head["classifier"](self.head["pool"](feats["fused"], feats["valid"]))


class MultiLabelTask(ClassificationTask):
    """Independent scores (logits) per class per sample (multi-label classification: sigmoid, not softmax)."""

    kind = "multilabel"
