"""What every task metric shares: the :class:`TaskMetric` interface and the functions its numbers come from.

Conventions: :mod:`pipeline.eval.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

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
