"""Global multi-head self-attention and the pre-norm transformer block of stages 3-4 and the fusion module."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from .local_attention import LocalGrid, local_attention
from .mlp import DropPath, Mlp


class Attention(nn.Module):
    """Global self-attention through ``scaled_dot_product_attention`` with an optional key mask."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop

    def forward(self, x: Tensor, key_mask: Tensor | None = None, local: LocalGrid | None = None) -> Tensor:
        """x: (B, N, C); key_mask: (B, N) bool, True = may be attended to; ``local``: neighbourhood attention."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if local is not None:
            if key_mask is not None:
                raise ValueError("local attention takes no key mask")
            x = local_attention(q, k, v, local)
        else:
            mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, N)
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0
            )  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block; the feed-forward layer is injected (dense ``Mlp`` or ``MoEFeedForward``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        ffn_layer: Callable[[int, int], nn.Module] = Mlp,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, key_mask: Tensor | None = None, local: LocalGrid | None = None) -> Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x), key_mask, local))
        return x + self.drop_path(self.mlp(self.norm2(x)))
