"""QSACL: query-based semantic aggregation contrastive learning (SkySense V2, new).

``m`` learnable queries cross-attend, in ONE transformer-decoder layer, to the features of a crop and give one
vector per query and crop. Two crops of one scene may show different objects, so instead of contrasting whole
crops the loss contrasts the vector of the *same query* across views, student against teacher::

    L = 1 / (2m) * sum_i [ CL(z_i^g, z_i^l') + CL(z_i^l, z_i^g') ]        (primes: teacher)

[ours] ``CL`` is InfoNCE over the batch (:func:`~pipeline.ssl.contrastive.info_nce`): the positive of student
vector ``z_i`` of sample ``b`` is the teacher vector of the same query ``i`` and sample ``b`` in the other view;
the negatives are the teacher vectors of the same query ``i`` of the other samples. Other queries are never
compared, as in the reference formula. With several global and local crops the bracket is averaged over all
(global, local) pairs; with no local crops, over ordered pairs of distinct global crops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.layers.mlp import Mlp

from .contrastive import info_nce


class QueryDecoder(nn.Module):
    """One transformer-decoder layer of ``num_queries`` learnable queries over a crop's feature map.

    Pre-norm: ``q = q + CrossAttn(LN(q), LN(kv))``, ``q = q + FFN(LN(q))``, output ``LN(q)``. There is no
    query self-attention: the reference describes cross-attention + FFN.

    Args:
        in_dim: channels of the feature map.
        dim: width of the queries.
        num_queries: ``m`` (16 in the paper).
        num_heads: attention heads.
        mlp_ratio: FFN hidden width relative to ``dim``.

    """

    def __init__(self, in_dim: int, dim: int, num_queries: int = 16, num_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"query width {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.queries = nn.Parameter(torch.zeros(num_queries, dim))
        self.kv_proj = nn.Linear(in_dim, dim)
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_out = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.queries, std=0.02)

    def forward(self, feat: Tensor, valid: Tensor | None = None) -> Tensor:
        """(B, C, h, w) features and (B, h, w) validity -> (B, m, dim), one vector per query."""
        B, _, h, w = feat.shape
        D, H = self.queries.shape[1], self.num_heads
        kv = self.norm_kv(self.kv_proj(feat.flatten(2).transpose(1, 2)))  # (B, h*w, D)
        k, v = self.kv(kv).view(B, h * w, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, N, D/H) each
        q0 = self.queries.expand(B, -1, -1)  # (B, m, D)
        q = self.q(self.norm_q(q0)).view(B, -1, H, D // H).transpose(1, 2)  # (B, H, m, D/H)
        mask = None
        if valid is not None:
            mask = valid.flatten(1)
            mask = mask | ~mask.any(1, keepdim=True)  # a crop without valid cells attends to all (no NaN)
            mask = mask[:, None, None, :]  # (B, 1, 1, N)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, m, D/H)
        x = q0 + self.proj(a.transpose(1, 2).reshape(B, -1, D))
        x = x + self.mlp(self.norm_ffn(x))
        return self.norm_out(x)


class QSACLLoss(nn.Module):
    """The QSACL objective on per-crop query vectors (stateless apart from its temperature).

    Args:
        temperature: InfoNCE temperature.
        distributed: gather teacher vectors of all ranks as extra negatives.

    """

    def __init__(self, temperature: float = 0.2, distributed: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.distributed = distributed

    def cl(self, student: Tensor, teacher: Tensor) -> Tensor:
        """``1/m sum_i CL(z_i, z_i')`` for (B, m, D) student and teacher vectors of two crops."""
        return info_nce(student.transpose(0, 1), teacher.transpose(0, 1).detach(), self.temperature, self.distributed)

    def forward(
        self,
        student_global: Sequence[Tensor],
        student_local: Sequence[Tensor],
        teacher_global: Sequence[Tensor],
        teacher_local: Sequence[Tensor],
    ) -> Tensor:
        """Average of ``1/(2m) sum_i [CL(z_i^g, z_i^l') + CL(z_i^l, z_i^g')]`` over (global, local) crop pairs.

        Args:
            student_global, teacher_global: per global crop, (B, m, D) query vectors.
            student_local, teacher_local: per local crop, (B, m, D); may be empty.

        """
        terms: list[Tensor] = []
        if student_local:
            for g in range(len(student_global)):
                for j in range(len(student_local)):
                    terms.append(0.5 * (self.cl(student_global[g], teacher_local[j])
                                        + self.cl(student_local[j], teacher_global[g])))  # fmt: skip
        else:
            n = len(student_global)
            terms = [self.cl(student_global[a], teacher_global[b]) for a in range(n) for b in range(n) if a != b]
        if not terms:
            raise ValueError("QSACL needs local crops or at least two global crops")
        return torch.stack(terms).mean()
