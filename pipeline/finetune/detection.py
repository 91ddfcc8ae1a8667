"""The detection loss: objects assigned to pyramid locations (FCOS), focal loss, ProbIoU box loss, centerness.

Assignment (per image, on the raw output's own locations and strides, :mod:`pipeline.model.heads.detection`): a
location is a *positive* of an object when it lies inside the object's rotated box, within ``radius`` strides of
its centre along the box's axes (FCOS "centre sampling"), and its largest distance to the box's sides is in the
range of its level (FCOS: up to ``8 x stride``, above the previous level's limit; the coarsest level takes all
larger objects). A location claimed by several objects takes the smallest. An object no location claims (smaller
than its level's stride) gets the location of its level nearest to its centre [ours: every object is trained].
Locations inside an *ignore* box (difficult objects, objects cut off by the sample's border, another split's
objects) that are not positives do not count in the classification loss at all.

Losses [FCOS, with a rotation-aware box term]: sigmoid focal loss of every counted location and class (torchvision,
alpha 0.25, gamma 2) over the number of positives; ``1 - ProbIoU`` of each positive's box (Llerena et al. 2021: the
Bhattacharyya coefficient of the boxes as 2D Gaussians, mean = centre, covariance = ``R diag(w^2, h^2) R^T / 12``);
binary cross-entropy of the centerness logit against the location's centerness in the box's own frame. A
rectangle's Gaussian is the same for ``angle + pi`` and for ``(h, w, angle + pi/2)``, so the box loss has no angle
boundary problem: no angle wrapping or w/h swapping is ever needed, and horizontal boxes are the case angle = 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from pipeline.model.heads.detection import BOX, CLS, CTR, box_params

RANGE = 8.0
"""A level takes objects whose largest location-to-side distance is at most ``RANGE x stride`` (FCOS)."""


def gaussian(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Covariance entries ``(a, b, c)`` = ``(var_x, var_y, cov_xy)`` of ``(..., 5)`` boxes as uniform 2D Gaussians."""
    w2, h2 = boxes[..., 2].square() / 12, boxes[..., 3].square() / 12
    cos, sin = boxes[..., 4].cos(), boxes[..., 4].sin()
    return w2 * cos.square() + h2 * sin.square(), w2 * sin.square() + h2 * cos.square(), (w2 - h2) * cos * sin


