"""Task models on the feature API (:mod:`.base`, :mod:`.dense`, :mod:`.pooled`, :mod:`.detection`), :func:`build_task`.

Which task model an output kind uses is the kind's decision (:meth:`pipeline.kinds.OutputKind.task`);
:func:`build_task` adds seeding, the head's saved configuration and trained head weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pipeline.kinds import OutputKind, get_kind

from ..skysense import SkySenseV2
from .base import EmbeddingTask, TaskModel, output_size, pyramid
from .dense import ChangeTask, PyramidDecoder, RegressionTask, SegmentationTask
from .detection import DetectionHead, DetectionTask
from .pooled import CellPool, ClassificationTask, MultiLabelTask

log = logging.getLogger(__name__)

__all__ = [
    "CellPool", "ChangeTask", "ClassificationTask", "DetectionHead", "DetectionTask", "EmbeddingTask", "MultiLabelTask",
    "PyramidDecoder", "RegressionTask", "SegmentationTask", "TaskModel", "build_task", "output_size", "pyramid",
]  # fmt: skip


def build_task(
    kind: str | OutputKind,
    model: SkySenseV2,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    head_state: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    quiet: bool = False,
    head_config: Mapping[str, Any] | None = None,
) -> TaskModel:
    """Wrap ``model`` for an output kind; loads ``head_state`` when a trained head is available.

    Args:
        kind: an output kind or its name (:mod:`pipeline.kinds`).
        model: the backbone + fusion.
        num_classes, class_names: classes of a class-score kind.
        head_state: trained head weights; None initialises the head from ``seed``.
        seed: seed of an untrained head, so resumed jobs and reruns give identical outputs.
        quiet: no warning about an untrained head (describing a model, not running it).
        head_config: the head's construction arguments (:meth:`TaskModel.head_config`, stored in checkpoints).

    Raises:
        ValueError: unknown kind or missing class count.
    """
    kind = get_kind(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        task = kind.task(model, num_classes=num_classes, class_names=class_names, **dict(head_config or {}))
    head = getattr(task, "head", None)
    if head is None:
        return task
    if head_state is not None:
        head.load_state_dict(head_state)
    elif not quiet:
        log.warning("%s head is randomly initialised (seed %d): outputs are not meaningful yet", kind.name, seed)
    return task
