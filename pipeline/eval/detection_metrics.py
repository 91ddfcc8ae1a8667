"""Object-detection AP as the PASCAL VOC / DOTA devkits compute it (conventions: :mod:`pipeline.eval.metrics`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat

from .metric_base import TaskMetric, _check_ids, _class_names, _value

IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
"""IoU thresholds of AP@[0.5:0.95] (COCO); AP at the first one (0.5) is the VOC / DOTA headline."""


def voc_match(iou: Tensor, det_classes: Tensor, gt_classes: Tensor, gt_ignore: Tensor,
              thresholds: Sequence[float] = IOU_THRESHOLDS) -> Tensor:  # fmt: skip
    """One image's detections (already in descending score order) matched as the VOC devkit does, per threshold.

    Args:
        iou: ``(D, G)`` IoU of each detection with each ground-truth object.
        det_classes, gt_classes: ``(D,)`` and ``(G,)`` class ids.
        gt_ignore: ``(G,)`` objects that are neither to be found nor penalised (difficult).
        thresholds: IoU thresholds.

    Returns:
        ``(D, T)`` int8: 1 true positive, 0 false positive, -1 ignored (its best match is an ignored object).
    """
    d, g = iou.shape
    out = torch.zeros(d, len(thresholds), dtype=torch.int8)
    if d == 0 or g == 0:
        return out
    same = det_classes[:, None] == gt_classes[None]
    ov = torch.where(same, iou.double(), -1.0)
    best, j = ov.max(1)  # the devkit matches the best-overlapping object, found or not
    best, j, ignore = best.tolist(), j.tolist(), gt_ignore.tolist()
    for t, thr in enumerate(thresholds):
        found = [False] * g
        for k in range(d):
            if best[k] > thr:
                if ignore[j[k]]:
                    out[k, t] = -1
                elif not found[j[k]]:
                    found[j[k]] = True
                    out[k, t] = 1
    return out


def _detection_ap(flags: Tensor, det_image: Tensor, npos: Tensor, weights: Tensor) -> Tensor:
    """AP ``(R, T)`` of one class under ``R`` image weightings.

    Args:
        flags: ``(D, T)`` match flags of the class's detections, in descending score order.
        det_image: ``(D,)`` the image row (of ``npos`` and ``weights``) of each detection.
        npos: ``(I,)`` objects of the class per image (ignored ones not counted).
        weights: ``(R, I)`` image weights (bootstrap counts).
    """
    total = weights @ npos.double()  # (R,)
    if flags.shape[0] == 0:
        return torch.where(total > 0, 0.0, math.nan)[:, None].expand(-1, flags.shape[1]).clone()
    w = weights[:, det_image].double()[:, :, None]  # (R, D, 1)
    tp, fp = w * (flags == 1).double()[None], w * (flags == 0).double()[None]  # (R, D, T)
    ctp, cfp = tp.cumsum(1), fp.cumsum(1)
    precision = torch.nan_to_num(ctp / (ctp + cfp))
    envelope = precision.flip(1).cummax(1).values.flip(1)  # interpolated: the best precision at any higher recall
    ap = (tp / total.clamp_min(1e-12)[:, None, None] * envelope).sum(1)  # recall steps x interpolated precision
    return torch.where(total[:, None] > 0, ap, math.nan)


class DetectionMetrics(TaskMetric):
    """Object detection: VOC AP per class at IoU 0.5 (headline ``map50``), AP@[0.5:0.95], AP@0.75, recall.

    Horizontal and oriented boxes alike: IoU is that of the rotated rectangles' polygons
    (:func:`pipeline.geometry.rotated_iou`; pairs of axis-aligned boxes take the exact rectangle formula).

    ``update(preds, target)``: ``preds`` one dict per image ``{"boxes": (D, 5), "scores": (D,), "classes": (D,)}``
    (a detection task's decoded output); ``target`` a collated detection label ``{"boxes": (B, M, 5), "classes":
    (B, M) with IGNORE padding, "ignore": (B, M)}``. The states are per-detection match flags and per-image object
    counts, which are also the per-sample statistics of :func:`bootstrap_ci` (the image is resampled).

    Args:
        num_classes: K (or give ``class_names``).
        class_names: names of the classes in id order.
        per_sample: accepted for the common signature (detection always keeps per-image statistics).
        thresholds: IoU thresholds (the first is the headline's).
        kwargs: torchmetrics ``Metric`` options.
    """

    task = "detection"
    headline_name = "map50"
    higher_is_better = True
    dets: list[Tensor]
    images: list[Tensor]

    def __init__(self, num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 per_sample: bool = True, thresholds: Sequence[float] = IOU_THRESHOLDS, **kwargs: Any):  # fmt: skip
        super().__init__(**kwargs)
        self.class_names = _class_names(num_classes, class_names)
        self.num_classes = len(self.class_names)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.add_state("dets", [], dist_reduce_fx="cat")  # (D, 3 + T): image id, class, score, flags
        self.add_state("images", [], dist_reduce_fx="cat")  # (I, 1 + K): image id, objects per class
        self.seen = 0

    def _image_id(self) -> int:
        """Unique over DDP ranks (gathered states are concatenated): local index x world + rank."""
        import torch.distributed as dist

        on = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if on else (1, 0)
        self.seen += 1
        return (self.seen - 1) * world + rank

    def update(self, preds: Sequence[dict[str, Any]], target: dict[str, Tensor]) -> None:  # noqa: D102
        from pipeline.geometry import rotated_iou

        if not isinstance(target, dict) or len(preds) != len(target["classes"]):
            raise ValueError("detection metrics take one prediction dict per image and a collated box label")
        k = self.num_classes
        for i, pred in enumerate(preds):
            real = target["classes"][i] >= 0
            gt_boxes = target["boxes"][i][real].detach().double().cpu()
            gt_cls, gt_ign = target["classes"][i][real].cpu(), target["ignore"][i][real].cpu()
            boxes = torch.as_tensor(pred["boxes"], dtype=torch.float64).reshape(-1, 5)
            scores = torch.as_tensor(pred["scores"], dtype=torch.float64).reshape(-1)
            classes = torch.as_tensor(pred["classes"], dtype=torch.long).reshape(-1)
            _check_ids(gt_cls, k, "target classes", allow_ignore=False)
            _check_ids(classes, k, "predicted classes", allow_ignore=False)
            order = torch.from_numpy(np.lexsort((np.arange(len(scores)), -scores.numpy())))
            boxes, scores, classes = boxes[order], scores[order], classes[order]
            iou = torch.from_numpy(rotated_iou(boxes.numpy(), gt_boxes.numpy()))
            flags = voc_match(iou, classes, gt_cls, gt_ign, self.thresholds)
            image = self._image_id()
            head = torch.stack([torch.full_like(scores, image), classes.double(), scores], 1)
            self.dets.append(torch.cat([head, flags.double()], 1).to(self.device))
            counts = torch.bincount(gt_cls[~gt_ign], minlength=k)[:k].double()
            self.images.append(torch.cat([torch.tensor([float(image)]), counts])[None].to(self.device))

    def _data(self) -> tuple[Tensor, Tensor, Tensor]:
        """Detections ``(D, 3 + T)``, their image rows, and ``(I, K)`` objects per image (rows by image id)."""
        t = len(self.thresholds)
        dets = dim_zero_cat(self.dets).cpu() if len(self.dets) else torch.zeros(0, 3 + t, dtype=torch.float64)
        images = dim_zero_cat(self.images).cpu() if len(self.images) else torch.zeros(0, 1 + self.num_classes)
        order = images[:, 0].argsort()
        images = images[order]
        rows = torch.searchsorted(images[:, 0].contiguous(), dets[:, 0].contiguous())
        return dets, rows, images[:, 1:].double()

    def _ap(self, weights: Tensor | None = None) -> Tensor:
        """AP ``(R, K, T)`` per class and threshold under image weightings ``(R, I)`` (None: one of ones)."""
        dets, rows, npos = self._data()
        w = torch.ones(1, len(npos), dtype=torch.float64) if weights is None else weights.double().cpu()
        out = []
        for c in range(self.num_classes):
            mine = dets[:, 1] == c
            d, r = dets[mine], rows[mine]
            order = torch.from_numpy(np.lexsort((r.numpy(), -d[:, 2].numpy()))) if len(d) else torch.zeros(0).long()
            out.append(_detection_ap(d[order, 3:], r[order], npos[:, c], w))
        return torch.stack(out, 1)  # (R, K, T)

    def compute(self) -> dict[str, Any]:  # noqa: D102
        ap = self._ap()[0]  # (K, T)
        dets, _, npos = self._data()
        t75 = min(range(len(self.thresholds)), key=lambda i: abs(self.thresholds[i] - 0.75))
        support = npos.sum(0)
        found = torch.stack([((dets[:, 1] == c) & (dets[:, 3] == 1)).sum() for c in range(self.num_classes)])
        per_class = {
            c: {"ap": _value(ap[i, 0]), "ap50_95": _value(ap[i].mean()), "recall": _value(found[i] / support[i]),
                "support": _value(support[i]), "detections": int((dets[:, 1] == i).sum())}
            for i, c in enumerate(self.class_names)
        }  # fmt: skip
        return {
            "task": self.task, "headline": self.headline_name,
            "overall": {"map50": _value(ap[:, 0].nanmean()), "map50_95": _value(ap.mean(1).nanmean()),
                        "map75": _value(ap[:, t75].nanmean()), "classes_scored": int((~ap[:, 0].isnan()).sum())},
            "per_class": per_class, "class_names": list(self.class_names), "n_samples": len(npos),
            "iou_thresholds": list(self.thresholds),
        }  # fmt: skip

    def _num_samples(self) -> int:
        return len(self._data()[2])

    def _resampled_headline(self, weights: Tensor) -> Tensor:
        return self._ap(weights)[:, :, 0].nanmean(1)
