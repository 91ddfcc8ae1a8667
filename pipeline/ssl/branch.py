"""One side of the teacher-student pair: the SkySense V2 model plus every projection head, behind one forward.

The student side is one ``nn.Module`` whose ``forward`` computes everything the losses need from the student,
so a training loop can wrap it whole in DDP/FSDP; the teacher side is a deep copy of the same class.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model import ModalityInput, SkySenseV2
from pipeline.model.layers.moe import MoEFeedForward

from .qsacl import QueryDecoder


class ProjectionHead(nn.Module):
    """Linear -> GELU -> Linear on the last dimension (SimCLR/MoCo v3 projector)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        return self.fc2(self.act(self.fc1(x)))

    def dense(self, x: Tensor) -> Tensor:
        """Per cell on a map: (B, C, h, w) -> (B, out_dim, h, w)."""
        return self(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def masked_mean(x: Tensor, valid: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Mean of ``x`` over ``dims`` where ``valid`` (broadcastable, without x's channel dim) is True; 0 if none."""
    w = valid.to(x.dtype)
    return (x * w).sum(dims) / w.sum(dims).clamp_min(1.0)


def token_valid(valid: Tensor | None, shape: tuple[int, int], grid: tuple[int, int], device: torch.device) -> Tensor:
    """(B, T) or (B, T, H, W) validity -> (B, T, h, w) per token; the model's rule: >= half the pixels valid."""
    if valid is None:
        return torch.ones(*shape, *grid, dtype=torch.bool, device=device)
    if valid.ndim == 2:
        return valid[:, :, None, None].expand(*valid.shape, *grid)
    frac = F.adaptive_avg_pool2d(valid.flatten(0, 1).float()[:, None], grid)  # (B*T, 1, h, w)
    return (frac[:, 0] >= 0.5).view(*valid.shape[:2], *grid)


@dataclass
class ViewFeatures:
    """Projected outputs of one view of a batch (B samples), as the losses consume them.

    Attributes:
        dense: (B, P, n, n) per-cell embedding of the fused map; ``valid`` (B, n, n).
        image: (B, P) embedding of the pooled fused map.
        queries: (B, m, P) QSACL query vectors.
        modal: per modality (B, P, n, n) per-cell embedding of its date-pooled stage-4 map; ``modal_valid``
            (B, n, n); ``modal_image`` (B, P) its pooled embedding.

    """

    dense: Tensor
    valid: Tensor
    image: Tensor
    queries: Tensor
    modal: dict[str, Tensor] = field(default_factory=dict)
    modal_valid: dict[str, Tensor] = field(default_factory=dict)
    modal_image: dict[str, Tensor] = field(default_factory=dict)

    @staticmethod
    def split(out: Mapping[str, Any], num_views: int) -> list[ViewFeatures]:
        """Split one group's outputs (view-major batch) into per-view features."""

        def chunk(t: Tensor) -> tuple[Tensor, ...]:
            return t.chunk(num_views)

        per = {k: chunk(out[k]) for k in ("dense", "valid", "image", "queries")}
        modal = {k: {m: chunk(t) for m, t in out[k].items()} for k in ("modal", "modal_valid", "modal_image")}
        return [
            ViewFeatures(
                **{k: v[i] for k, v in per.items()}, **{k: {m: t[i] for m, t in d.items()} for k, d in modal.items()}
            )
            for i in range(num_views)
        ]


@contextmanager
def collect_moe(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Gather the MoE aux losses and token counts of every MoE call inside the block.

    [ours] ``forward_intermediates`` runs the backbone once per modality and an MoE layer keeps only its last
    call's ``aux_loss``, so the meta-architecture hooks each call instead of reading the layers afterwards.
    Yields a dict that holds, after the block, ``aux`` (mean over calls of the summed layer losses) and
    ``tokens`` (num_layers, E) token counts summed over calls.
    """
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    aux: list[Tensor] = []
    tokens = [torch.zeros(m.num_experts, dtype=torch.long, device=m.gate.weight.device) for m in layers]

    def hook(i: int) -> Any:
        def fn(mod: MoEFeedForward, args: Any, out: Any) -> None:
            if mod.aux_loss is not None:
                aux.append(mod.aux_loss)
            tokens[i] += mod.tokens_per_expert

        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    result: dict[str, Any] = {}
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
    calls = max(len(aux) / max(len(layers), 1), 1.0)
    device = layers[0].gate.weight.device if layers else None
    result["aux"] = torch.stack(aux).sum() / calls if aux else torch.zeros((), device=device)
    result["tokens"] = torch.stack(tokens) if tokens else torch.zeros(0, 0, dtype=torch.long)


class SSLBranch(nn.Module):
    """The model and its SSL heads (student or teacher).

    Args:
        model: the SkySense V2 model.
        proj_dim: width of every contrastive embedding.
        hidden_dim: hidden width of the projection heads.
        num_queries: QSACL queries ``m``.
        query_heads: attention heads of the query decoder.

    """

    def __init__(
        self, model: SkySenseV2, *, proj_dim: int = 256, hidden_dim: int = 1024, num_queries: int = 16,
        query_heads: int = 4,
    ) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        D, C4 = model.config.fusion_dim, model.config.dims[-1]
        self.dense_head = ProjectionHead(D, hidden_dim, proj_dim)
        self.image_head = ProjectionHead(D, hidden_dim, proj_dim)
        self.modal_head = ProjectionHead(C4, hidden_dim, proj_dim)  # shared: the backbone is shared too
        self.query_decoder = QueryDecoder(D, D, num_queries, query_heads)
        self.query_head = ProjectionHead(D, hidden_dim, proj_dim)

    def embed(self, inputs: Mapping[str, ModalityInput]) -> dict[str, Any]:
        """Projected outputs of one batch of views (see :class:`ViewFeatures` for the keys)."""
        inter = self.model.forward_intermediates(inputs)
        fused, valid = inter["fused"], inter["valid"]  # (N, D, h, w), (N, h, w)
        out: dict[str, Any] = {
            "dense": self.dense_head.dense(fused),
            "valid": valid,
            "image": self.image_head(masked_mean(fused, valid[:, None], (2, 3))),
            "queries": self.query_head(self.query_decoder(fused, valid)),
            "modal": {}, "modal_valid": {}, "modal_image": {},
        }  # fmt: skip
        for name, inp in inputs.items():
            feat = inter[name][-1]  # (N, T, C4, h, w)
            tv = token_valid(inp.valid, feat.shape[:2], feat.shape[-2:], feat.device)  # (N, T, h, w)
            pooled = masked_mean(feat, tv[:, :, None], (1,))  # (N, C4, h, w): mean over valid dates
            mv = tv.any(1)
            emb = self.modal_head.dense(pooled)
            out["modal"][name], out["modal_valid"][name] = emb, mv
            out["modal_image"][name] = masked_mean(emb, mv[:, None], (2, 3))
        return out

    def forward(self, groups: Sequence[Mapping[str, ModalityInput]]) -> dict[str, Any]:
        """Outputs of each group of views plus the MoE statistics of all of them.

        Returns:
            ``{"groups": [embed(g) for g in groups], "moe_aux": scalar, "tokens_per_expert": (L, E)}``.

        """
        with collect_moe(self.model) as moe:
            outs = [self.embed(g) for g in groups]
        return {"groups": outs, "moe_aux": moe["aux"], "tokens_per_expert": moe["tokens"]}
