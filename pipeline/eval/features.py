"""Frozen features of a SkySense V2 model for evaluation, taken through the feature API only.

Which feature [ours]: ``fused`` (default) is the fusion module's output map (B, D, Hg, Wg) mean-pooled over its
valid grid cells: the one embedding every downstream job consumes, for any subset of modalities. ``stage4`` is
the backbone's last map averaged over dates and cells (C4 wide, before fusion); ``both`` concatenates the two
after L2-normalising each.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.modalities import ModalitySpec
from pipeline.model import SkySenseV2, create_model
from pipeline.train.data import collate, to_model_inputs
from pipeline.train.sources import ImageFolderSource, Source, list_images

FEATURES = ("fused", "stage4", "both")


def load_model(checkpoint: str | None = None, random_init: str | None = None, seed: int = 0,
               overrides: dict[str, Any] | None = None) -> SkySenseV2:  # fmt: skip
    """A model in eval mode: from a checkpoint, or a configuration randomly initialised with ``seed``."""
    if (checkpoint is None) == (random_init is None):
        raise ValueError("give exactly one of --checkpoint PATH or --random-init MODEL_NAME")
    if checkpoint is not None:
        from pipeline.model.checkpoint import load_checkpoint

        model, _ = load_checkpoint(checkpoint)
    else:
        torch.manual_seed(seed)
        model = create_model(random_init, **(overrides or {}))
    return model.eval()


class SourceDataset(Dataset):
    """Un-augmented samples of one source (evaluation order = source order)."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source.get(index, None)


def pool(inter: dict[str, Any], feature: str) -> torch.Tensor:
    """(B, D) pooled features from ``forward_intermediates`` output (see module docstring)."""
    fused, valid = inter["fused"], inter["valid"]  # (B, D, Hg, Wg), (B, Hg, Wg)
    w = valid[:, None].to(fused.dtype)
    f = (fused * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1.0)
    if feature == "fused":
        return f
    maps = [v[-1].mean(dim=(1, 3, 4)) for k, v in inter.items() if isinstance(v, list)]  # (B, C4) per modality
    s4 = torch.stack(maps).mean(0)
    if feature == "stage4":
        return s4
    if feature == "both":
        return torch.cat([torch.nn.functional.normalize(f, dim=1), torch.nn.functional.normalize(s4, dim=1)], 1)
    raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")


@torch.no_grad()
def extract(model: SkySenseV2, source: Source, feature: str = "fused", batch_size: int = 32, num_workers: int = 0,
            label_key: str = "label") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``(features (N, D) float32, labels (N, ...))`` of every sample of ``source``."""
    loader = DataLoader(SourceDataset(source), batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    device = next(model.parameters()).device
    feats, labels = [], []
    for batch in loader:
        inter = model.forward_intermediates(to_model_inputs(batch, device))
        feats.append(pool(inter, feature).float().cpu())
        labels.append(batch[label_key])
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def class_folder_source(root: str | Path, spec: ModalitySpec, size: int, gsd: float | None) -> ImageFolderSource:
    """Labelled, un-augmented images of a class-per-sub-folder tree."""
    return ImageFolderSource(root, size=size, gsd=gsd, labels=True, spec=spec)


def check_same_classes(train: ImageFolderSource, test: ImageFolderSource) -> None:
    """Train and test folders must name the same classes (labels are sub-folder indices)."""
    if train.classes != test.classes:
        raise ValueError(f"train classes {train.classes} differ from test classes {test.classes}")


def split_class_folders(src: str | Path, out: str | Path, n_train: int, n_test: int | None = None) -> dict[str, Any]:
    """Split a class-per-folder tree into ``out/train`` and ``out/test`` by file-name order, with symlinks.

    The first ``n_train`` images of each class (sorted by name) go to train, the next ``n_test`` (default: the
    rest) to test. For the shared RSSCN7 sample (60 images per class): 40 train / 20 test.
    """
    src, out = Path(src).resolve(), Path(out)
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{src}: no class sub-folders")
    counts: dict[str, list[int]] = {}
    for part in ("train", "test"):
        shutil.rmtree(out / part, ignore_errors=True)
    for c in classes:
        files = list_images(src / c)
        stop = None if n_test is None else n_train + n_test
        for part, chunk in (("train", files[:n_train]), ("test", files[n_train:stop])):
            d = out / part / c
            d.mkdir(parents=True, exist_ok=True)
            for f in chunk:
                os.symlink(f, d / f.name)
        counts[c] = [min(n_train, len(files)), len(files[n_train:stop])]
    (out / "split.json").write_text(json.dumps({"source": str(src), "n_train": n_train, "counts": counts}, indent=1))
    return {"train": str(out / "train"), "test": str(out / "test"), "counts": counts}


def describe(model: SkySenseV2, checkpoint: str | None, random_init: str | None, seed: int) -> str:
    """One line naming the weights being evaluated."""
    what = f"checkpoint {checkpoint}" if checkpoint else f"random init of {random_init} (seed {seed})"
    return f"model {model.config.name} ({what})"


__all__: Sequence[str] = ["FEATURES", "extract", "load_model", "pool", "split_class_folders"]
