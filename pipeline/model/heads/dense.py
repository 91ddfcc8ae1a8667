"""Dense heads: per-pixel class scores (segmentation, change) and values (regression) at the finest input resolution.

The decoder is the feature-pyramid part of UPerNet [ours: without its pyramid-pooling module]: lateral 1x1
convolutions of the 4 stage maps, a top-down path (each level plus the upsampled coarser one), the fused embedding
map joining at the coarsest (10 m grid) level, 3x3 smoothing per level, all levels upsampled to the finest stage
and fused by a 3x3 convolution, a 1x1 classifier, then bilinear upsampling by the tokenizer's patch size to input
pixels. So HR inputs give HR-resolution maps (stage 1 is at 1/4 of the HR pixels) and S2/S1 inputs 10 m maps.
UPerNet's pyramid pooling is left out on purpose: its global average pooling makes every output pixel depend on
the whole tile, which would put seams into tiled region maps; every layer here is local, so with the backbone's
local context a pixel's score depends only on its surroundings.

Change detection is siamese: the shared backbone runs on both periods; each level gets ``[a, b, |a - b|]`` of the
two periods' (temporal-mean) maps, so periods may hold different numbers of dates.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..skysense import SkySenseV2
from .base import Inputs, TaskModel, output_size, pyramid


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.GELU())


class PyramidDecoder(nn.Module):
    """FPN over the 4 stage maps plus the fused map -> ``out_channels`` scores at the finest stage's resolution.

    Args:
        stage_dims: channels of the 4 stage maps (times ``in_mult`` for siamese inputs).
        fused_dim: channels of the fused map.
        out_channels: classes (or regression targets).
        width: decoder channels.
    """

    def __init__(self, stage_dims: tuple[int, ...], fused_dim: int, out_channels: int, width: int = 128) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in stage_dims)
        self.fused = nn.Conv2d(fused_dim, width, 1)
        self.smooth = nn.ModuleList(_conv_block(width, width) for _ in stage_dims)
        self.fuse = _conv_block(len(stage_dims) * width, width)
        self.classifier = nn.Conv2d(width, out_channels, 1)

    def forward(self, levels: list[Tensor], fused: Tensor) -> Tensor:
        """levels: 4 x (B, C_s, H_s, W_s), finest first; fused: (B, D, Hg, Wg) -> (B, K, H_1, W_1)."""
        lat = [conv(x) for conv, x in zip(self.lateral, levels)]
        lat[-1] = lat[-1] + F.interpolate(self.fused(fused), size=lat[-1].shape[-2:], mode="bilinear")
        for s in range(len(lat) - 2, -1, -1):  # top-down: coarse context into finer levels
            lat[s] = lat[s] + F.interpolate(lat[s + 1], size=lat[s].shape[-2:], mode="bilinear")
        size = lat[0].shape[-2:]
        outs = [smooth(x) for smooth, x in zip(self.smooth, lat)]
        outs = [x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear") for x in outs]
        return self.classifier(self.fuse(torch.cat(outs, dim=1)))


class SegmentationTask(TaskModel):
    """Per-pixel class scores at the finest input resolution.

    Args:
        model: the backbone + fusion.
        num_classes: output classes.
        class_names: their names (default ``class_<i>``).
        width: decoder channels.
    """

    kind = "segmentation"
    siamese = False

    def __init__(self, model: SkySenseV2, num_classes: int, class_names: list[str] | None = None, width: int = 128):
        super().__init__(model)
        self.out_channels, self.width = num_classes, width
        self.channel_names = list(class_names or [f"class_{i}" for i in range(num_classes)])
        if len(self.channel_names) != num_classes:
            raise ValueError(f"{len(self.channel_names)} class names for {num_classes} classes")
        mult = 3 if self.siamese else 1
        dims = tuple(mult * d for d in model.config.dims)
        self.head = PyramidDecoder(dims, mult * model.config.fusion_dim, num_classes, width)

    def head_config(self) -> dict[str, Any]:  # noqa: D102
        return {"width": self.width}

    def forward(self, inputs: Inputs, inputs_after: Inputs | None = None) -> Tensor:  # noqa: D102
        inter = self.model.forward_intermediates(inputs)
        scores = self.head(pyramid(inter), inter["fused"])  # type: ignore[arg-type]
        return F.interpolate(scores, size=output_size(inputs), mode="bilinear")


class ChangeTask(SegmentationTask):
    """Siamese change detection: shared backbone on both periods, the decoder on ``[a, b, |a - b|]`` of each level."""

    kind = "change"
    siamese = True

    def __init__(self, model: SkySenseV2, num_classes: int = 2, class_names: list[str] | None = None, width: int = 128):
        super().__init__(model, num_classes, class_names or ["no_change", "change"][:num_classes], width)

    def forward(self, inputs: Inputs, inputs_after: Inputs | None = None) -> Tensor:  # noqa: D102
        if inputs_after is None:
            raise ValueError("change detection needs two inputs: before (inputs) and after (inputs_after)")
        a = self.model.forward_intermediates(inputs)
        b = self.model.forward_intermediates(inputs_after)
        levels = [torch.cat([x, y, (x - y).abs()], dim=1) for x, y in zip(pyramid(a), pyramid(b))]
        fa, fb = a["fused"], b["fused"]
        scores = self.head(levels, torch.cat([fa, fb, (fa - fb).abs()], dim=1))  # type: ignore[list-item]
        return F.interpolate(scores, size=output_size(inputs), mode="bilinear")


class RegressionTask(SegmentationTask):
    """Per-pixel values (e.g. a continuous index) at the finest input resolution: the same decoder, no classes."""

    kind = "regression"

    def __init__(self, model: SkySenseV2, num_classes: int = 1, class_names: list[str] | None = None, width: int = 128):
        names = class_names or (["value"] if num_classes == 1 else [f"value_{i}" for i in range(num_classes)])
        super().__init__(model, num_classes, names, width)
