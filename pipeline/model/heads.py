"""Task models on top of the feature API: embeddings, semantic segmentation, bi-temporal change.

Every task model maps model inputs to a (B, K, Hg, Wg) map on the shared 10 m grid, so one inference code
path serves all output kinds. Heads only consume ``SkySenseV2.forward_intermediates``. Which task model an output
kind uses is the kind's decision (:meth:`pipeline.kinds.OutputKind.task`); :func:`build_task` adds seeding and
trained head weights.

Without trained weights a head is randomly initialised (seeded); the code path is the real one. A checkpoint may
carry a trained head in ``extra["heads"][kind]``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.kinds import OutputKind, get_kind

from .skysense import ModalityInput, SkySenseV2

log = logging.getLogger(__name__)


def _temporal_mean(x: Tensor) -> Tensor:
    """(B, T, C, H, W) -> (B, C, H, W)."""
    return x.mean(dim=1)


class TaskModel(nn.Module):
    """Base: a backbone plus a head producing ``out_channels`` maps on the grid."""

    kind: str = ""

    def __init__(self, model: SkySenseV2) -> None:
        super().__init__()
        self.model = model
        self.out_channels = model.config.fusion_dim
        self.channel_names: list[str] = []

    def forward(
        self,
        inputs: Mapping[str, ModalityInput | Tensor],
        inputs_after: Mapping[str, ModalityInput | Tensor] | None = None,
    ) -> Tensor:
        """Inputs of one date range (and a second one for change) -> (B, K, Hg, Wg)."""
        raise NotImplementedError


class EmbeddingTask(TaskModel):
    """The fused embedding map itself."""

    kind = "embeddings"

    def __init__(self, model: SkySenseV2) -> None:
        super().__init__(model)
        self.channel_names = [f"emb_{i:03d}" for i in range(self.out_channels)]

    def forward(self, inputs, inputs_after=None):  # noqa: D102
        return self.model(inputs)


class MultiScaleHead(nn.Module):
    """FPN-style head: the 4 stage maps (time-averaged, pooled to the grid) plus the fused map -> K channels.

    Stage maps finer than the grid (HR stages 1-2) are area-averaged onto it; each scale is projected by a
    1x1 conv, the projections are summed, then a 3x3 conv block and a 1x1 classifier.
    """

    def __init__(self, stage_dims: tuple[int, ...], fused_dim: int, out_channels: int, width: int = 128) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in stage_dims)
        self.fused = nn.Conv2d(fused_dim, width, 1)
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.GELU())
        self.classifier = nn.Conv2d(width, out_channels, 1)

    def forward(self, stages: list[Tensor], fused: Tensor) -> Tensor:
        """stages: 4 x (B, T, C_s, H_s, W_s); fused: (B, D, Hg, Wg) -> (B, K, Hg, Wg)."""
        grid = fused.shape[-2:]
        x = self.fused(fused)
        for lat, s in zip(self.lateral, stages):
            x = x + lat(F.adaptive_avg_pool2d(_temporal_mean(s), grid))
        return self.classifier(self.block(x))


class SegmentationTask(TaskModel):
    """Per-grid-cell class logits from one modality's multi-scale maps and the fused map.

    Args:
        modality: whose stage maps feed the head; None = the first present in the model's fusion order.
    """

    kind = "segmentation"

    def __init__(
        self, model: SkySenseV2, num_classes: int, class_names: list[str] | None = None, modality: str | None = None
    ) -> None:
        super().__init__(model)
        self.modality = modality
        self.out_channels = num_classes
        self.channel_names = list(class_names or [f"class_{i}" for i in range(num_classes)])
        if len(self.channel_names) != num_classes:
            raise ValueError(f"{len(self.channel_names)} class names for {num_classes} classes")
        self.head = MultiScaleHead(model.config.dims, model.config.fusion_dim, num_classes)

    def _stages(self, inter: Mapping[str, list[Tensor] | Tensor]) -> list[Tensor]:
        name = self.modality or next(m for m in self.model.config.modality_names if m in inter)
        if name not in inter:
            raise ValueError(f"segmentation head reads modality {name!r}, which is not in the input")
        return inter[name]  # type: ignore[return-value]

    def forward(self, inputs, inputs_after=None):  # noqa: D102
        inter = self.model.forward_intermediates(inputs)
        return self.head(self._stages(inter), inter["fused"])  # type: ignore[arg-type]


class ChangeTask(SegmentationTask):
    """Siamese change detection: shared backbone on both dates, head on [a, b, |a - b|] of every scale."""

    kind = "change"

    def __init__(
        self, model: SkySenseV2, num_classes: int = 2, class_names: list[str] | None = None, modality: str | None = None
    ) -> None:
        super().__init__(model, num_classes, class_names or ["no_change", "change"][:num_classes], modality)
        self.head = MultiScaleHead(tuple(3 * d for d in model.config.dims), 3 * model.config.fusion_dim, num_classes)

    def forward(self, inputs, inputs_after=None):  # noqa: D102
        if inputs_after is None:
            raise ValueError("change detection needs two inputs: before (inputs) and after (inputs_after)")
        a = self.model.forward_intermediates(inputs)
        b = self.model.forward_intermediates(inputs_after)
        # Periods may hold different numbers of dates: compare their temporal means, (B, 1, C, H, W) each.
        sa = [x.mean(dim=1, keepdim=True) for x in self._stages(a)]
        sb = [y.mean(dim=1, keepdim=True) for y in self._stages(b)]
        stages = [torch.cat([x, y, (x - y).abs()], dim=2) for x, y in zip(sa, sb)]
        fa, fb = a["fused"], b["fused"]
        return self.head(stages, torch.cat([fa, fb, (fa - fb).abs()], dim=1))  # type: ignore[list-item]


def build_task(
    kind: str | OutputKind,
    model: SkySenseV2,
    num_classes: int | None = None,
    modality: str | None = None,
    class_names: list[str] | None = None,
    head_state: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> TaskModel:
    """Wrap ``model`` for an output kind; loads ``head_state`` when a trained head is available.

    Args:
        kind: an output kind or its name (:mod:`pipeline.kinds`).
        model: the backbone + fusion.
        num_classes, class_names: classes of a class-score kind.
        modality: whose stage maps feed a segmentation/change head (default: the first present).
        head_state: trained head weights; None initialises the head from ``seed``.
        seed: seed of an untrained head, so resumed jobs and reruns give identical outputs.
        quiet: no warning about an untrained head (describing a model, not running it).

    Raises:
        ValueError: unknown kind or missing class count.
    """
    kind = get_kind(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        task = kind.task(model, num_classes=num_classes, class_names=class_names)
    head = getattr(task, "head", None)
    if modality is not None:
        task.modality = modality  # type: ignore[attr-defined]
    if head is None:
        return task
    if head_state is not None:
        head.load_state_dict(head_state)
    elif not quiet:
        log.warning("%s head is randomly initialised (seed %d): outputs are not meaningful yet", kind.name, seed)
    return task
