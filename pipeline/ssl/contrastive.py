"""InfoNCE, the contrastive criterion shared by QSACL and MGCL.

[ours] We use InfoNCE (student queries vs teacher keys, positives on the diagonal, the other rows of the batch as
negatives) rather than DINO's centred/sharpened cross-entropy: explicit negatives prevent collapse without a
centre buffer or temperature schedules, the teacher EMA still stabilises the targets, and the value has closed
forms (``log N`` when collapsed, ``log(1 + (N - 1) e^{-1/t})`` for orthogonal identical views) that tests check.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _gather_keys(k: Tensor) -> tuple[Tensor, int]:
    """All ranks' keys (no gradient: keys come from the teacher) and this rank's offset into them."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return k, 0
    parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, k.detach().contiguous())
    return torch.cat(parts), dist.get_rank() * k.shape[0]


def info_nce(q: Tensor, k: Tensor, temperature: float = 0.2, distributed: bool = False) -> Tensor:
    """Mean InfoNCE of queries ``q`` against keys ``k``: row ``i`` of ``q`` is positive with row ``i`` of ``k``.

    Args:
        q: (..., N, D) student vectors (any leading batch dims, e.g. one per query token).
        k: (..., N, D) teacher vectors; every other row is a negative of row ``i``.
        temperature: softmax temperature of the cosine similarities.
        distributed: gather the keys of all ranks as extra negatives (needs the same N on every rank).

    Returns:
        Scalar: ``mean_i -log(exp(s_ii / t) / sum_j exp(s_ij / t))`` with ``s`` the cosine similarity.

    """
    if q.shape != k.shape:
        raise ValueError(f"queries {tuple(q.shape)} and keys {tuple(k.shape)} must have the same shape")
    n = q.shape[-2]
    if n == 0:
        return q.sum() * 0.0
    with torch.autocast(q.device.type, enabled=False):  # logits at t ~ 0.1 need fp32, not bf16
        q = F.normalize(q.float(), dim=-1)
        k = F.normalize(k.float(), dim=-1)
        offset = 0
        if distributed:
            k_all, offset = _gather_keys(k.transpose(0, -2))  # gather along N (moved first)
            k = k_all.transpose(0, -2)
        logits = q @ k.transpose(-2, -1) / temperature  # (..., N, N_keys)
        labels = (torch.arange(n, device=q.device) + offset).repeat(logits.numel() // logits.shape[-1] // n)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels)
