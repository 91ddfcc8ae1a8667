"""Swin-Transformer-V2 (shifted) window attention, computed through ``scaled_dot_product_attention``.

SwinV2 attention (Liu et al. 2022; timm ``swin_transformer_v2.WindowAttention``, same parameter names so timm
weights load unchanged): scaled cosine attention ``cos(q, k) * exp(min(logit_scale, log 100))`` plus a
log-spaced continuous position bias ``16 * sigmoid(cpb_mlp(log-spaced relative coords))``. Here the logit
scale is folded into the normalised queries and the position bias (+ shift/padding mask) goes to SDPA as a
float ``attn_mask`` with ``scale=1.0``, so the fused CPU/GPU kernels do the softmax without materialising
``(B*nW, heads, N, N)`` logits (one exception, fp32 CPU training: see ``EXPLICIT_CPU_BACKWARD``).

Any token-map size works [ours, differs from timm]:
    * The map is zero-padded to window multiples *before* the cyclic shift (as the original Swin
      detection/segmentation code) and padded tokens are masked out as keys, so they never receive attention
      weight: real tokens get the same result as on an unpadded map whose windows hold only them.
    * Along a dimension no larger than the window, the window shrinks to the map size and that dimension is
      not shifted (timm does the same per dimension). Unlike timm, the position bias of the shrunk window is
      read from the full window's table at the same integer offsets (no re-normalised coordinates), so a
      small map gives exactly the result a padded + masked full window would give.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mlp import DropPath, Mlp

LOGIT_SCALE_MAX = math.log(100.0)
# Finite, not -inf: a fully masked row (a padded query whose region holds only padding) stays finite instead of
# producing NaN (its output is cropped away). Cosine logits are bounded by 100 + 16, so exp(-1e4 + ...) is an
# exact 0 in fp32/bf16 and masked keys get no weight whenever a row has one unmasked key. timm uses -100.
MASK_VALUE = -1.0e4
# CPU fp32 training: SDPA's fused CPU kernel has no gradient for ``attn_mask`` (the learnable position bias),
# so torch falls back to its math path, which adds a safe-softmax pass and scale multiplies; the explicit
# matmul/softmax in ``biased_attention`` is ~20% faster there. Everything else (CPU inference, reduced
# precision, CUDA) goes through SDPA.
EXPLICIT_CPU_BACKWARD = True
_MASK_CACHE: dict[tuple, Tensor] = {}
_MASK_CACHE_SIZE = 32


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def window_partition(x: Tensor, window: int | tuple[int, int]) -> Tensor:
    """Split a token map into non-overlapping windows.

    Args:
        x: (B, H, W, C) with H, W multiples of the window.
        window: window size ``wh`` (square) or ``(wh, ww)``.

    Returns:
        (B * nW, wh * ww, C), windows in row-major order within each image.
    """
    wh, ww = _pair(window)
    B, H, W, C = x.shape
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)  # (B, H/wh, W/ww, wh, ww, C)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows: Tensor, window: int | tuple[int, int], H: int, W: int) -> Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows: (B * nW, wh * ww, C).
        window: window size ``wh`` or ``(wh, ww)``.
        H: height of the (padded) token map.
        W: width of the (padded) token map.

    Returns:
        (B, H, W, C).
    """
    wh, ww = _pair(window)
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)  # (B, H/wh, wh, W/ww, ww, C)
    return x.reshape(-1, H, W, C)


