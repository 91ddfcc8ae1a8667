"""The teacher's exponential moving average: one ``_foreach`` update over matching parameter lists (DINOv2)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


@torch.no_grad()
def update_ema(teacher_params: Iterable[Tensor], student_params: Iterable[Tensor], momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, in place.

    Momentum 1 keeps the teacher, 0 copies the student. The two iterables must yield matching tensors in the
    same order (e.g. ``teacher.parameters()`` and ``student.parameters()`` of two modules built alike; under
    FSDP both must be sharded the same way so the local shards correspond).
    """
    t = [p.data for p in teacher_params]
    s = [p.data for p in student_params]
    if len(t) != len(s):
        raise ValueError(f"teacher has {len(t)} tensors but student {len(s)}; they must be built alike")
    if not t:
        return
    s = [x.to(y.dtype) for x, y in zip(s, t)]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)
