"""Mixture-of-experts feed-forward (SkySense V2's last 6 blocks: 8 experts, top-1, linear + softmax gate).

Routing is Switch-Transformer style: the expert output is scaled by its gate probability (top-k > 1
renormalises the chosen probabilities) and no token is ever dropped. Experts are stored stacked and run as
one grouped matmul over tokens sorted by expert (torchtitan ``moe.py`` pattern), never a Python loop:

    * ``torch.nn.functional.grouped_mm`` (or ``torch._grouped_mm``) with per-expert offsets where it is
      supported: CUDA bf16 on sm90+ (checked at run time) and the CPU kernel of this torch (fp32/bf16);
    * otherwise tokens are padded into an (E, capacity, dim) buffer and multiplied with one ``torch.bmm``.

In eager CPU mode large batches are run in slices of the sorted rows (see ``_sorted_experts``).

[ours] The paper describes no load balancing; we add the Switch auxiliary loss ``E * sum_e f_e * P_e``
(``f_e``: fraction of routed assignments, ``P_e``: mean gate probability) and record per-expert token counts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
CPU_CHUNK_BYTES = 16 << 20  # eager CPU: size of the hidden activations of one slice of rows (see forward)


@functools.cache
def _cuda_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _use_grouped_mm(x: Tensor, w: Tensor) -> bool:
    """Whether the grouped-GEMM kernel handles (T, K) @ (E, K, N) for these tensors on this device."""
    if _GROUPED_MM is None or x.dtype != w.dtype:
        return False
    if x.device.type == "cpu":  # the eager CPU kernel takes fp32 too, but its fake (compile) kernel wants bf16
        return x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and not torch.compiler.is_compiling())
    if x.device.type == "cuda":  # bf16 kernels need 16-byte aligned rows and Hopper or newer
        aligned = x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0
        return x.dtype == torch.bfloat16 and aligned and _cuda_capability(x.device.index) >= (9, 0)
    return False


def _padded_bmm(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """Fallback grouped matmul: scatter the sorted tokens into (E, capacity, K), one bmm, gather back."""
    E, T = w.shape[0], x.shape[0]
    capacity = int(counts.max()) if T else 0  # host sync (a graph break under torch.compile)
    group = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=T)  # (T,)
    pos = torch.arange(T, device=x.device) - (counts.cumsum(0) - counts)[group]  # (T,) slot within its expert
    buf = x.new_zeros(E, capacity, x.shape[1]).index_put((group, pos), x)  # (E, capacity, K)
    return torch.bmm(buf, w)[group, pos]  # (T, N)


def grouped_mm(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """Per-expert matmul of tokens sorted by expert.

    Args:
        x: (T, K) tokens, those of expert 0 first, then expert 1, ...
        w: (E, K, N) stacked expert weights.
        counts: (E,) long, tokens per expert (sums to T).

    Returns:
        (T, N), row t multiplied by the weight of its expert.
    """
    if _use_grouped_mm(x, w):
        return _GROUPED_MM(x, w, offs=counts.cumsum(0).to(torch.int32))
    return _padded_bmm(x, w, counts)


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation ``perm`` of the rows.

    Its gradient is the inverse gather: deterministic, and cheaper on CPU than the accumulating scatter autograd
    uses for advanced indexing.
    """

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class MoEFeedForward(nn.Module):
    """Top-k mixture of ``E`` two-layer feed-forward experts with a linear + softmax gate.

    After each forward (training and eval): ``aux_loss`` (weighted Switch load-balancing loss, differentiable
    w.r.t. the gate), ``tokens_per_expert`` (E,) of this forward and the cumulative ``expert_load`` (E,)
    (reset with :meth:`reset_load`). With top-k > 1 the counts are routed assignments (they sum to k * tokens).

    Args:
        dim: token width (input and output).
        hidden_dim: hidden width of every expert.
        num_experts: number of experts E.
        top_k: experts per token.
        act_layer: activation class, instantiated without arguments.
        aux_loss_weight: factor applied to the auxiliary loss stored in ``aux_loss``.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int = 8,
        top_k: int = 1,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        aux_loss_weight: float = 0.01,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must lie in [1, num_experts={num_experts}]")
        self.dim, self.hidden_dim, self.num_experts, self.top_k = dim, hidden_dim, num_experts, top_k
        self.aux_loss_weight = aux_loss_weight
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))  # (E, dim, hidden)
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # (E, hidden, dim)
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.act = act_layer()
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.aux_loss: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
        for w, b, fan_in in ((self.w1, self.b1, self.dim), (self.w2, self.b2, self.hidden_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def reset_load(self) -> None:
        """Zero the cumulative per-expert token counts."""
        self.expert_load.zero_()

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gate probabilities and top-k choice of (T, dim) tokens.

        Returns:
            probs (T, E) float32, weights (T, k) float32 (renormalised when k > 1), experts (T, k) long.
        """
        return self._top_k(self.gate(x))

    def _top_k(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        probs = logits.float().softmax(dim=-1)  # (T, E); routing in fp32 under autocast
        weights, experts = probs.topk(self.top_k, dim=-1)  # (T, k)
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, experts

    def _record(self, probs: Tensor, counts: Tensor) -> None:
        T = probs.shape[0]
        frac = counts.to(probs.dtype) / max(T * self.top_k, 1)  # f_e
        mean_prob = probs.sum(dim=0) / max(T, 1)  # P_e
        self.aux_loss = self.aux_loss_weight * self.num_experts * (frac * mean_prob).sum()
        with torch.no_grad():
            self.tokens_per_expert.copy_(counts)
            self.expert_load.add_(counts)

    def _experts(self, xs: Tensor, w1: Tensor, w2: Tensor, counts: Tensor) -> Tensor:
        """Expert FFN of rows sorted by expert: (R, dim) -> (R, dim); ``counts`` (E,) sums to R."""
        R, dtype = xs.shape[0], xs.dtype
        # Biases per row by repeat_interleave + in-place add (~10% faster on CPU than an index gather + add);
        # output_size avoids a host sync.
        b1 = self.b1.to(dtype).repeat_interleave(counts, dim=0, output_size=R)  # (R, hidden)
        h = self.act(grouped_mm(xs, w1, counts).add_(b1))  # (R, hidden)
        return grouped_mm(h, w2, counts).add_(self.b2.to(dtype).repeat_interleave(counts, dim=0, output_size=R))

    def _sorted_experts(self, xs: Tensor, counts: Tensor) -> Tensor:
        """(n, dim) rows sorted by expert -> (n, dim), in one grouped call or, in eager CPU, row slices."""
        n = xs.shape[0]
        w1, w2 = self.w1.to(xs.dtype), self.w2.to(xs.dtype)
        chunk = max(256, CPU_CHUNK_BYTES // (self.hidden_dim * xs.element_size()))  # rows per slice
        if xs.device.type != "cpu" or n <= chunk or torch.compiler.is_compiling():
            return self._experts(xs, w1, w2, counts)
        # Eager CPU: the (rows, hidden) activations of a slice stay below glibc's mmap threshold (32 MiB), so
        # they reuse heap memory instead of page-faulting fresh pages every step (measured at 16k tokens x 1536
        # hidden: 120k faults, +8% step time). A loop over row slices (static bounds), not over experts.
        ends = counts.cumsum(0)
        parts = []
        for s, xs_part in zip(range(0, n, chunk), xs.split(chunk)):  # split: one concatenating backward
            e = s + xs_part.shape[0]
            part_counts = (ends.clamp(max=e) - (ends - counts).clamp(min=s)).clamp_(min=0)  # (E,) rows in [s, e)
            parts.append(self._experts(xs_part, w1, w2, part_counts))
        return torch.cat(parts)

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., dim); under autocast the experts run in the autocast dtype."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.dim)  # (T, dim)
        T, k = x.shape[0], self.top_k
        logits = self.gate(x)  # (T, E)
        dtype = logits.dtype  # the autocast dtype if autocast is on, else x's dtype
        probs, weights, experts = self._top_k(logits)
        flat = experts.reshape(-1)  # (T*k,) expert of each assignment
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))  # (E,), static shape (bincount is not)
        self._record(probs, counts)

        order = flat.argsort(stable=True)  # (T*k,) assignments grouped by expert
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(T * k, device=x.device))
        rows = x.to(dtype) if k == 1 else x.to(dtype).repeat_interleave(k, dim=0)  # (T*k, dim), row t*k+j = x[t]
        xs = _PermuteRows.apply(rows, order, inverse)  # (T*k, dim) sorted by expert
        y = self._sorted_experts(xs, counts) * weights.reshape(-1)[order, None].to(dtype)  # (T*k, dim)
        out = _PermuteRows.apply(y, inverse, order).view(T, k, self.dim)  # back to token order
        out = out[:, 0] if k == 1 else out.sum(dim=1)
        return out.reshape(*lead, self.dim)

    def extra_repr(self) -> str:
        """Shown by ``print(module)``."""
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, top_k={self.top_k}"


def moe_loop_reference(moe: MoEFeedForward, x: Tensor) -> Tensor:
    """Per-expert Python loop with the same weights and routing (tests and benchmarks; not the hot path).

    Args:
        moe: the layer whose weights are used; its statistics are not touched.
        x: (..., dim).

    Returns:
        (..., dim).
    """
    lead = x.shape[:-1]
    x = x.reshape(-1, moe.dim)  # (T, dim)
    _, weights, experts = moe.route(x)
    out = torch.zeros_like(x)
    for e in range(moe.num_experts):
        token, slot = torch.where(experts == e)
        if token.numel() == 0:
            continue
        h = moe.act(x[token] @ moe.w1[e] + moe.b1[e])  # (n_e, hidden)
        y = h @ moe.w2[e] + moe.b2[e]  # (n_e, dim)
        out = out.index_add(0, token, y * weights[token, slot, None].to(y.dtype))
    return out.reshape(*lead, moe.dim)


__all__ = ["MoEFeedForward", "grouped_mm", "moe_loop_reference"]
