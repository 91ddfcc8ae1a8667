"""Temporal + multi-modal fusion on the shared grid.

[v1 code] SkySense V1/++ fuse per output location a sequence [HR token] + [S2 tokens over time] + [S1 tokens
over time] with a learnable day-of-year embedding, through a transformer encoder whose class token is the
fused feature. [ours] V2's paper does not describe its fusion, so we keep that design, with a learnable
modality embedding, a day-of-year embedding on every token (index 0 = unknown date), and a key mask so any
modality, date or location may be missing. A masked token is excluded from attention exactly (its softmax
weight is 0), so a sample whose modality is absent and one whose modality is present but fully masked give
the same fused feature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .layers.attention import Block

MAX_DOY = 366


class TemporalFusion(nn.Module):
    """Per-location transformer over time and modality; returns the class token as the fused feature map."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        modality_names: Sequence[str],
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.modality_names = tuple(modality_names)
        self.proj = nn.Linear(in_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.modality_embed = nn.Parameter(torch.zeros(len(self.modality_names), dim))
        self.doy_embed = nn.Embedding(MAX_DOY + 1, dim)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        for p in (self.cls_token, self.modality_embed):
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.trunc_normal_(self.doy_embed.weight, std=0.02)

    def forward(
        self,
        tokens: Mapping[str, Tensor],
        doy: Mapping[str, Tensor],
        valid: Mapping[str, Tensor],
    ) -> Tensor:
        """Fuse the final-stage maps of the modalities present.

        Args:
            tokens: per modality (B, T_m, C, Hg, Wg) final-stage features on the shared grid.
            doy: per modality (B, T_m) day of year 1..366 (0 = unknown).
            valid: per modality (B, T_m, Hg, Wg) bool, False = token missing (cloud, nodata, padding date).

        Returns:
            (B, D, Hg, Wg) fused feature map.

        """
        present = [m for m in self.modality_names if m in tokens]
        if not present:
            raise ValueError("fusion needs at least one modality")
        B, _, _, Hg, Wg = tokens[present[0]].shape
        L = B * Hg * Wg
        seqs = [self.cls_token.expand(L, -1, -1)]  # (L, 1, D)
        masks = [torch.ones(L, 1, dtype=torch.bool, device=self.cls_token.device)]
        for name in present:
            t = tokens[name]
            T, C = t.shape[1], t.shape[2]
            e = self.proj(t.permute(0, 3, 4, 1, 2).reshape(L, T, C))  # (B*Hg*Wg, T, D)
            date = self.doy_embed(doy[name].clamp(0, MAX_DOY))  # (B, T, D)
            date = date[:, None, None].expand(B, Hg, Wg, T, -1).reshape(L, T, -1)
            seqs.append(e + date + self.modality_embed[self.modality_names.index(name)])
            masks.append(valid[name].permute(0, 2, 3, 1).reshape(L, T))
        x = torch.cat(seqs, dim=1)  # (L, 1 + sum T, D)
        key_mask = torch.cat(masks, dim=1)
        for blk in self.blocks:
            x = blk(x, key_mask)
        fused = self.norm(x[:, 0])  # (L, D)
        return fused.reshape(B, Hg, Wg, -1).permute(0, 3, 1, 2).contiguous()
