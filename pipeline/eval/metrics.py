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

import torch
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat

from pipeline.finetune.sample import IGNORE

from .detection_metrics import IOU_THRESHOLDS, DetectionMetrics, voc_match
from .metric_base import (
    TaskMetric,
    _check_ids,
    _class_ids,
    _class_names,
    _overall_dict,
    _value,
    average_precision,
    confusion_scores,
)

__all__ = [
    "IOU_THRESHOLDS", "TASK_METRICS", "ChangeMetrics", "ClassificationMetrics", "DetectionMetrics", "MultilabelMetrics",
    "RegressionMetrics", "SegmentationMetrics", "TaskMetric", "average_precision", "bootstrap_ci", "confusion_scores",
    "voc_match",
]  # fmt: skip


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
