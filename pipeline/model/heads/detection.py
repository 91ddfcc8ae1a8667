"""Object detection: oriented boxes from the feature pyramid, anchor-free (FCOS-style), one raw tensor out.

Why FCOS-style and not two-stage [ours]: remote-sensing objects come at every scale and angle, densely packed (531
ships in one DOTA image); an anchor-free head predicts one box per feature location with no anchor shapes or
angles to tune per dataset, no RoI pooling (a second stage whose rotated RoI-align has no torchvision operator), and
every layer is a convolution, so a tile's detections depend only on its surroundings as the dense heads' maps do.
Each location of each pyramid level predicts class logits, a centerness logit and one box ``(dx, dy, log w, log h,
angle)`` relative to the location and the level's stride; boxes are trained with a rotation-aware Gaussian loss
(ProbIoU, :mod:`pipeline.finetune.detection`), which is periodic in the angle by construction, so no angle-boundary
handling is needed. Horizontal boxes are the special case ``oriented=False``: the angle output is dropped (always
0) and the same head serves HBB data (DIOR) and OBB data (DOTA, DIOR-R).

The pyramid is the UPerNet/FPN part of the dense decoder (:mod:`.dense`) without its final fusion: lateral 1x1
convolutions of the 4 stage maps (for HR inputs stages 1-2 are at HR resolution: 1/4 and 1/8 of the HR pixels), the
fused embedding joining the coarsest level, a top-down path, 3x3 smoothing. Levels of equal size are one level (HR
at 0.625 m has stages 3 and 4 both on the 10 m grid); their strides are read from the map sizes.

**Raw output** (what :meth:`DetectionTask.forward` returns, the task-model contract): one tensor ``(B, N, 9 + K)``
over the ``N`` locations of all levels, channels ``[x, y, stride | dx, dy, log_w, log_h, angle | centerness |
K class logits]``: each location's centre and stride in pixels of the finest input travel with its predictions,
so the loss and :meth:`DetectionTask.decode` (scores, boxes, NMS) are pure functions of this tensor.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.geometry import nms, normalize_boxes

from ..skysense import SkySenseV2
from .base import Inputs, TaskModel, output_size, pyramid

LOC, BOX, CTR, CLS = slice(0, 3), slice(3, 8), 8, 9
"""Channel layout of the raw output: location (x, y, stride), box (dx, dy, log_w, log_h, angle), centerness, classes."""
MAX_LOG_SIZE = 8.0
"""Box sides are at most ``e^8`` (about 3000) strides: a clamp against overflow of untrained heads."""


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.GELU())


def locations(size: tuple[int, int], image: tuple[int, int], device: torch.device) -> tuple[Tensor, float]:
    """Centres ``(H*W, 2)`` (x, y in image pixels) of the cells of a ``size`` map over an ``image``, and its stride.

    Raises:
        ValueError: the map does not tile the image with one integer stride.
    """
    (h, w), (hi, wi) = size, image
    stride = hi / h
    if abs(stride - round(stride)) > 1e-6 or abs(wi / w - stride) > 1e-6:
        raise ValueError(f"a {h}x{w} feature map does not tile a {hi}x{wi} image with an integer stride")
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return (torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * stride, float(round(stride))


class DetectionHead(nn.Module):
    """Feature pyramid + shared class / box towers -> the raw ``(B, N, 9 + K)`` tensor (see the module docstring).

    Args:
        stage_dims: channels of the 4 stage maps.
        fused_dim: channels of the fused map.
        num_classes: K.
        width: pyramid and tower channels (a multiple of 8: GroupNorm).
        convs: 3x3 convolution blocks per tower.
        oriented: predict the angle (else boxes are horizontal, angle 0).
        prior: initial class probability (the classifier bias, as in RetinaNet / FCOS).
    """

    def __init__(self, stage_dims: tuple[int, ...], fused_dim: int, num_classes: int, width: int = 64,
                 convs: int = 2, oriented: bool = True, prior: float = 0.01) -> None:  # fmt: skip
        super().__init__()
        self.oriented = oriented
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in stage_dims)
        self.fused = nn.Conv2d(fused_dim, width, 1)
        self.smooth = nn.ModuleList(_block(width, width) for _ in stage_dims)
        self.cls_tower = nn.Sequential(*(_block(width, width) for _ in range(convs)))
        self.box_tower = nn.Sequential(*(_block(width, width) for _ in range(convs)))
        self.cls_out = nn.Conv2d(width, num_classes, 3, padding=1)
        self.box_out = nn.Conv2d(width, 5 if oriented else 4, 3, padding=1)
        self.ctr_out = nn.Conv2d(width, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(stage_dims)))  # per level, on log sizes (FCOS's Scale)
        for conv in (self.cls_out, self.box_out, self.ctr_out):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior) / prior))

    def pyramid(self, levels: list[Tensor], fused: Tensor) -> list[Tensor]:
        """Top-down pyramid over the stage maps, one map per distinct size, finest first."""
        lat = [conv(x) for conv, x in zip(self.lateral, levels)]
        lat[-1] = lat[-1] + F.interpolate(self.fused(fused), size=lat[-1].shape[-2:], mode="bilinear")
        for s in range(len(lat) - 2, -1, -1):
            up = lat[s + 1]
            lat[s] = lat[s] + (up if up.shape[-2:] == lat[s].shape[-2:] else
                               F.interpolate(up, size=lat[s].shape[-2:], mode="bilinear"))  # fmt: skip
        keep = [s for s in range(len(lat)) if s == 0 or lat[s].shape[-2:] != lat[s - 1].shape[-2:]]
        return [self.smooth[s](lat[s]) for s in keep]

    def forward(self, levels: list[Tensor], fused: Tensor, image: tuple[int, int]) -> Tensor:
        """levels: 4 x (B, C_s, H_s, W_s), finest first; fused: (B, D, Hg, Wg); image: (H, W) px -> (B, N, 9 + K)."""
        outs = []
        for i, p in enumerate(self.pyramid(levels, fused)):
            B, _, h, w = p.shape
            xy, stride = locations((h, w), image, p.device)
            cls = self.cls_out(self.cls_tower(p))  # (B, K, h, w)
            feat = self.box_tower(p)
            box = self.box_out(feat)  # (B, 5 | 4, h, w)
            ctr = self.ctr_out(feat)
            off, size = box[:, :2], box[:, 2:4] * self.scales[i]
            angle = box[:, 4:5] if self.oriented else torch.zeros_like(ctr)
            loc = torch.cat([xy, torch.full_like(xy[:, :1], stride)], 1).T.reshape(1, 3, h, w).expand(B, 3, h, w)
            maps = torch.cat([loc.to(p.dtype), off, size, angle, ctr, cls], 1)  # (B, 9 + K, h, w)
            outs.append(maps.flatten(2).transpose(1, 2))
        return torch.cat(outs, 1)


class DetectionTask(TaskModel):
    """Oriented (or horizontal) object boxes per class; raw outputs ``(B, N, 9 + K)`` (see the module docstring).

    Args:
        model: the backbone + fusion.
        num_classes: object classes.
        class_names: their names (default ``class_<i>``).
        width: pyramid and tower channels.
        convs: convolution blocks per tower.
        oriented: oriented boxes (OBB); False: horizontal boxes (HBB, angle 0).
        score_threshold: detections below this score are dropped by :meth:`decode` (region jobs use it per tile;
            evaluation decodes with a low threshold of its own, as mAP needs the whole ranking).
        nms_iou: NMS IoU threshold per class; default 0.1 for oriented boxes (mmrotate's DOTA setting: densely
            parked rotated objects barely overlap) and 0.5 for horizontal boxes (whose boxes of neighbours overlap).
        max_detections: detections kept per image (tile) after NMS.
    """

    kind = "detection"
    dense = False
    boxes = True  # raw outputs are box predictions: decode them (region jobs, evaluation)

    def __init__(self, model: SkySenseV2, num_classes: int, class_names: list[str] | None = None, width: int = 64,
                 convs: int = 2, oriented: bool = True, score_threshold: float = 0.3, nms_iou: float | None = None,
                 max_detections: int = 300) -> None:  # fmt: skip
        super().__init__(model)
        self.out_channels = num_classes
        self.channel_names = list(class_names or [f"class_{i}" for i in range(num_classes)])
        if len(self.channel_names) != num_classes:
            raise ValueError(f"{len(self.channel_names)} class names for {num_classes} classes")
        if not 0 <= score_threshold < 1:
            raise ValueError(f"score_threshold must be in [0, 1), got {score_threshold}")
        self.width, self.convs, self.oriented = width, convs, oriented
        self.score_threshold, self.max_detections = score_threshold, max_detections
        self.nms_iou = nms_iou if nms_iou is not None else (0.1 if oriented else 0.5)
        self.head = DetectionHead(model.config.dims, model.config.fusion_dim, num_classes, width, convs, oriented)

    def head_config(self) -> dict[str, Any]:  # noqa: D102
        return {"width": self.width, "convs": self.convs, "oriented": self.oriented,
                "score_threshold": self.score_threshold, "nms_iou": self.nms_iou,
                "max_detections": self.max_detections}  # fmt: skip

    def forward(self, inputs: Inputs, inputs_after: Inputs | None = None) -> Tensor:  # noqa: D102
        inter = self.model.forward_intermediates(inputs)
        return self.head(pyramid(inter), inter["fused"], output_size(inputs))  # type: ignore[arg-type]

    @torch.no_grad()
    def decode(self, raw: Tensor, score_threshold: float | None = None, pre_nms: int = 1000) -> list[dict[str, Any]]:
        """Raw outputs ``(B, N, 9 + K)`` -> per image ``{"boxes": (n, 5), "scores": (n,), "classes": (n,)}`` arrays.

        Scores are ``sqrt(p_class * p_centerness)`` (FCOS); the ``pre_nms`` best (location, class) pairs above the
        threshold are decoded, suppressed per class (:func:`pipeline.geometry.nms`) and the ``max_detections`` best
        kept. Boxes are in pixels of the finest input, in :mod:`pipeline.geometry.boxes`' canonical form.
        """
        thr = self.score_threshold if score_threshold is None else score_threshold
        return [decode_boxes(r, thr, self.nms_iou, self.max_detections, pre_nms) for r in raw.float().cpu()]


def box_params(raw: Tensor) -> Tensor:
    """``(..., 9 + K)`` raw outputs -> ``(..., 5)`` boxes (cx, cy, w, h, angle) in pixels (angle not wrapped)."""
    xy, stride = raw[..., 0:2], raw[..., 2:3]
    centre = xy + raw[..., 3:5] * stride
    size = raw[..., 5:7].clamp(max=MAX_LOG_SIZE).exp() * stride
    return torch.cat([centre, size, raw[..., 7:8]], -1)


def decode_boxes(raw: Tensor, score_threshold: float, nms_iou: float, max_detections: int,
                 pre_nms: int = 1000) -> dict[str, Any]:  # fmt: skip
    """One image's ``(N, 9 + K)`` raw outputs -> its detections (see :meth:`DetectionTask.decode`)."""
    k = raw.shape[-1] - CLS
    scores = (raw[:, CLS:].sigmoid() * raw[:, CTR : CTR + 1].sigmoid()).sqrt()  # (N, K)
    flat = scores.flatten()
    cand = torch.nonzero(flat > score_threshold).flatten()
    if len(cand) > pre_nms:
        cand = cand[flat[cand].topk(pre_nms).indices]
    loc, cls = cand // k, cand % k
    boxes = normalize_boxes(box_params(raw[loc]).double().numpy())
    s = flat[cand].double().numpy()
    c = cls.numpy()
    keep = nms(boxes, s, nms_iou, c, max_keep=max_detections)
    return {"boxes": boxes[keep], "scores": s[keep].astype(np.float32), "classes": c[keep].astype(np.int64)}
