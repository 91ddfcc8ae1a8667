"""Neighbourhood attention for the global stages (3-4) when a region is inferred tile by tile.

[ours] Stages 3-4 of SkySense V2 attend globally over a tile's tokens (plus the modality prompts). Tiled region
inference then gives every token a summary of *its tile*, so two tiles that overlap disagree everywhere and the
mosaic shows the tile grid, whatever the blending. In local-context mode each token attends only to the tokens
within ``radius`` cells (Chebyshev distance) of it, plus the prompt tokens; the prompts attend only to each other,
so they carry no tile content either. Every output token is then a function of its neighbourhood alone: a token
farther than the model's receptive field from a tile edge gets the same value in every tile that holds it, and
the stitched mosaic equals a single untiled run (``tests/test_seams.py``). Pre-training crops are 8-12 grid
cells wide, so a radius of 8 (17 x 17 neighbourhood) keeps each token's context as large as in training.

The computation is blocked (HaloNet-style): queries in ``block`` x ``block`` squares attend to the
``(block + 2 radius)``-wide square around them through one SDPA call with a boolean mask, which costs
``(block + 2 radius)^2`` keys per query instead of ``H * W``: cheaper than global attention on tiles larger than
about 40 x 40 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class TokenGrid:
    """Layout of a stage-3/4 token sequence ``[P prompts] + [H x W tokens, row-major]``.

    The backbone hands it to every block of a prompted stage; global attention ignores it, local attention needs it.
    """

    height: int
    width: int
    prompts: int


@dataclass(frozen=True)
class LocalGrid(TokenGrid):
    """A :class:`TokenGrid` plus the neighbourhood ``radius`` (grid cells) and the query ``block`` size."""

    radius: int
    block: int = 16


@lru_cache(maxsize=16)
def _block_mask(height: int, width: int, radius: int, block: int, prompts: int, device: torch.device) -> Tensor:
    """(nb, 1, block^2, prompts + (block + 2 radius)^2) bool: which keys each query of each block may see."""
    nby, nbx = -(-height // block), -(-width // block)
    win = block + 2 * radius
    q = torch.arange(block, device=device)
    k = torch.arange(win, device=device) - radius  # key offset relative to the block origin
    near = (k[None, :] - q[:, None]).abs() <= radius  # (block, win) along one axis
    by = torch.arange(nby, device=device)[:, None] * block + k[None, :]  # (nby, win) absolute key rows
    bx = torch.arange(nbx, device=device)[:, None] * block + k[None, :]
    inside_y = (by >= 0) & (by < height)  # (nby, win)
    inside_x = (bx >= 0) & (bx < width)
    # (nby, nbx, qy, qx, ky, kx)
    allowed = (
        near[None, None, :, None, :, None]
        & near[None, None, None, :, None, :]
        & inside_y[:, None, None, None, :, None]
        & inside_x[None, :, None, None, None, :]
    )
    allowed = allowed.reshape(nby * nbx, 1, block * block, win * win)
    if prompts:
        allowed = torch.cat([allowed.new_ones(nby * nbx, 1, block * block, prompts), allowed], dim=-1)
    return allowed


def _blocks(x: Tensor, block: int, pad: int, size: int) -> Tensor:
    """(B, h, Hp + 2 pad, Wp + 2 pad, d) -> (B * nby * nbx, h, size^2, d): squares of ``size`` every ``block``."""
    B, h, _, _, d = x.shape
    w = x.unfold(2, size, block).unfold(3, size, block)  # (B, h, nby, nbx, d, size, size)
    nby, nbx = w.shape[2], w.shape[3]
    return w.permute(0, 2, 3, 1, 5, 6, 4).reshape(B * nby * nbx, h, size * size, d)


def local_attention(q: Tensor, k: Tensor, v: Tensor, grid: LocalGrid) -> Tensor:
    """Attention of a ``[prompts] + [grid tokens]`` sequence with neighbourhood-limited token queries.

    Args:
        q, k, v: (B, heads, P + H*W, d) after the qkv projection.
        grid: the sequence layout and the radius.

    Returns:
        (B, heads, P + H*W, d): prompts attend to prompts; a token attends to the prompts and to the tokens within
        ``radius`` cells of it.
    """
    B, nh, N, d = q.shape
    P, H, W, r, b = grid.prompts, grid.height, grid.width, grid.radius, grid.block
    if N != P + H * W:
        raise ValueError(f"sequence of {N} tokens does not match {P} prompts + {H}x{W} grid")
    out_p = F.scaled_dot_product_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P]) if P else q[:, :, :0]
    Hp, Wp = -(-H // b) * b, -(-W // b) * b

    def grid_of(t: Tensor, pad: int) -> Tensor:  # (B, h, P + HW, d) -> zero-padded (B, h, Hp + 2 pad, Wp + 2 pad, d)
        g = t[:, :, P:].reshape(B, nh, H, W, d)
        return F.pad(g, (0, 0, pad, Wp - W + pad, pad, Hp - H + pad))

    qb = _blocks(grid_of(q, 0), b, 0, b)  # (B*nb, h, b*b, d)
    kb = _blocks(grid_of(k, r), b, r, b + 2 * r)  # (B*nb, h, win*win, d)
    vb = _blocks(grid_of(v, r), b, r, b + 2 * r)
    nb = qb.shape[0] // B
    if P:
        kb = torch.cat([k[:, :, :P].repeat_interleave(nb, dim=0), kb], dim=2)
        vb = torch.cat([v[:, :, :P].repeat_interleave(nb, dim=0), vb], dim=2)
    # torch.compile traces the mask into the graph (shapes are static there); eager mode reuses it from the cache
    block_mask = _block_mask.__wrapped__ if torch.compiler.is_compiling() else _block_mask
    mask = block_mask(H, W, r, b, P, q.device).repeat(B, 1, 1, 1)  # (B*nb, 1, b*b, keys)
    if not P:  # padded queries of edge blocks see no key: give them their (zero) self so softmax stays finite
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)  # (B*nb, h, b*b, d)
    nby, nbx = Hp // b, Wp // b
    og = ob.reshape(B, nby, nbx, nh, b, b, d).permute(0, 3, 1, 4, 2, 5, 6).reshape(B, nh, Hp, Wp, d)
    out_t = og[:, :, :H, :W].reshape(B, nh, H * W, d)
    return torch.cat([out_p, out_t], dim=2)


def reference_local_attention(q: Tensor, k: Tensor, v: Tensor, grid: LocalGrid) -> Tensor:
    """The same result by one dense masked SDPA over the whole sequence (tests; O(N^2) memory)."""
    P, H, W, r = grid.prompts, grid.height, grid.width, grid.radius
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    near = ((yy[:, None] - yy[None, :]).abs() <= r) & ((xx[:, None] - xx[None, :]).abs() <= r)
    mask = torch.zeros(P + H * W, P + H * W, dtype=torch.bool)
    mask[:, :P] = True
    mask[P:, P:] = near
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.device))