def probiou(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """ProbIoU ``1 - Hellinger distance`` of ``(..., 5)`` boxes as Gaussians, in ``[0, 1]`` (1: the same box)."""
    a1, b1, c1 = gaussian(pred)
    a2, b2, c2 = gaussian(target)
    a, b, c = a1 + a2, b1 + b2, c1 + c2  # 2 x the covariance of the mean Gaussian
    det = (a * b - c.square()).clamp_min(eps)
    dx, dy = pred[..., 0] - target[..., 0], pred[..., 1] - target[..., 1]
    mahalanobis = (b * dx.square() + a * dy.square() - 2 * c * dx * dy) / (4 * det)  # 1/8 d^T S^-1 d, S = mean cov
    d1, d2 = (a1 * b1 - c1.square()).clamp_min(eps), (a2 * b2 - c2.square()).clamp_min(eps)
    shape = 0.5 * torch.log((det / 4) / (d1 * d2).sqrt())
    bhattacharyya = (mahalanobis + shape).clamp(eps, 100.0)
    return 1 - (1 - torch.exp(-bhattacharyya) + eps).sqrt()


def _local(points: Tensor, boxes: Tensor) -> Tensor:
    """``(N, 2)`` points in the frame of each of ``(M, 5)`` boxes: ``(N, M, 2)`` offsets along the box's w and h."""
    d = points[:, None, :] - boxes[None, :, :2]  # (N, M, 2)
    cos, sin = boxes[:, 4].cos(), boxes[:, 4].sin()
    return torch.stack([d[..., 0] * cos + d[..., 1] * sin, -d[..., 0] * sin + d[..., 1] * cos], -1)


def level_ranges(strides: Tensor) -> tuple[Tensor, Tensor]:
    """Per location, the (low, high] range of the largest side distance its level takes."""
    levels = torch.unique(strides)  # sorted: finest first
    hi = levels * RANGE
    hi[-1] = math.inf
    lo = torch.cat([hi.new_zeros(1), hi[:-1]])
    idx = torch.searchsorted(levels, strides.contiguous())
    return lo[idx], hi[idx]


class DetectionLoss(nn.Module):
    """``loss(raw (B, N, 9 + K), label) -> scalar``; ``label`` a collated detection label (:mod:`..sample`).

    Args:
        radius: centre-sampling radius in strides.
        alpha, gamma: focal loss parameters.
        box_weight, ctr_weight: weights of the ProbIoU and centerness terms (the focal term has weight 1).
    """

    def __init__(self, radius: float = 1.5, alpha: float = 0.25, gamma: float = 2.0, box_weight: float = 2.0,
                 ctr_weight: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        self.radius, self.alpha, self.gamma = radius, alpha, gamma
        self.box_weight, self.ctr_weight = box_weight, ctr_weight

    @torch.no_grad()
    def assign(self, loc: Tensor, boxes: Tensor, ignore: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One image: per location the index of its object (-1: negative), whether it is ignored, its centerness.

        Args:
            loc: ``(N, 3)`` location x, y and stride.
            boxes: ``(M, 5)`` objects.
            ignore: ``(M,)`` ignore boxes (never positives; their inside is not counted).
        """
        n = loc.shape[0]
        matched = torch.full((n,), -1, dtype=torch.long, device=loc.device)
        ctr = loc.new_zeros(n)
        if boxes.shape[0] == 0:
            return matched, torch.zeros(n, dtype=torch.bool, device=loc.device), ctr
        u = _local(loc[:, :2], boxes)  # (N, M, 2)
        half = boxes[None, :, 2:4] / 2
        inside = (u.abs() <= half).all(-1)  # (N, M)
        near = (u.abs() < self.radius * loc[:, 2:3, None]).all(-1)
        dist = torch.cat([half - u, half + u], -1)  # (N, M, 4): distances to the 4 sides
        far = dist.amax(-1)
        lo, hi = level_ranges(loc[:, 2])
        ok = inside & near & (far > lo[:, None]) & (far <= hi[:, None]) & ~ignore[None]
        area = (boxes[:, 2] * boxes[:, 3])[None].expand(n, -1)
        cost = torch.where(ok, area, torch.full_like(area, math.inf))
        best, idx = cost.min(1)
        pos = torch.isfinite(best)
        matched[pos] = idx[pos]
        for g in torch.nonzero(~ignore & ~(matched[:, None] == torch.arange(len(boxes), device=loc.device)).any(0)):
            g = int(g)
            size = float(boxes[g, 2:4].amax()) / 2
            level = (lo <= size) & ((hi >= size) | torch.isinf(hi))
            d = (loc[:, :2] - boxes[g, :2]).square().sum(-1)
            d = torch.where(level & (matched < 0), d, torch.full_like(d, math.inf))
            if torch.isfinite(d.min()):
                matched[int(d.argmin())] = g
        ignored = (inside & ignore[None]).any(1) & (matched < 0)
        has = matched >= 0
        sides = dist[has, matched[has]].clamp_min(0)  # (P, 4): w-, h-, w+, h+ distances
        lr, tb = sides[:, [0, 2]], sides[:, [1, 3]]
        ratio = (lr.amin(1) / lr.amax(1).clamp_min(1e-6)) * (tb.amin(1) / tb.amax(1).clamp_min(1e-6))
        ctr[has] = ratio.sqrt()
        return matched, ignored, ctr

    def forward(self, raw: Tensor, label: Mapping[str, Tensor]) -> Tensor:  # noqa: D102
        if not isinstance(label, Mapping):
            raise ValueError("the detection loss needs box labels (a detection data format: dota, voc, vector_boxes)")
        raw = raw.float()
        B, N, C = raw.shape
        k = C - CLS
        cls_target = raw.new_zeros(B, N, k)
        weight = raw.new_ones(B, N)
        box_pred, box_true, ctr_logit, ctr_true = [], [], [], []
        for i in range(B):
            real = label["classes"][i] >= 0
            boxes, classes = label["boxes"][i][real].float(), label["classes"][i][real]
            ignore = label["ignore"][i][real]
            matched, ignored, ctr = self.assign(raw[i, :, :3], boxes, ignore)
            pos = matched >= 0
            cls_target[i, pos, classes[matched[pos]]] = 1.0
            weight[i, ignored] = 0.0
            box_pred.append(box_params(raw[i, pos]))
            box_true.append(boxes[matched[pos]])
            ctr_logit.append(raw[i, pos, CTR])
            ctr_true.append(ctr[pos])
        num_pos = max(sum(len(b) for b in box_true), 1)
        focal = sigmoid_focal_loss(raw[..., CLS:], cls_target, alpha=self.alpha, gamma=self.gamma, reduction="none")
        loss = (focal.sum(-1) * weight).sum() / num_pos
        pred, true = torch.cat(box_pred), torch.cat(box_true)
        if len(true):
            loss = loss + self.box_weight * (1 - probiou(pred, true)).mean()
            ctr_loss = F.binary_cross_entropy_with_logits(torch.cat(ctr_logit), torch.cat(ctr_true))
            loss = loss + self.ctr_weight * ctr_loss
        else:  # no object in the batch: keep every output in the graph (DDP wants gradients for all parameters)
            loss = loss + 0.0 * raw[..., BOX].sum() + 0.0 * raw[..., CTR].sum()
        return loss
