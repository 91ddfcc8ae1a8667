"""Task metrics of fine-tuned models, computed in one place for ``finetune`` (validation) and ``skypipe eval``.

Each task family is one :class:`torchmetrics.Metric`: ``update(preds, target)`` per batch, ``compute() -> dict``,
``reset()``; torchmetrics sums / concatenates the states across DDP ranks. The states are **sufficient statistics**
with bounded memory: a K x K confusion matrix (classification, segmentation, change) or five sums (regression).
Multi-label keeps the scores themselves, because average precision ranks all of them (N x K floats, small). Every
number is derived from those statistics by the same pure functions for the point estimate and for each bootstrap
resample, so the interval of :func:`bootstrap_ci` is an interval of exactly the reported statistic.

``compute()`` returns a JSON-ready dict (:mod:`pipeline.eval.report` prints and writes it)::

    {"task": "segmentation", "headline": "miou",
     "overall": {"miou": 0.61, "accuracy": 0.87, "macro_f1": 0.72, "classes_scored": 6},
     "per_class": {"water": {"iou": 0.80, "f1": 0.89, "precision": 0.90, "recall": 0.88, "support": 12345}, ...},
     "class_names": ["water", ...], "confusion_matrix": [[...], ...],  # rows: target, columns: prediction
     "n_samples": 50}

Conventions [ours]:

* Targets equal to :data:`~pipeline.finetune.sample.IGNORE` (-1) never count, whatever is predicted there.
* A class is *present* when it occurs in the target or in the prediction (tp + fp + fn > 0). Macro means (mIoU,
  macro F1) are over present classes, as in mmsegmentation and torchmetrics' ``average="macro"``; per-class values
  that are 0 / 0 (IoU and F1 of an absent class, precision of a never-predicted class, recall of a class absent from
  the target) are NaN, not 0, and ``classes_scored`` says how many classes a macro mean covers.
* Multi-label mAP is the mean AP over classes with at least one positive and one negative target; AP is sklearn's
  ``average_precision_score`` (step-wise precision-recall area, tied scores as one threshold).
* Detection AP (:class:`DetectionMetrics`) follows the PASCAL VOC devkit (the DOTA devkit's evaluation is the same
  code): detections by descending score, each matched to the same-class ground truth it overlaps most; a match
  with IoU above the threshold is a true positive unless that object was already found (then a false positive) or
  is *ignored* (difficult, cut off, another split's: then the detection counts as neither); AP is the area under
  the interpolated precision-recall curve at every recall step (VOC 2010+, not the 11-point VOC 2007 rule). mAP is
  over classes with at least one object that is not ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from pipeline.finetune.sample import IGNORE


def confusion_scores(cm: Tensor) -> dict[str, Tensor]:
    """Per-class and overall scores of confusion matrices ``(..., K, K)`` (rows: target, columns: prediction).

    Returns float64 per-class ``(..., K)`` tensors ``precision``, ``recall``, ``f1``, ``iou``, ``support`` and
    overall ``(...)`` tensors ``accuracy``, ``miou``, ``macro_f1``, ``classes_scored`` (see the module conventions).
    Leading dimensions are batch dimensions, so one call scores every bootstrap resample.
    """
    cm = cm.double()
    tp = cm.diagonal(dim1=-2, dim2=-1)  # (..., K)
    support, predicted = cm.sum(-1), cm.sum(-2)  # (..., K) targets / predictions per class
    fp, fn = predicted - tp, support - tp
    # 0 / 0 is NaN in floating point: exactly the undefined cases, which nanmean then leaves out
    iou, f1 = tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn)
    return {
        "precision": tp / predicted, "recall": tp / support, "f1": f1, "iou": iou, "support": support,
        "accuracy": tp.sum(-1) / cm.sum((-2, -1)), "miou": iou.nanmean(-1), "macro_f1": f1.nanmean(-1),
        "classes_scored": (~iou.isnan()).sum(-1).double(),
    }  # fmt: skip


def average_precision(scores: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Average precision of each class ``(R, K)`` under ``R`` sample weightings.

    Args:
        scores: ``(N, K)`` scores; only their order matters (logits or probabilities alike).
        target: ``(N, K)`` 0/1 targets.
        weights: ``(R, N)`` non-negative sample weights (bootstrap counts); ``None`` is one weighting of ones.

    Returns:
        sklearn's ``average_precision_score`` per class and weighting, ``sum_n (R_n - R_{n-1}) P_n`` over distinct
        score thresholds; NaN where the weighted targets lack a positive or a negative.
    """
    n, k = scores.shape
    w = torch.ones(1, n, dtype=torch.float64, device=scores.device) if weights is None else weights.double()
    out = torch.full((w.shape[0], k), math.nan, dtype=torch.float64, device=scores.device)
    if n == 0:
        return out
    for c in range(k):
        s, order = torch.sort(scores[:, c], descending=True, stable=True)
        y, wc = target[order, c].double(), w[:, order]  # (N,), (R, N)
        tp, seen = (wc * y).cumsum(1), wc.cumsum(1)  # (R, N)
        last = torch.ones(n, dtype=torch.bool, device=s.device)
        last[:-1] = s[1:] != s[:-1]  # the last sample of each run of tied scores is one threshold
        if not last.all():
            tp, seen = tp[:, last], seen[:, last]  # (R, thresholds)
        pos, neg = tp[:, -1], seen[:, -1] - tp[:, -1]
        precision = torch.nan_to_num(tp / seen)  # 0 / 0 only before any weighted sample: no recall step there
        recall_step = torch.diff(tp, dim=1, prepend=torch.zeros_like(tp[:, :1])) / pos[:, None]
        ap = (recall_step * precision).sum(1)
        out[:, c] = torch.where((pos > 0) & (neg > 0), ap, math.nan)
    return out


