"""Adaptive patch merging (APM): the stage transitions of the shared backbone.

At every transition between stages the width doubles. Tokens whose footprint is still smaller than the
shared grid's footprint are merged 2x2 (Swin-V2 ``PatchMerging``: concatenate 4 neighbours -> Linear(4C, 2C)
-> LayerNorm); tokens already on the grid (S2/S1 at 10 m) only get a linear projection ``Linear(C, 2C) ->
LayerNorm`` and keep their spatial resolution [notes]. Both layers are shared by all modalities; which one a
token map takes follows from its footprint, i.e. from data, not from the modality's name [ours].
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


class PatchMerging(nn.Module):
    """2x2 merge of an NHWC token map: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_dim)."""

    def __init__(self, dim: int, out_dim: int | None = None, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.out_dim = out_dim or 2 * dim
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)
        self.norm = norm_layer(self.out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_dim)."""
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # odd sizes: zero-pad one row/column (as timm)
        # (B, H/2, 2, W/2, 2, C) -> (B, H/2, W/2, 2, 2, C): timm's SwinV2 channel order, so weights are portable.
        x = x.reshape(B, x.shape[1] // 2, 2, x.shape[2] // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.norm(self.reduction(x))


class ChannelProjection(nn.Module):
    """Width change without spatial merging: (B, H, W, C) -> (B, H, W, out_dim)."""

    def __init__(self, dim: int, out_dim: int | None = None, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.out_dim = out_dim or 2 * dim
        self.proj = nn.Linear(dim, self.out_dim, bias=False)
        self.norm = norm_layer(self.out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, out_dim)."""
        return self.norm(self.proj(x))


class AdaptiveTransition(nn.Module):
    """One stage transition: merge 2x2 when the tokens are finer than the grid, else project.

    Args:
        dim: input width; the output width is ``2 * dim``.

    """

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.merge = PatchMerging(dim, out_dim)
        self.project = ChannelProjection(dim, out_dim)

    def forward(self, x: Tensor, merge: bool) -> Tensor:
        """``merge`` comes from :func:`merge_schedule` (a Python bool: the choice is static per input GSD)."""
        return self.merge(x) if merge else self.project(x)


def merge_schedule(gsd: float, patch_size: int, grid_gsd: float, transitions: int = 3) -> tuple[bool, ...]:
    """Which of the ``transitions`` stage transitions merge 2x2 for an input of ground sampling distance ``gsd``.

    [ours] Rule: tokens start with footprint ``gsd * patch_size``; at each transition they are merged while
    their footprint is smaller than ``grid_gsd``. The input is valid only if the footprint reaches the grid
    exactly, i.e. ``grid_gsd / (gsd * patch_size) = 2**n`` with ``n <= transitions``. With the defaults
    (grid 10 m, HR patch 4): HR at 2.5 / 1.25 / 0.625 / 0.3125 m merges 0 / 1 / 2 / 3 times; at <= 2 merges
    stage-3 and stage-4 tokens sit on the grid, at 3 merges (0.3125 m) stage-4 tokens do. S2/S1 at 10 m with
    patch 1 never merge. Use :func:`supported_gsd` to snap other GSDs before tokenising.

    Raises:
        ValueError: the GSD cannot reach the grid by 2x2 merges; the message names the nearest valid GSDs.

    """
    ratio = grid_gsd / (gsd * patch_size)
    n = round(math.log2(ratio)) if ratio > 0 else -1
    if n < 0 or n > transitions or abs(ratio - 2**n) > 1e-3 * ratio:
        valid = ", ".join(f"{grid_gsd / (patch_size * 2**k):g} m" for k in range(transitions + 1))
        raise ValueError(
            f"input GSD {gsd:g} m with patch size {patch_size} cannot be merged onto the {grid_gsd:g} m grid; "
            f"resample to one of: {valid} (see pipeline.model.layers.patch_merging.supported_gsd)"
        )
    return tuple(k < n for k in range(transitions))


def supported_gsd(gsd: float, patch_size: int, grid_gsd: float, transitions: int = 3) -> float:
    """The supported GSD nearest to ``gsd`` in log space (what a cube snaps HR imagery to)."""
    n = round(math.log2(grid_gsd / (gsd * patch_size)))
    n = min(max(n, 0), transitions)
    return grid_gsd / (patch_size * 2**n)


def to_nhwc(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H, W, C)."""
    return x.permute(0, 2, 3, 1)


def to_nchw(x: Tensor) -> Tensor:
    """(B, H, W, C) -> (B, C, H, W), contiguous."""
    return x.permute(0, 3, 1, 2).contiguous()


__all__ = [
    "AdaptiveTransition",
    "ChannelProjection",
    "PatchMerging",
    "merge_schedule",
    "supported_gsd",
    "to_nchw",
    "to_nhwc",
]
