"""The SkySense V2 pre-training meta-architecture: views -> student/teacher -> losses (it composes, it doesn't compute).

Objective (reference section 4): ``loss = w_mgcl * MGCL + w_qsacl * QSACL + w_gcpl * GCPL + w_moe * MoE``.
ITA (dense image-text alignment with OpenStreetMap class names) is out of scope: it needs a text encoder and OSM
labels, which the offline pipeline does not have. The MoE term is the Switch load-balancing loss the backbone
computes (already scaled by the model's ``moe_aux_weight``), averaged over every student MoE call of the step.

Distributed training: wrap ``meta.student_modules`` (the model plus every student head; its ``forward`` computes
all student outputs) in DDP (``find_unused_parameters=True``: absent modalities leave tokenizers unused) or
FSDP; keep ``meta.teacher_modules`` unwrapped for DDP, or shard it exactly like the student for FSDP so that
:meth:`SSLMetaArch.update_teacher` pairs matching local shards.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from pipeline.model import ModalityInput, SkySenseV2

from .augment import CropGeometry, MultiViewAugment, ViewGroup
from .branch import SSLBranch, ViewFeatures
from .ema import update_ema
from .gcpl import GCPLLoss
from .mgcl import MGCLLoss, matched_cells, sample_cells
from .qsacl import QSACLLoss
from .regions import DEFAULT_NUM_REGIONS, unknown_region


class SSLMetaArch(nn.Module):
    """Teacher-student pre-training of a SkySense V2 model on any subset of its modalities.

    Args:
        student: the model to pre-train (the teacher is a deep copy).
        num_queries: QSACL queries ``m`` (paper: 16).
        proj_dim, head_hidden_dim: width of the contrastive embeddings and of the projection heads' hidden layer.
        query_heads: attention heads of the query decoder.
        mgcl_weight, qsacl_weight, gcpl_weight, moe_weight: loss weights (0 skips a term).
        mgcl_levels: weights of the pixel, object and image levels inside MGCL.
        cross_modal_weight: weight of the cross-modal MGCL terms inside each level.
        temperature: InfoNCE temperature of MGCL and QSACL.
        max_pixels: cells sampled per view pair for pixel-level MGCL and GCPL.
        region_size: object-level block side (grid cells).
        num_regions, num_prototypes: GCPL regions x prototypes (paper: 4096 x 100); region ids follow
            :mod:`pipeline.ssl.regions` (the last one is the unknown location).
        augment: the view generator; default: 2 global + 4 local views with the model's modalities.
        distributed: gather batch-level teacher keys of all ranks as InfoNCE negatives.

    """

    def __init__(
        self,
        student: SkySenseV2,
        *,
        num_queries: int = 16,
        proj_dim: int = 256,
        head_hidden_dim: int = 1024,
        query_heads: int = 4,
        mgcl_weight: float = 1.0,
        qsacl_weight: float = 1.0,
        gcpl_weight: float = 0.1,
        moe_weight: float = 1.0,
        mgcl_levels: tuple[float, float, float] = (1.0, 1.0, 1.0),
        cross_modal_weight: float = 0.5,
        temperature: float = 0.2,
        max_pixels: int = 1024,
        region_size: int = 4,
        num_regions: int = DEFAULT_NUM_REGIONS,
        num_prototypes: int = 8,
        augment: MultiViewAugment | None = None,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        self.student_modules: nn.Module = SSLBranch(
            student, proj_dim=proj_dim, hidden_dim=head_hidden_dim, num_queries=num_queries, query_heads=query_heads
        )
        self.teacher_modules = copy.deepcopy(self.student_modules)
        self.teacher_modules.requires_grad_(False)
        self.teacher_modules.eval()
        cfg = student.config
        self.augment = augment or MultiViewAugment(cfg.modalities, grid_gsd=cfg.grid_gsd)
        self.weights = {"mgcl": mgcl_weight, "qsacl": qsacl_weight, "gcpl": gcpl_weight, "moe": moe_weight}
        self.mgcl_levels = dict(zip(("pixel", "object", "image"), mgcl_levels))
        self.max_pixels = max_pixels
        self.qsacl = QSACLLoss(temperature, distributed)
        self.mgcl = MGCLLoss(temperature, max_pixels, region_size, cross_modal_weight=cross_modal_weight,
                             distributed=distributed)  # fmt: skip
        self.gcpl = GCPLLoss(proj_dim, num_regions, num_prototypes)

    @property
    def student(self) -> SkySenseV2:
        """The model being pre-trained (unwrapped from DDP/FSDP if needed)."""
        branch = self.student_modules
        return getattr(branch, "module", branch).model

    def train(self, mode: bool = True) -> SSLMetaArch:
        """Train/eval the student side and the losses; the teacher always runs in eval mode."""
        super().train(mode)
        self.teacher_modules.eval()
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher <- momentum * teacher + (1 - momentum) * student`` over the model and all heads."""
        update_ema(self.teacher_modules.parameters(), self.student_modules.parameters(), momentum)

    def forward(
        self,
        batch: Mapping[str, ModalityInput],
        *,
        region: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Augment ``batch`` on its device, run student and teacher, return the weighted losses.

        Args:
            batch: raw (normalised, un-augmented) samples of any subset of the model's modalities.
            region: (B,) long GCPL region of each sample, in ``[0, num_regions)`` (default: all of unknown
                location, ``num_regions - 1``).
            generator: randomness of views and sampling (a fixed seed gives a fixed set of views).

        Returns:
            ``loss`` (with gradient) ``= sum_c w_c * loss_c`` and, detached, the components before the weights
            ``w``: ``loss_qsacl``, ``loss_mgcl_pixel``, ``loss_mgcl_object``, ``loss_mgcl_image`` (each times its
            ``mgcl_levels`` weight, cross-modal terms included; all three use ``mgcl_weight``), ``loss_gcpl``,
            ``loss_moe``; ``mgcl_cross`` (the cross-modal part of MGCL, for logging) and ``expert_load``
            (num_moe_layers, E): the fraction of the step's student tokens each expert received.

        """
        region = self._check_region(region, batch)
        glob, loc = self.augment(batch, generator)
        groups: list[ViewGroup] = [glob] + ([loc] if loc is not None else [])
        inputs = [g.inputs for g in groups]
        s_out = self.student_modules(inputs)
        with torch.no_grad():
            t_out = self.teacher_modules(inputs)
        s_views = [v for g, o in zip(groups, s_out["groups"]) for v in ViewFeatures.split(o, g.num_views)]
        t_views = [v for g, o in zip(groups, t_out["groups"]) for v in ViewFeatures.split(o, g.num_views)]
        geoms = [g.view_geometry(v) for g in groups for v in range(g.num_views)]
        ng = glob.num_views

        losses: dict[str, Tensor] = {}
        losses["qsacl"] = self.qsacl(
            [v.queries for v in s_views[:ng]], [v.queries for v in s_views[ng:]],
            [v.queries for v in t_views[:ng]], [v.queries for v in t_views[ng:]],
        )  # fmt: skip
        mgcl = self.mgcl(s_views, geoms, t_views[:ng], geoms[:ng], generator)
        for level, w in self.mgcl_levels.items():
            losses[f"mgcl_{level}"] = w * mgcl[level]
        losses["gcpl"] = self._gcpl(s_views[:ng], t_views[:ng], geoms[:ng], region, generator)
        losses["moe"] = s_out["moe_aux"]

        total = sum(self.weights[k.split("_")[0]] * v for k, v in losses.items())
        out = {"loss": total}
        out.update({f"loss_{k}": v.detach() for k, v in losses.items()})
        out["mgcl_cross"] = mgcl["cross"]
        tokens = s_out["tokens_per_expert"].float()
        out["expert_load"] = tokens / tokens.sum(-1, keepdim=True).clamp_min(1.0)
        return out

    def _check_region(self, region: Tensor | None, batch: Mapping[str, ModalityInput]) -> Tensor:
        """(B,) long region ids of the batch: ``region`` checked, or the unknown-location id for every sample."""
        first = next(iter(batch.values())).x
        B, n = first.shape[0], self.gcpl.num_regions
        if region is None:
            return torch.full((B,), unknown_region(n), dtype=torch.long, device=first.device)
        if region.shape != (B,) or region.is_floating_point() or region.is_complex():
            raise ValueError(f"region must be a (B,) = ({B},) integer tensor, got {region.dtype} {tuple(region.shape)}")
        lo, hi = (int(v) for v in torch.aminmax(region))  # host sync, once per forward (B >= 1)
        if lo < 0 or hi >= n:
            raise ValueError(
                f"region ids must lie in [0, {n}) (num_regions={n}, {n - 1} = unknown location), got {lo}..{hi}"
            )
        return region.long()

    def _gcpl(
        self,
        student: list[ViewFeatures],
        teacher: list[ViewFeatures],
        geoms: list[CropGeometry],
        region: Tensor,
        generator: torch.Generator | None,
    ) -> Tensor:
        """GCPL on cells seen by a student global view and another teacher global view (itself if only one)."""
        if self.weights["gcpl"] == 0:
            return student[0].dense.sum() * 0.0
        terms = []
        for v, sf in enumerate(student):
            u = (v + 1) % len(teacher)
            cs, ct, both = matched_cells(sf.dense, sf.valid, geoms[v], teacher[u].dense, teacher[u].valid, geoms[u])
            s, t, b = sample_cells(cs, ct, both, self.max_pixels, generator)
            r = region.to(b.device)[b]
            terms.append(self.gcpl(s, t, r))
        return torch.stack(terms).mean()