def _class_names(num_classes: int | None, class_names: Sequence[str] | None) -> list[str]:
    if class_names is not None:
        names = [str(c) for c in class_names]
        if num_classes is not None and num_classes != len(names):
            raise ValueError(f"{len(names)} class names for {num_classes} classes")
        return names
    if num_classes is None or num_classes < 1:
        raise ValueError(f"give num_classes (a positive count, got {num_classes}) or class_names")
    return [f"class_{i}" for i in range(num_classes)]


def _check_ids(x: Tensor, k: int, what: str, allow_ignore: bool) -> None:
    bad = (x < 0) | (x >= k)
    if allow_ignore:
        bad &= x != IGNORE
    if bad.any():
        values = torch.unique(x[bad])[:5].tolist()
        extra = f" or IGNORE={IGNORE}" if allow_ignore else ""
        raise ValueError(f"{what} has values outside the class ids 0..{k - 1}{extra}: {values}")


def _class_ids(preds: Tensor, target: Tensor, k: int) -> Tensor:
    """Class ids shaped like ``target`` from ids, scores ``(B, K, ...)`` (argmax) or a binary logit ``(B, 1, ...)``."""
    if preds.ndim == target.ndim + 1 and preds.shape[0] == target.shape[0] and preds.shape[2:] == target.shape[1:]:
        if not preds.is_floating_point():
            raise ValueError(f"predictions {tuple(preds.shape)} with a class dimension must be float scores")
        if preds.shape[1] == 1 and k == 2:
            return (preds[:, 0] > 0).long()  # one binary logit per sample / pixel
        if preds.shape[1] != k:
            raise ValueError(f"predictions have {preds.shape[1]} class scores, the metric {k} classes")
        return preds.argmax(1)
    if preds.shape != target.shape:
        raise ValueError(f"predictions {tuple(preds.shape)} do not fit targets {tuple(target.shape)}: give class ids "
                         f"shaped like the targets or scores with the class dimension second")  # fmt: skip
    if preds.is_floating_point():
        raise ValueError("float predictions shaped like the targets are ambiguous: give integer class ids, or scores "
                         "(B, K, ...) with the class dimension")  # fmt: skip
    return preds.long()


def _value(x: Tensor) -> float:
    return float(x.item())


def _overall_dict(overall: dict[str, Tensor]) -> dict[str, float | int]:
    """Plain numbers for JSON and loggers; counts stay integers."""
    return {k: int(v.item()) if k in ("classes_scored", "n_values") else _value(v) for k, v in overall.items()}


