"""MGCL: multi-granularity contrastive learning (SkySense V1), student views against teacher views.

Three granularities, each an InfoNCE (:func:`~pipeline.ssl.contrastive.info_nce`) between student and teacher
embeddings of the same ground:

* **pixel**: the per-cell embeddings of two views at the same source grid cell. Views are put back on the
  source grid (:meth:`CropGeometry.to_canvas`); cells valid in both views are the positives, up to
  ``max_pixels`` of them (random subset) per pair of views, and every other sampled cell (other places of the
  same sample and of other samples) is a negative.
* **object**: [ours] superpixel-free regions: the cells of a fixed partition of the *source* grid into
  ``region_size`` x ``region_size`` blocks, intersected with the overlap of the two views. A region counts when
  at least ``min_region_fraction`` of its block is covered by both views; its embedding is the mean over the
  covered cells. Fixed blocks are deterministic, cost one pooling, and are aligned in both views by
  construction (k-means regions would need matching between views).
* **image**: the embedding of the whole view (the fused map pooled, then its own head); positives are the same
  sample in the other view, negatives the other samples (gathered across ranks when ``distributed``).

**Across modalities** [ours]: in every student view, the per-modality embeddings (date-pooled stage-4 map of
one modality) are contrasted with the teacher's embeddings of every *other* modality of the same view, at the
same three granularities (e.g. S2 against S1 of the same place); samples or cells where either modality is
masked are skipped. These terms are added to each level with weight ``cross_modal_weight``.

Student view ``v`` is paired with teacher view ``u`` for every teacher view ``u != v`` (DINO: targets come
from global views); with a single global view it is paired with itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import CropGeometry
from .branch import ViewFeatures
from .contrastive import info_nce


def matched_cells(
    s_feat: Tensor, s_valid: Tensor, s_geom: CropGeometry, t_feat: Tensor, t_valid: Tensor, t_geom: CropGeometry
) -> tuple[Tensor, Tensor, Tensor]:
    """Student and teacher maps on the source grid and the cells both cover.

    Returns:
        student canvas (B, P, Hg, Wg), teacher canvas (B, P, Hg, Wg), overlap mask (B, Hg, Wg) bool.

    """
    cs, ms = s_geom.to_canvas(s_feat, s_valid)
    ct, mt = t_geom.to_canvas(t_feat, t_valid)
    return cs, ct, ms & mt


def sample_cells(
    cs: Tensor, ct: Tensor, both: Tensor, max_pixels: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Up to ``max_pixels`` overlapping cells: student (N, P), teacher (N, P) and each cell's sample index (N,)."""
    b, y, x = both.nonzero(as_tuple=True)
    if b.numel() > max_pixels:
        g_dev = generator.device if generator is not None else b.device
        keep = torch.randperm(b.numel(), generator=generator, device=g_dev)[:max_pixels].to(b.device)
        b, y, x = b[keep], y[keep], x[keep]
    return cs[b, :, y, x], ct[b, :, y, x], b


def region_pool(cs: Tensor, ct: Tensor, both: Tensor, size: int, min_fraction: float) -> tuple[Tensor, Tensor]:
    """Mean embeddings of the fixed ``size`` x ``size`` source-grid blocks covered enough by both views: (N, P)."""
    w = both[:, None].to(cs.dtype)  # (B, 1, Hg, Wg)

    def pool(t: Tensor) -> Tensor:
        return F.avg_pool2d(t, size, ceil_mode=True, divisor_override=1)

    count = pool(w)  # (B, 1, Hr, Wr) covered cells per block
    keep = count[:, 0] >= max(min_fraction * size * size, 1.0)  # (B, Hr, Wr)
    rs = (pool(cs * w) / count.clamp_min(1.0)).permute(0, 2, 3, 1)[keep]
    rt = (pool(ct * w) / count.clamp_min(1.0)).permute(0, 2, 3, 1)[keep]
    return rs, rt