def log_spaced_relative_coords(window: tuple[int, int]) -> Tensor:
    """SwinV2 log-spaced relative coordinates: (2*wh-1) * (2*ww-1) rows of (dy, dx), in [-1, 1]."""
    axes = [torch.arange(-(w - 1), w, dtype=torch.float32) / max(w - 1, 1) for w in window]
    table = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2) * 8  # (T, 2) in [-8, 8]
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_position_index(window: tuple[int, int], table_window: tuple[int, int]) -> Tensor:
    """(N, N) index into the relative-offset table of ``table_window`` for tokens of ``window`` (<= it)."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + table_window[0] - 1) * (2 * table_window[1] - 1) + rel[1] + table_window[1] - 1


def window_attention_mask(
    H: int, W: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device | None = None
) -> Tensor | None:
    """Additive mask of shifted-window attention over a padded map, or None when nothing needs masking.

    Pad (to window multiples) happens before the roll, so the standard Swin regions are laid out on the padded
    map; a key is allowed iff it is a real (non-padding) token of the query's region.

    Args:
        H: unpadded height.
        W: unpadded width.
        window: ``(wh, ww)``.
        shift: ``(sh, sw)`` cyclic shift (0 = none).
        device: where to build the mask.

    Returns:
        (nW, wh*ww, wh*ww) float32 with 0 (allowed) or ``MASK_VALUE``; None without shift and padding.
    """
    (wh, ww), (sh, sw) = window, shift
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    if not (sh or sw) and (Hp, Wp) == (H, W):
        return None
    rows, cols = torch.arange(Hp, device=device), torch.arange(Wp, device=device)

    def region(idx: Tensor, size: int, w: int, s: int) -> Tensor:  # Swin's 3 slices (0,-w), (-w,-s), (-s,None)
        return (idx >= size - w).long() + (idx >= size - s).long() if s else torch.zeros_like(idx)

    ids = region(rows, Hp, wh, sh)[:, None] * 3 + region(cols, Wp, ww, sw)[None, :]  # (Hp, Wp) in rolled frame
    valid = ((rows + sh) % Hp < H)[:, None] & ((cols + sw) % Wp < W)[None, :]  # rolled position holds a real token
    ids = torch.where(valid, ids, -1)
    ids = window_partition(ids[None, :, :, None], window).squeeze(-1)  # (nW, N)
    allowed = (ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0)  # (nW, N, N)
    return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, MASK_VALUE)


def _cached_mask(
    H: int, W: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> Tensor | None:
    if torch.compiler.is_compiling():  # built in-graph: static shapes, no Python state to guard on
        return window_attention_mask(H, W, window, shift, device)
    key = (H, W, window, shift, device)
    if key not in _MASK_CACHE:
        if len(_MASK_CACHE) >= _MASK_CACHE_SIZE:
            _MASK_CACHE.clear()
        _MASK_CACHE[key] = window_attention_mask(H, W, window, shift, device)
    return _MASK_CACHE[key]


def biased_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, dropout_p: float = 0.0) -> Tensor:
    """``softmax(q kᵀ + attn_mask) v`` with the scale already folded into q.

    Args:
        q: (B, heads, N, d); k and v alike.
        attn_mask: additive float mask broadcastable to (B, heads, N, N), q's dtype.
        dropout_p: attention dropout probability (0 in eval).

    Returns:
        (B, heads, N, d).
    """
    if (
        EXPLICIT_CPU_BACKWARD
        and q.device.type == "cpu"
        and q.dtype == torch.float32  # bf16 logits (scale up to 100) would lose precision; SDPA upcasts
        and attn_mask.requires_grad
        and torch.is_grad_enabled()
    ):
        weights = torch.matmul(q, k.transpose(-2, -1)).add_(attn_mask).softmax(dim=-1)  # (B, heads, N, N)
        return (F.dropout(weights, dropout_p) if dropout_p > 0 else weights) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=1.0)


class WindowAttention(nn.Module):
    """SwinV2 window multi-head self-attention (cosine attention + continuous position bias) via SDPA.

    Args:
        dim: token width.
        num_heads: attention heads.
        window_size: full window ``wh`` or ``(wh, ww)``; the position-bias table covers its offsets.
        qkv_bias: learnable q and v biases (k has none, as SwinV2).
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout after the output projection.
        cpb_hidden: hidden width of the continuous position bias MLP.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | tuple[int, int],
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        cpb_hidden: int = 512,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by {num_heads} heads")
        self.dim, self.num_heads = dim, num_heads
        self.window_size = _pair(window_size)
        self.attn_drop = attn_drop
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))  # (heads, 1, 1), as timm
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, cpb_hidden), nn.ReLU(inplace=True), nn.Linear(cpb_hidden, num_heads, bias=False)
        )
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.register_buffer("k_bias", torch.zeros(dim) if qkv_bias else None, persistent=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer("relative_coords_table", log_spaced_relative_coords(self.window_size), persistent=False)
        self.register_buffer(
            "relative_position_index", relative_position_index(self.window_size, self.window_size), persistent=False
        )

    def position_bias(self, window: tuple[int, int] | None = None) -> Tensor:
        """Continuous position bias ``16 * sigmoid(cpb_mlp(coords))`` of a window (default: the full one).

        Returns:
            (heads, N, N) with N = wh * ww.
        """
        window = self.window_size if window is None else window
        if window[0] > self.window_size[0] or window[1] > self.window_size[1]:
            raise ValueError(f"window {window} larger than the attention's window {self.window_size}")
        table = 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table))  # (T, heads); sigmoid before gather
        if window == self.window_size:
            index = self.relative_position_index
        else:  # a shrunk window uses the subset of offsets it contains
            index = relative_position_index(window, self.window_size).to(table.device)
        N = window[0] * window[1]
        return table[index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()  # (heads, N, N)

    def _qkv(self, x: Tensor) -> Tensor:
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return F.linear(x, self.qkv.weight, bias)  # (B_, N, 3C)

    def forward(self, x: Tensor, mask: Tensor | None = None, window_size: tuple[int, int] | None = None) -> Tensor:
        """Attention inside each window.

        Args:
            x: (B*nW, N, C) tokens of the windows, N = wh * ww.
            mask: optional additive float mask (nW, N, N) shared by all images (windows are image-major).
            window_size: ``(wh, ww)`` of these windows if smaller than the module's (small token maps).

        Returns:
            (B*nW, N, C).
        """
        B_, N, C = x.shape
        h = self.num_heads
        window = self.window_size if window_size is None else _pair(window_size)
        # Contiguous (3, B_, heads, N, d) first: normalising strided views is ~3x slower on CPU.
        qkv = self._qkv(x).view(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4).contiguous()
        # Cosine attention: q and k L2-normalised, the logit scale folded into q. One multiply by a per-row
        # factor (2, B_, heads, N, 1) instead of F.normalize + scale: fewer passes, cheaper backward.
        qk = qkv[:2]  # (2, B_, heads, N, d)
        inv_norm = torch.linalg.vector_norm(qk, dim=-1, keepdim=True).clamp_min(1e-12).reciprocal()
        scale = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()  # (heads, 1, 1)
        qk = qk * (inv_norm * torch.stack((scale, torch.ones_like(scale))).unsqueeze(1))  # (2, B_, heads, N, d)
        q, k, v = qk[0].to(qkv.dtype), qk[1].to(qkv.dtype), qkv[2]
        bias = self.position_bias(window)  # (heads, N, N)
        dropout_p = self.attn_drop if self.training else 0.0
        if mask is None:
            out = biased_attention(q, k, v, bias.unsqueeze(0).to(v.dtype), dropout_p)  # (B_, heads, N, d)
        else:
            # Windows become extra heads, (B, nW*heads, N, d), so the per-window mask broadcasts over images
            # as a plain 4-D mask (fused kernels take it; a 5-D call falls back to the math path).
            nW = mask.shape[0]
            attn_mask = (bias.unsqueeze(0) + mask.unsqueeze(1)).to(v.dtype).reshape(1, nW * h, N, N)
            q, k, v = (t.view(B_ // nW, nW * h, N, C // h) for t in (q, k, v))
            out = biased_attention(q, k, v, attn_mask, dropout_p).view(B_, h, N, C // h)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B_, N, C)))


def reference_window_attention(
    attn: WindowAttention,
    x: Tensor,
    mask: Tensor | None = None,
    window_size: tuple[int, int] | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The explicit softmax(cos(q, k) * scale + bias + mask) @ v of timm's SwinV2, for tests and benchmarks only.

    Args:
        attn: the module whose weights are used.
        x: (B*nW, N, C).
        mask: optional (nW, N, N) additive mask.
        window_size: as in :meth:`WindowAttention.forward`.
        return_weights: also return the attention weights (B*nW, heads, N, N).

    Returns:
        (B*nW, N, C), and the weights if asked.
    """
    B_, N, C = x.shape
    h = attn.num_heads
    q, k, v = attn._qkv(x).reshape(B_, N, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B_, heads, N, d) each
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)  # (B_, heads, N, N)
    logits = logits * torch.clamp(attn.logit_scale, max=LOGIT_SCALE_MAX).exp()
    logits = logits + attn.position_bias(None if window_size is None else _pair(window_size)).unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        logits = (logits.view(-1, nW, h, N, N) + mask.unsqueeze(1)).view(-1, h, N, N)
    weights = logits.softmax(dim=-1)
    out = attn.proj((weights @ v).transpose(1, 2).reshape(B_, N, C))
    return (out, weights) if return_weights else out


class SwinV2Block(nn.Module):
    """SwinV2 block with res-post-norm: ``x + drop_path(norm1(attn(x)))``, ``x + drop_path(norm2(mlp(x)))``.

    Args:
        dim: token width.
        num_heads: attention heads.
        window_size: window ``wh`` or ``(wh, ww)``.
        shift_size: cyclic shift (0 or typically ``window // 2`` on every other block).
        mlp_ratio: hidden width of the feed-forward relative to ``dim``.
        drop_path: stochastic depth rate of both residual branches.
        norm_layer: normalisation class, called as ``norm_layer(dim)``.
        mlp_layer: feed-forward class, called as ``mlp_layer(dim, hidden)`` (``Mlp`` or ``MoEFeedForward``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | tuple[int, int] = 8,
        shift_size: int | tuple[int, int] = 0,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        mlp_layer: Callable[[int, int], nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.window_size, self.shift_size = _pair(window_size), _pair(shift_size)
        if not all(0 <= s < w for s, w in zip(self.shift_size, self.window_size)):
            raise ValueError(f"shift {self.shift_size} must lie in [0, window {self.window_size})")
        self.attn = WindowAttention(dim, num_heads, self.window_size)
        self.norm1 = norm_layer(dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio))
        self.norm2 = norm_layer(dim)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def window_and_shift(self, H: int, W: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Effective window and shift for an H x W map.

        A dimension no larger than the window is one unshifted window of the map's size (module docstring).
        """
        sizes = (H, W)
        window = tuple(min(s, w) for s, w in zip(sizes, self.window_size))
        shift = tuple(0 if s <= w else sh for s, w, sh in zip(sizes, self.window_size, self.shift_size))
        return window, shift  # type: ignore[return-value]

    def attn_mask(self, H: int, W: int, device: torch.device) -> Tensor | None:
        """Cached (nW, N, N) shift/padding mask for an H x W map (None when not needed)."""
        window, shift = self.window_and_shift(H, W)
        return _cached_mask(H, W, window, shift, device)

    def _attn(self, x: Tensor) -> Tensor:
        H, W = x.shape[1:3]
        window, shift = self.window_and_shift(H, W)
        Hp, Wp = -(-H // window[0]) * window[0], -(-W // window[1]) * window[1]
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))  # (B, Hp, Wp, C); padded keys masked in attention
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = self.attn(window_partition(x, window), self.attn_mask(H, W, x.device), window)  # (B*nW, N, C)
        x = window_reverse(windows, window, Hp, Wp)  # (B, Hp, Wp, C)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :H, :W] if (Hp, Wp) != (H, W) else x

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C), any H and W."""
        x = x + self.drop_path1(self.norm1(self._attn(x)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


__all__ = [
    "SwinV2Block",
    "WindowAttention",
    "log_spaced_relative_coords",
    "reference_window_attention",
    "relative_position_index",
    "window_attention_mask",
    "window_partition",
    "window_reverse",
]
