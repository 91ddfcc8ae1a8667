"""Scoring a task model on labelled data: one function for fine-tuning's validation and for ``skypipe eval``.

The metric of a kind is :data:`pipeline.eval.metrics.TASK_METRICS[kind.metric_task]`, computed once here in one
place, so a validation number during fine-tuning and a test number of ``skypipe eval`` mean the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.eval.metrics import TASK_METRICS, TaskMetric
from pipeline.finetune.sample import batch_inputs, collate, to_device
from pipeline.kinds import OutputKind
from pipeline.model.heads import TaskModel


class _Plain(Dataset):
    """Un-augmented samples of one labelled source, in order."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source.get(index, None)


def make_metric(kind: OutputKind, class_names: Sequence[str] | None, per_sample: bool = False) -> TaskMetric:
    """The metric object of ``kind`` (with class names for its per-class table)."""
    cls = TASK_METRICS[kind.metric_task]
    if kind.metric_task == "regression":
        return cls(per_sample=per_sample)
    if kind.multi_label:  # multi-label keeps every sample's scores anyway (average precision needs them)
        return cls(class_names=list(class_names or []))
    return cls(class_names=list(class_names or []), per_sample=per_sample)


def predict(task: TaskModel, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The task model's raw outputs (logits / values) for a collated batch."""
    periods = batch_inputs(batch, device)
    return task(periods[0], periods[1] if len(periods) > 1 else None)


EVAL_SCORE_THRESHOLD = 0.01
"""Detections are scored from this score on: average precision ranks every detection, so evaluation must not cut
them at a region job's operating threshold."""


def scored(task: TaskModel, out: torch.Tensor) -> Any:
    """What the metric scores: the raw outputs, or the decoded boxes of a box-predicting (detection) task."""
    if getattr(task, "boxes", False):
        return task.decode(out, score_threshold=EVAL_SCORE_THRESHOLD)  # type: ignore[operator]
    return out.float()


@torch.no_grad()
def evaluate(
    task: TaskModel,
    kind: OutputKind,
    sources: Sequence[Any],
    *,
    class_names: Sequence[str] | None,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    max_batches: int | None = None,
    per_sample: bool = False,
    num_workers: int = 0,
) -> TaskMetric:
    """Run ``task`` over every sample of ``sources`` (at most ``max_batches`` batches each) and return the metric.

    The model runs in eval mode and is left in the mode it was in.
    """
    device = torch.device(device)
    metric = make_metric(kind, class_names, per_sample).to(device)
    was_training = task.training
    task.eval()
    try:
        for source in sources:
            loader = DataLoader(_Plain(source), batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                out = predict(task, batch, device)
                metric.update(scored(task, out), to_device(batch["label"], device))
    finally:
        task.train(was_training)
    return metric