class MGCLLoss(nn.Module):
    """Pixel-, object- and image-level contrast between student and teacher views, within and across modalities.

    Args:
        temperature: InfoNCE temperature.
        max_pixels: cells sampled per pair of views at pixel level.
        region_size: side of the object-level blocks in grid cells.
        min_region_fraction: share of a block both views must cover for it to count.
        cross_modal_weight: weight of the cross-modal terms inside each level (0 disables them).
        distributed: gather image-level teacher keys of all ranks as negatives.

    """

    def __init__(
        self, temperature: float = 0.2, max_pixels: int = 1024, region_size: int = 4,
        min_region_fraction: float = 0.25, cross_modal_weight: float = 1.0, distributed: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.temperature, self.max_pixels = temperature, max_pixels
        self.region_size, self.min_region_fraction = region_size, min_region_fraction
        self.cross_modal_weight, self.distributed = cross_modal_weight, distributed

    def dense_terms(
        self, s: Tensor, sv: Tensor, sg: CropGeometry, t: Tensor, tv: Tensor, tg: CropGeometry,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Pixel- and object-level InfoNCE of one student map against one teacher map."""
        cs, ct, both = matched_cells(s, sv, sg, t, tv, tg)
        ps, pt, _ = sample_cells(cs, ct, both, self.max_pixels, generator)
        rs, rt = region_pool(cs, ct, both, self.region_size, self.min_region_fraction)
        tau = self.temperature
        return info_nce(ps, pt.detach(), tau), info_nce(rs, rt.detach(), tau)

    def forward(
        self,
        student: Sequence[ViewFeatures],
        student_geom: Sequence[CropGeometry],
        teacher: Sequence[ViewFeatures],
        teacher_geom: Sequence[CropGeometry],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Losses ``pixel``, ``object``, ``image`` (cross-modal terms included) and ``cross`` (their share, detached).

        Args:
            student: every student view; the first ``len(teacher)`` are the global views the teacher saw.
            student_geom: their crop geometries.
            teacher: teacher global views.
            teacher_geom: their crop geometries.
            generator: randomness of the pixel sampling.

        """
        levels: dict[str, list[Tensor]] = {"pixel": [], "object": [], "image": []}
        cross: dict[str, list[Tensor]] = {"pixel": [], "object": [], "image": []}
        tau = self.temperature
        for v, (sf, sg) in enumerate(zip(student, student_geom)):
            targets = [u for u in range(len(teacher)) if u != v] or [v]
            for u in targets:
                tf, tg = teacher[u], teacher_geom[u]
                pix, obj = self.dense_terms(sf.dense, sf.valid, sg, tf.dense, tf.valid, tg, generator)
                levels["pixel"].append(pix)
                levels["object"].append(obj)
                levels["image"].append(info_nce(sf.image, tf.image.detach(), tau, self.distributed))
            if self.cross_modal_weight <= 0 or v >= len(teacher):
                continue
            tf = teacher[v]  # same crop, other modality: the same ground cell by construction
            for a in sf.modal:
                for b in tf.modal:
                    if a == b:
                        continue
                    pix, obj = self.dense_terms(
                        sf.modal[a], sf.modal_valid[a], sg, tf.modal[b], tf.modal_valid[b], sg, generator
                    )
                    both = sf.modal_valid[a].flatten(1).any(1) & tf.modal_valid[b].flatten(1).any(1)  # (B,)
                    img = info_nce(sf.modal_image[a][both], tf.modal_image[b][both].detach(), tau)
                    for k, val in (("pixel", pix), ("object", obj), ("image", img)):
                        cross[k].append(val)
        out: dict[str, Tensor] = {}
        cross_total = []
        for k, terms in levels.items():
            val = torch.stack(terms).mean()
            if cross[k]:
                c = torch.stack(cross[k]).mean()
                val = val + self.cross_modal_weight * c
                cross_total.append(c.detach())
            out[k] = val
        out["cross"] = torch.stack(cross_total).mean() if cross_total else torch.zeros((), device=out["pixel"].device)
        return out