class TaskMetric(Metric):
    """What every task metric offers besides ``update`` / ``compute`` / ``reset``.

    Subclasses set ``task`` and ``headline_name`` and implement ``_num_samples`` and ``_resampled_headline`` (the
    headline recomputed under sample weights, for :func:`bootstrap_ci`).
    """

    is_differentiable = False
    full_state_update = False
    task = ""
    headline_name = ""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("compute_with_cache", False)  # callers add "ci" to the returned dict: never share it
        super().__init__(**kwargs)

    @property
    def headline(self) -> tuple[str, float]:
        """``(name, value)`` of the headline metric over everything seen so far."""
        return self.headline_name, self.compute()["overall"][self.headline_name]

    def per_class(self) -> dict[str, dict[str, float]]:
        """``{class name: {metric: value}}`` over everything seen so far (empty for regression)."""
        return self.compute()["per_class"]

    def _num_samples(self) -> int:
        raise NotImplementedError

    def _resampled_headline(self, weights: Tensor) -> Tensor:
        """Headline ``(R,)`` with sample ``i`` counted ``weights[r, i]`` times, ``weights`` ``(R, N)``."""
        raise NotImplementedError


class ClassificationMetrics(TaskMetric):
    """Scene classification: overall accuracy (headline ``accuracy``), macro F1, per-class precision / recall / F1.

    ``update(preds, target)``: ``preds`` logits ``(B, K)`` (argmax) or class ids ``(B,)``; ``target`` class ids
    ``(B,)``, samples with target IGNORE are skipped.

    Args:
        num_classes: K (or give ``class_names``).
        class_names: names of the classes in id order, for the per-class table.
        per_sample: keep each sample's (target, prediction) cell for :func:`bootstrap_ci` (8 bytes a sample);
            samples with target IGNORE are not resampled.
        validate_args: check the class ids of every batch (one device sync a batch).
        kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``process_group``, ...).
    """

    task = "classification"
    headline_name = "accuracy"
    higher_is_better = True
    confmat: Tensor
    count: Tensor
    sample_stats: list[Tensor]

    def __init__(self, num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 per_sample: bool = False, validate_args: bool = True, **kwargs: Any):  # fmt: skip
        super().__init__(**kwargs)
        self.class_names = _class_names(num_classes, class_names)
        self.num_classes = k = len(self.class_names)
        self.per_sample, self.validate_args = per_sample, validate_args
        self.add_state("confmat", torch.zeros(k, k, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("sample_stats", [], dist_reduce_fx="cat")

    def _cells(self, preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Flat confusion cells ``target * K + prediction`` of the labelled entries, and the label mask."""
        k, target = self.num_classes, target.long()
        pred = _class_ids(preds, target, k)
        if self.validate_args:
            _check_ids(target, k, "target", allow_ignore=True)
            _check_ids(pred, k, "prediction", allow_ignore=False)
        keep = target != IGNORE
        return torch.where(keep, target * k + pred, 0), keep

    def update(self, preds: Tensor, target: Tensor) -> None:  # noqa: D102
        if target.ndim != 1:
            raise ValueError(f"classification targets are class ids (B,), got {tuple(target.shape)}")
        cells, keep = self._cells(preds, target)
        cells = cells[keep]
        self.confmat += torch.bincount(cells, minlength=self.num_classes**2).view_as(self.confmat)
        self.count += keep.sum()
        if self.per_sample:
            self.sample_stats.append(cells)

    def _overall(self, s: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "classes_scored": s["classes_scored"]}

    per_class_keys: tuple[str, ...] = ("precision", "recall", "f1", "support")

    def compute(self) -> dict[str, Any]:  # noqa: D102
        s = confusion_scores(self.confmat)
        return {
            "task": self.task, "headline": self.headline_name,
            "overall": _overall_dict(self._overall(s)),
            "per_class": {c: {m: _value(s[m][i]) for m in self.per_class_keys} for i, c in enumerate(self.class_names)},
            "class_names": list(self.class_names), "confusion_matrix": self.confmat.tolist(),
            "n_samples": int(self.count.item()),
        }  # fmt: skip

    def _stats(self) -> Tensor:
        if not self.per_sample:
            raise ValueError(f"{type(self).__name__} kept no per-sample statistics: construct it with per_sample=True")
        return dim_zero_cat(self.sample_stats) if len(self.sample_stats) else self.confmat.new_zeros(0)

    def _num_samples(self) -> int:
        return len(self._stats())

    def _resampled_confusion(self, weights: Tensor) -> Tensor:
        cells = self._stats()  # (N,) flat cells
        if weights.shape[1] != len(cells):
            raise ValueError(f"{weights.shape[1]} sample weights for {len(cells)} labelled samples")
        k2 = self.num_classes**2
        cm = weights.new_zeros(weights.shape[0], k2).scatter_add_(1, cells.expand(weights.shape[0], -1), weights)
        return cm.view(-1, self.num_classes, self.num_classes)  # (R, K, K)

    def _resampled_headline(self, weights: Tensor) -> Tensor:
        return self._overall(confusion_scores(self._resampled_confusion(weights)))[self.headline_name]


class SegmentationMetrics(ClassificationMetrics):
    """Semantic segmentation: mIoU (headline ``miou``), pixel accuracy, macro F1, per-class IoU / F1 / P / R.

    Only pixels whose target is not IGNORE count.

    ``update(preds, target)``: ``preds`` logits ``(B, K, H, W)`` (argmax; one channel ``(B, 1, H, W)`` is a binary
    logit when K = 2) or class ids ``(B, H, W)``; ``target`` ``(B, H, W)`` with IGNORE = -1.

    Args:
        num_classes: K (or give ``class_names``).
        class_names: names of the classes in id order.
        per_sample: keep one K x K confusion matrix per image for :func:`bootstrap_ci` (8 K^2 bytes an image).
        validate_args: check the class ids of every batch (one device sync a batch).
        kwargs: torchmetrics ``Metric`` options.
    """

    task = "segmentation"
    headline_name = "miou"
    per_class_keys = ("iou", "f1", "precision", "recall", "support")

    def update(self, preds: Tensor, target: Tensor) -> None:  # noqa: D102
        if target.ndim < 2:
            raise ValueError(f"segmentation targets are masks (B, H, W), got {tuple(target.shape)}")
        cells, keep = self._cells(preds, target)
        b, k2 = target.shape[0], self.num_classes**2
        image = torch.arange(b, device=target.device).view(b, *[1] * (target.ndim - 1))  # (B, 1, 1)
        per_image = torch.bincount((cells + image * k2)[keep], minlength=b * k2).view(b, *self.confmat.shape)
        self.confmat += per_image.sum(0)
        self.count += b
        if self.per_sample:
            self.sample_stats.append(per_image)  # (B, K, K)

    def _overall(self, s: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"miou": s["miou"], "accuracy": s["accuracy"], "macro_f1": s["macro_f1"],
                "classes_scored": s["classes_scored"]}  # fmt: skip

    def _resampled_confusion(self, weights: Tensor) -> Tensor:
        per_image = self._stats().flatten(1).to(weights.dtype)  # (N, K * K)
        return (weights @ per_image).view(-1, self.num_classes, self.num_classes)  # (R, K, K)


class ChangeMetrics(SegmentationMetrics):
    """Change detection: the segmentation metrics plus F1 (headline ``f1``), IoU, precision, recall of the change class.

    ``update`` takes what :class:`SegmentationMetrics` takes.

    Args:
        num_classes: K (default 2: no change, change).
        class_names: names of the classes in id order (default ``no_change``, ``change``).
        change_class: id of the class whose F1 / IoU are reported.
        per_sample: keep one confusion matrix per image pair for :func:`bootstrap_ci`.
        validate_args: check the class ids of every batch.
        kwargs: torchmetrics ``Metric`` options.
    """

    task = "change"
    headline_name = "f1"

    def __init__(self, num_classes: int | None = 2, class_names: Sequence[str] | None = None, change_class: int = 1,
                 per_sample: bool = False, validate_args: bool = True, **kwargs: Any):  # fmt: skip
        if class_names is None and num_classes == 2:
            class_names = ["no_change", "change"]
        super().__init__(num_classes, class_names, per_sample, validate_args, **kwargs)
        if not 0 <= change_class < self.num_classes:
            raise ValueError(f"change_class {change_class} is not a class id 0..{self.num_classes - 1}")
        self.change_class = change_class

    def _overall(self, s: dict[str, Tensor]) -> dict[str, Tensor]:
        c = self.change_class
        return {"f1": s["f1"][..., c], "iou": s["iou"][..., c], "precision": s["precision"][..., c],
                "recall": s["recall"][..., c], **super()._overall(s)}  # fmt: skip


class MultilabelMetrics(TaskMetric):
    """Multi-label classification: macro mAP (headline ``map``), micro / macro F1 at a threshold, per-class AP.

    ``update(preds, target)``: ``preds`` logits or probabilities ``(B, K)``; ``target`` multi-hot ``(B, K)``. Scores
    are stored (AP ranks them all) and are also the per-sample statistics of :func:`bootstrap_ci`. AP is computed on
    the raw scores (sigmoid is monotone, and saturated float32 probabilities would create false ties).

    Args:
        num_classes: K (or give ``class_names``).
        class_names: names of the classes in id order.
        logits: whether ``preds`` are logits; ``None`` decides once over all scores seen (logits when any score is
            outside [0, 1], the torchmetrics rule, but never batch by batch).
        threshold: probability above which a label is predicted, for F1.
        validate_args: check that every batch's targets are 0 / 1.
        kwargs: torchmetrics ``Metric`` options.
    """

    task = "multilabel"
    headline_name = "map"
    higher_is_better = True
    scores: list[Tensor]
    targets: list[Tensor]

    def __init__(self, num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 logits: bool | None = None, threshold: float = 0.5, validate_args: bool = True,
                 **kwargs: Any):  # fmt: skip
        super().__init__(**kwargs)
        self.class_names = _class_names(num_classes, class_names)
        self.num_classes = len(self.class_names)
        if not 0 < threshold < 1:
            raise ValueError(f"threshold {threshold} is not a probability in (0, 1)")
        self.logits, self.threshold, self.validate_args = logits, threshold, validate_args
        self.add_state("scores", [], dist_reduce_fx="cat")
        self.add_state("targets", [], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:  # noqa: D102
        k = self.num_classes
        if preds.shape != target.shape or preds.ndim != 2 or preds.shape[1] != k:
            raise ValueError(f"multi-label predictions {tuple(preds.shape)} and targets {tuple(target.shape)} must "
                             f"both be (B, {k})")  # fmt: skip
        if self.validate_args and not ((target == 0) | (target == 1)).all():
            raise ValueError(f"multi-label targets must be 0 / 1, got {torch.unique(target)[:5].tolist()}")
        self.scores.append(preds.detach().float())
        self.targets.append(target.to(torch.uint8))

    def _data(self) -> tuple[Tensor, Tensor]:
        if not len(self.scores):
            empty = torch.zeros(0, self.num_classes, device=self.device)
            return empty, empty.to(torch.uint8)
        return dim_zero_cat(self.scores), dim_zero_cat(self.targets)

    def compute(self) -> dict[str, Any]:  # noqa: D102
        scores, target = self._data()
        logits = self.logits if self.logits is not None else bool(((scores < 0) | (scores > 1)).any())
        cut = math.log(self.threshold / (1 - self.threshold)) if logits else self.threshold
        pred, y = scores > cut, target.bool()
        tp, fp, fn = (pred & y).sum(0).double(), (pred & ~y).sum(0).double(), (~pred & y).sum(0).double()
        f1 = 2 * tp / (2 * tp + fp + fn)
        ap = average_precision(scores, target)[0]
        per_class = {"ap": ap, "f1": f1, "precision": tp / (tp + fp), "recall": tp / (tp + fn), "support": tp + fn}
        return {
            "task": self.task, "headline": self.headline_name,
            "overall": {"map": _value(ap.nanmean()), "classes_scored": int((~ap.isnan()).sum()),
                        "micro_f1": _value(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum())),
                        "macro_f1": _value(f1.nanmean())},
            "per_class": {c: {m: _value(v[i]) for m, v in per_class.items()} for i, c in enumerate(self.class_names)},
            "class_names": list(self.class_names), "n_samples": len(scores), "logits": logits,
        }  # fmt: skip

    def _num_samples(self) -> int:
        return len(self._data()[0])

    def _resampled_headline(self, weights: Tensor) -> Tensor:
        scores, target = self._data()
        return average_precision(scores, target, weights).nanmean(1)


class RegressionMetrics(TaskMetric):
    """Per-sample or per-pixel regression: RMSE (headline ``rmse``, lower is better), MAE and R2; NaN targets ignored.

    ``update(preds, target)``: ``target`` ``(B, ...)`` with NaN where unlabelled; ``preds`` the same shape, or with an
    extra channel dimension of size 1 (``(B, 1, H, W)`` for ``(B, H, W)``).

    Args:
        per_sample: keep five sums per sample for :func:`bootstrap_ci`.
        kwargs: torchmetrics ``Metric`` options.
    """

    task = "regression"
    headline_name = "rmse"
    higher_is_better = False
    sums: Tensor
    sample_stats: list[Tensor]

    def __init__(self, per_sample: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.per_sample, self.class_names = per_sample, []
        self.add_state("sums", torch.zeros(5, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("sample_stats", [], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:  # noqa: D102
        if preds.ndim == target.ndim + 1 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.shape != target.shape:
            raise ValueError(f"regression predictions {tuple(preds.shape)} do not fit targets {tuple(target.shape)}")
        y, p = target.reshape(len(target), -1).double(), preds.detach().reshape(len(target), -1).double()  # (B, P)
        keep = ~y.isnan()
        y, e = torch.where(keep, y, 0), torch.where(keep, p - y, 0)
        per = torch.stack([keep.sum(1).double(), y.sum(1), (y * y).sum(1), e.abs().sum(1), (e * e).sum(1)], 1)
        self.sums += per.sum(0)
        self.count += len(target)
        if self.per_sample:
            self.sample_stats.append(per)  # (B, 5): n, sum y, sum y^2, sum |e|, sum e^2

    @staticmethod
    def _overall(s: Tensor) -> dict[str, Tensor]:
        n, sy, syy, sae, see = s.unbind(-1)
        return {"rmse": (see / n).sqrt(), "mae": sae / n, "r2": 1 - see / (syy - sy * sy / n), "n_values": n}

    def compute(self) -> dict[str, Any]:  # noqa: D102
        return {"task": self.task, "headline": self.headline_name,
                "overall": _overall_dict(self._overall(self.sums)),
                "per_class": {}, "class_names": [], "n_samples": int(self.count.item())}  # fmt: skip

    def _stats(self) -> Tensor:
        if not self.per_sample:
            raise ValueError("RegressionMetrics kept no per-sample statistics: construct it with per_sample=True")
        return dim_zero_cat(self.sample_stats) if len(self.sample_stats) else self.sums.new_zeros(0, 5)

    def _num_samples(self) -> int:
        return len(self._stats())

    def _resampled_headline(self, weights: Tensor) -> Tensor:
        return self._overall(weights @ self._stats())[self.headline_name]


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


TASK_METRICS: dict[str, type[TaskMetric]] = {
    "classification": ClassificationMetrics, "multilabel": MultilabelMetrics, "segmentation": SegmentationMetrics,
    "change": ChangeMetrics, "regression": RegressionMetrics, "detection": DetectionMetrics,
}  # fmt: skip
"""The metric class of each ``skypipe eval`` / ``finetune`` task name."""


def bootstrap_ci(metric: TaskMetric, n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 max_elements: int = 1 << 22) -> dict[str, Any]:  # fmt: skip
    """Percentile bootstrap confidence interval of ``metric``'s headline, without the model.

    The unit resampled is the **sample** (image, chip, image pair), with replacement, ``n_resamples`` times: pixels
    of one image are not independent (they share a scene, a date, an annotator), so resampling pixels would give
    intervals that are far too narrow. Each resample recomputes the headline from the per-sample sufficient
    statistics kept by the metric (construct it with ``per_sample=True``; multi-label always keeps its scores) as
    a weighted sum, sample ``i`` weighted by how often it was drawn. Resamples are processed in chunks of about
    ``max_elements`` weights, so memory stays bounded.

    Args:
        metric: a metric that has seen the whole test set (synced across DDP ranks here).
        n_resamples: number of bootstrap resamples.
        seed: seed of the resampling (same seed, same interval).
        level: coverage of the interval.
        max_elements: weights per chunk of resamples.

    Returns:
        ``{"low", "high", "level", "metric", "n_resamples", "n_samples", "seed"}``; ``compute()``'s result with this
        under ``"ci"`` is what :func:`pipeline.eval.report.format_report` prints.
    """
    if not 0 < level < 1 or n_resamples < 1:
        raise ValueError(f"need 0 < level < 1 and n_resamples >= 1, got level={level}, n_resamples={n_resamples}")
    gen = torch.Generator().manual_seed(seed)
    with metric.sync_context():
        n = metric._num_samples()
        if n == 0:
            raise ValueError("bootstrap of a metric that has seen no samples")
        chunk, values = max(1, max_elements // n), []
        for start in range(0, n_resamples, chunk):
            r = min(chunk, n_resamples - start)
            idx = torch.randint(n, (r, n), generator=gen)
            weights = torch.zeros(r, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(r, n, dtype=torch.float64))
            values.append(metric._resampled_headline(weights.to(metric.device)).cpu())  # (r,)
    alpha = (1 - level) / 2
    low, high = torch.cat(values).nanquantile(torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return {"low": low, "high": high, "level": level, "metric": metric.headline_name, "n_resamples": n_resamples,
            "n_samples": n, "seed": seed}  # fmt: skip
