"""Losses of the fine-tuning tasks, all respecting unlabelled pixels (``IGNORE`` labels, NaN values).

``ce`` cross-entropy (classes; per-pixel for maps), ``bce`` binary cross-entropy per class (multi-label), ``dice``
soft Dice over classes (maps; robust to rare classes), ``ce+dice`` their sum, ``mse`` / ``l1`` for regression,
``detection`` (object boxes: focal + ProbIoU + centerness, :mod:`pipeline.finetune.detection`).
Class weights (optional) scale the cross-entropy per class; ``auto`` is the inverse square root of the training
labels' class frequencies, normalised to mean 1 [ours: a softer balance than plain inverse frequency, which makes
very rare classes dominate a small data set].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.finetune.sample import IGNORE

LOSSES = ("ce", "bce", "dice", "ce+dice", "mse", "l1", "detection")

Loss = Callable[[Tensor, Tensor], Tensor]


def auto_class_weights(counts: Sequence[float]) -> list[float]:
    """Inverse square-root frequency weights with mean 1 (a class never seen gets the largest weight)."""
    c = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1.0)
    w = c.rsqrt()
    return (w / w.mean()).tolist()


def dice_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """1 - mean soft Dice over classes present in prediction or labels; IGNORE pixels do not count.

    Args:
        logits: (B, K, H, W).
        labels: (B, H, W) int64 with IGNORE.
    """
    keep = labels != IGNORE
    probs = logits.float().softmax(1) * keep[:, None]
    onehot = F.one_hot(labels.clamp_min(0), logits.shape[1]).permute(0, 3, 1, 2).float() * keep[:, None]
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = denom > 0
    dice = (2 * inter[present] + 1.0) / (denom[present] + 1.0)
    return 1 - dice.mean() if present.any() else logits.sum() * 0.0


def make_loss(name: str, class_weights: Sequence[float] | None = None, label_smoothing: float = 0.0) -> Loss:
    """The loss ``name`` as ``loss(outputs, labels) -> scalar`` (see the module docstring)."""
    if name == "detection":
        from pipeline.finetune.detection import DetectionLoss

        if class_weights is not None or label_smoothing:
            raise ValueError("the detection loss takes no class_weights or label_smoothing (its focal term balances)")
        return DetectionLoss()
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)

    def ce(out: Tensor, y: Tensor) -> Tensor:
        if (y == IGNORE).all():
            return out.sum() * 0.0
        w = None if weight is None else weight.to(out.device)
        return F.cross_entropy(out.float(), y, weight=w, ignore_index=IGNORE, label_smoothing=label_smoothing)

    def bce(out: Tensor, y: Tensor) -> Tensor:
        w = None if weight is None else weight.to(out.device)
        return F.binary_cross_entropy_with_logits(out.float(), y.float(), pos_weight=w)

    def regression(out: Tensor, y: Tensor) -> Tensor:
        y = y.to(out.dtype)
        y = y[:, None] if y.ndim == out.ndim - 1 else y
        keep = torch.isfinite(y)
        if not keep.any():
            return out.sum() * 0.0
        diff = (out.float() - torch.nan_to_num(y.float()))[keep]
        return diff.square().mean() if name == "mse" else diff.abs().mean()

    losses: dict[str, Loss] = {
        "ce": ce, "bce": bce, "dice": dice_loss, "ce+dice": lambda o, y: ce(o, y) + dice_loss(o, y),
        "mse": regression, "l1": regression,
    }  # fmt: skip
    if name not in losses:
        raise ValueError(f"unknown loss {name!r}; choose one of {list(LOSSES)}")
    chosen = losses[name]

    def loss(out: Tensor, y: Tensor) -> Tensor:
        if isinstance(y, dict):
            raise ValueError(f"loss {name!r} does not fit object boxes (a detection task): use loss detection")
        return chosen(out, y)

    return loss
