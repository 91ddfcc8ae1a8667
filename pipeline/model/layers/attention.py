"""Sequence attention layers (global, local) and the pre-norm transformer block of stages 3-4 and the fusion module.

Every attention layer here is called as ``attn(x, key_mask, grid)`` on a (B, N, C) sequence, so :class:`Block`
takes any of them through ``attn_layer`` (timm style): global attention is the default; local neighbourhood
attention (tiled inference without seams) is ``attn_layer=partial(LocalAttention, radius=8)``. The two have the
same parameters (``qkv``, ``proj``), so one checkpoint serves both.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from .local_attention import LocalGrid, TokenGrid, local_attention
from .mlp import DropPath, Mlp


class Attention(nn.Module):
    """Global self-attention through ``scaled_dot_product_attention`` with an optional key mask.

    Args:
        dim: token width.
        num_heads: attention heads (``dim`` must be a multiple).
        qkv_bias: bias of the joint q/k/v projection.
        attn_drop: dropout on the attention weights (training only).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop

    def forward(self, x: Tensor, key_mask: Tensor | None = None, grid: TokenGrid | None = None) -> Tensor:
        """x: (B, N, C) -> (B, N, C); key_mask: (B, N) bool, True = may be attended to; grid: layout of ``x``."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = self.attend(q, k, v, key_mask, grid)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, grid: TokenGrid | None) -> Tensor:
        """(B, heads, N, d) each -> (B, heads, N, d): every query sees every (unmasked) key; ``grid`` is unused."""
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, N)
        dropout_p = self.attn_drop if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class LocalAttention(Attention):
    """Neighbourhood attention over a ``[prompts] + [H x W tokens]`` sequence (:mod:`.local_attention`).

    Args:
        dim: token width.
        num_heads: attention heads.
        radius: a token attends to the prompts and the tokens within ``radius`` grid cells (Chebyshev) of it.
        qkv_bias: bias of the joint q/k/v projection.
        attn_drop: kept for a signature like :class:`Attention`'s; local attention applies no dropout.
        block: query block size of the blocked computation (speed only, not the result).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        radius: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        block: int = 16,
    ) -> None:
        if radius < 1:
            raise ValueError(f"context radius must be >= 1 token, got {radius}")
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop)
        self.radius = radius
        self.block = block

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, grid: TokenGrid | None) -> Tensor:
        """(B, heads, P + H*W, d) each -> the same shape; ``grid`` gives P, H and W."""
        if key_mask is not None:
            raise ValueError("local attention takes no key mask")
        if grid is None:
            raise ValueError("local attention needs the token grid layout (H, W, prompts) of its sequence")
        return local_attention(q, k, v, LocalGrid(grid.height, grid.width, grid.prompts, self.radius, self.block))

    def extra_repr(self) -> str:
        """Shown by ``print(module)``."""
        return f"radius={self.radius}"


def context_attention(radius: int | None) -> Callable[[int, int], Attention]:
    """The attention class of a context: global for ``None``, else local with ``radius`` grid cells."""
    if radius is None:
        return Attention
    if radius < 1:
        raise ValueError(f"context radius must be >= 1 token, got {radius}")
    return partial(LocalAttention, radius=radius)


class Block(nn.Module):
    """Pre-norm transformer block with injected attention and feed-forward layers.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: hidden width of the feed-forward relative to ``dim``.
        drop_path: stochastic depth rate of both residual branches.
        ffn_layer: feed-forward class, called as ``ffn_layer(dim, hidden)`` (``Mlp`` or ``MoEFeedForward``).
        norm_layer: normalisation class, called as ``norm_layer(dim)``.
        attn_layer: attention class, called as ``attn_layer(dim, num_heads)`` and then as
            ``attn(x, key_mask, grid)``: :class:`Attention` (global) or e.g. ``partial(LocalAttention, radius=8)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        ffn_layer: Callable[[int, int], nn.Module] = Mlp,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        attn_layer: Callable[[int, int], nn.Module] = Attention,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, key_mask: Tensor | None = None, grid: TokenGrid | None = None) -> Tensor:
        """x: (B, N, C) -> (B, N, C); ``key_mask`` (B, N) and ``grid`` go to the attention layer."""
        x = x + self.drop_path(self.attn(self.norm1(x), key_mask, grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))
