"""GCPL: geo-context prototype learning (SkySense V1), with Sinkhorn-Knopp assignment.

The globe is split into ``num_regions`` geographic regions, each with ``num_prototypes`` prototypes (paper:
4096 x 100) that summarise the recurring semantics of that region. Per step, teacher cell embeddings of a
sample of region ``r`` are assigned to the prototypes of ``r`` by Sinkhorn-Knopp (equipartitioned over the
cells of that region in the batch); the student predicts that assignment for the same ground cell seen in
another view (SwAV-style swapped prediction, cross-entropy). [ours] The prototypes are a buffer of this loss,
updated by EMA of the teacher embeddings hard-assigned to them, not by gradients: the teacher-student pair
already has an EMA target and the prototypes must not drift with the student's noise. The region of a sample
is an integer the data loader supplies: its equal-area lat/lon cell, or the last id for an unknown location
(:mod:`pipeline.ssl.regions`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .regions import DEFAULT_NUM_REGIONS


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Balanced soft assignment of N items to K prototypes (SwAV).

    Args:
        scores: (N, K) similarities.
        epsilon: entropic regularisation (smaller = sharper).
        iterations: alternating normalisations.

    Returns:
        (N, K) assignment: every row sums to 1 and, once converged, every column to N / K.

    """
    # Log domain: sharp epsilons underflow exp() in the classic form and give 0/0.
    log_q = scores.float().T / epsilon  # (K, N)
    K, N = log_q.shape
    for _ in range(iterations):
        log_q = log_q - log_q.logsumexp(dim=1, keepdim=True) - math.log(K)  # each prototype gets mass 1/K
        log_q = log_q - log_q.logsumexp(dim=0, keepdim=True) - math.log(N)  # each item gets mass 1/N
    return (log_q.exp() * N).T


class GCPLLoss(nn.Module):
    """Region-specific prototypes (a buffer) and the swapped-prediction loss against them.

    Args:
        dim: embedding width.
        num_regions: geographic regions (``region`` ids lie in [0, num_regions), see :mod:`pipeline.ssl.regions`).
        num_prototypes: prototypes per region.
        temperature: softmax temperature of the student's prediction.
        epsilon, iterations: Sinkhorn-Knopp settings.
        momentum: EMA momentum of the prototype update.

    """

    def __init__(
        self, dim: int, num_regions: int = DEFAULT_NUM_REGIONS, num_prototypes: int = 8, temperature: float = 0.1,
        epsilon: float = 0.05, iterations: int = 3, momentum: float = 0.99,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_regions, self.num_prototypes = num_regions, num_prototypes
        self.temperature, self.epsilon, self.iterations, self.momentum = temperature, epsilon, iterations, momentum
        self.register_buffer("prototypes", F.normalize(torch.randn(num_regions, num_prototypes, dim), dim=-1))

    @torch.no_grad()
    def assign(self, teacher: Tensor, region: Tensor) -> Tensor:
        """Sinkhorn assignment (N, K) of normalised teacher embeddings, balanced within each region."""
        q = teacher.new_empty(teacher.shape[0], self.num_prototypes, dtype=torch.float)
        for r in region.unique():  # host sync; a batch holds few regions
            sel = region == r
            q[sel] = sinkhorn_knopp(teacher[sel] @ self.prototypes[r].T, self.epsilon, self.iterations)
        return q

    @torch.no_grad()
    def update_prototypes(self, teacher: Tensor, region: Tensor, assignment: Tensor) -> None:
        """EMA of every prototype towards the mean teacher embedding hard-assigned to it (summed over ranks)."""
        R, K, D = self.prototypes.shape
        flat = region * K + assignment.argmax(1)  # (N,)
        sums = torch.zeros(R * K, D, device=teacher.device).index_add_(0, flat, teacher.float())
        counts = torch.zeros(R * K, device=teacher.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        protos = self.prototypes.view(R * K, D)
        hit = counts > 0
        mean = sums[hit] / counts[hit, None]
        protos[hit] = F.normalize(self.momentum * protos[hit] + (1 - self.momentum) * mean, dim=-1)

    def forward(self, student: Tensor, teacher: Tensor, region: Tensor) -> Tensor:
        """Cross-entropy of the student's prototype prediction against the teacher's Sinkhorn assignment.

        Args:
            student: (N, D) student embeddings of N ground cells.
            teacher: (N, D) teacher embeddings of the same cells.
            region: (N,) long region id of each cell.

        Returns:
            Scalar loss (computed in fp32 under autocast); in training mode the prototypes are updated afterwards.

        """
        n = student.shape[0]
        if n and (int(region.max()) >= self.num_regions or int(region.min()) < 0):
            raise ValueError(f"region ids must lie in [0, {self.num_regions}), got {region.min()}..{region.max()}")
        with torch.autocast(student.device.type, enabled=False):
            s = F.normalize(student.float(), dim=-1)
            t = F.normalize(teacher.detach().float(), dim=-1)
            q = self.assign(t, region)  # (N, K)
            logits = torch.empty_like(q)
            for r in region.unique():
                sel = region == r
                logits[sel] = s[sel] @ self.prototypes[r].clone().T / self.temperature  # (n_r, K); clone: EMA'd below
            loss = -(q * logits.log_softmax(-1)).sum(-1).mean() if n else student.sum() * 0.0
        if self.training:  # even with no cells: every rank must join the all-reduce
            self.update_prototypes(t, region, q)
        return loss
