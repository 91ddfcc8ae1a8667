"""The labelled sample every fine-tuning data adapter returns, and how a batch of them becomes model inputs.

A sample is a plain dict (so DataLoader workers can pickle it)::

    {
      "periods": [ {modality: {"x": (T, C, H, W) float32 normalised, "doy": (T,) int64, "valid": (T, H, W) bool,
                               "gsd": () float32}, ...},          # one dict per period: 1, or 2 for change
                   ... ],
      "label":   int64 ()           class index (classification)
                 float32 (K,)       multi-hot (multilabel)
                 int64 (H, W)       class per pixel, IGNORE where unlabelled (segmentation, change)
                 float32 (H, W)     value per pixel, NaN where unlabelled (regression)
                 {"boxes": float32 (N, 5), "classes": int64 (N,), "ignore": bool (N,)}   objects (detection)
    }

Detection labels are the sample's ``N`` objects (any number, 0 included): oriented boxes ``(cx, cy, w, h, angle)`` in
pixels of the finest modality (:mod:`pipeline.geometry.boxes`' convention; horizontal boxes have angle 0), their
class indices, and ``ignore``: boxes that are neither to be found nor penalised (difficult objects, objects mostly
cut off by the sample's border, objects of another split of a spatially blocked split). :func:`collate` pads them
to the batch's largest ``N``: ``boxes (B, M, 5)``, ``classes (B, M)`` with IGNORE on padding rows, ``ignore
(B, M)``.

Modality entries are made with :func:`pipeline.train.sources.modality_entry` (normalised with the model's
:class:`~pipeline.modalities.ModalitySpec`, invalid pixels zero and marked). All modalities of a sample cover the
same ground; a pixel label mask is on the grid of the sample's **finest** modality (HR pixels when HR is present,
else 10 m), so segmentation maps come out at the finest input resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pipeline.model.skysense import ModalityInput

IGNORE = -1
"""Label value of unlabelled pixels (label nodata of any source is mapped to it); ignored by losses and metrics."""

Sample = dict[str, Any]


def collate_boxes(labels: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Detection labels of a batch padded to its largest object count (padding rows: class IGNORE, ignored)."""
    m = max((len(lab["classes"]) for lab in labels), default=0)
    boxes = torch.zeros(len(labels), m, 5, dtype=torch.float32)
    classes = torch.full((len(labels), m), IGNORE, dtype=torch.long)
    ignore = torch.ones(len(labels), m, dtype=torch.bool)
    for i, lab in enumerate(labels):
        n = len(lab["classes"])
        boxes[i, :n], classes[i, :n], ignore[i, :n] = lab["boxes"], lab["classes"], lab["ignore"]
    return {"boxes": boxes, "classes": classes, "ignore": ignore}


def to_device(label: Tensor | Mapping[str, Tensor], device: torch.device | str) -> Any:
    """A collated label (a tensor, or detection's dict of tensors) on ``device``."""
    if isinstance(label, Mapping):
        return {k: v.to(device) for k, v in label.items()}
    return label.to(device)


def collate(samples: Sequence[Sample]) -> dict[str, Any]:
    """Stack samples of one source: ``{"periods": [{modality: {field: (B, ...)}}], "label": (B, ...)}``.

    Detection labels (dicts) are padded by :func:`collate_boxes`.
    """
    n_periods = len(samples[0]["periods"])
    keys = [set(p) for p in samples[0]["periods"]]
    for s in samples:
        if [set(p) for p in s["periods"]] != keys:
            raise ValueError("a batch mixes samples with different modalities or periods")
    periods = []
    for i in range(n_periods):
        periods.append(
            {m: {f: torch.stack([s["periods"][i][m][f] for s in samples]) for f in samples[0]["periods"][i][m]}
             for m in samples[0]["periods"][i]}
        )  # fmt: skip
    if isinstance(samples[0]["label"], Mapping):
        return {"periods": periods, "label": collate_boxes([s["label"] for s in samples])}
    return {"periods": periods, "label": torch.stack([torch.as_tensor(s["label"]) for s in samples])}


def period_inputs(period: Mapping[str, Mapping[str, Tensor]], device: torch.device | str) -> dict[str, ModalityInput]:
    """One collated period -> ``{modality: ModalityInput}`` on ``device``."""
    out = {}
    for name, v in period.items():
        gsd = v["gsd"]
        if not torch.all(gsd == gsd[0]):
            raise ValueError(f"modality {name!r}: samples of one batch have different GSDs {gsd.tolist()}")
        out[name] = ModalityInput(
            x=v["x"].to(device, non_blocking=True), doy=v["doy"].to(device, non_blocking=True),
            valid=v["valid"].to(device, non_blocking=True), gsd=float(gsd[0]),
        )  # fmt: skip
    return out


def batch_inputs(batch: Mapping[str, Any], device: torch.device | str) -> list[dict[str, ModalityInput]]:
    """Every period of a collated batch as model inputs."""
    return [period_inputs(p, device) for p in batch["periods"]]
