"""Folder layouts of HR RGB images: one sub-folder per class (RSSCN7), and change pairs ``A/``, ``B/``, ``label/``."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.modalities import ModalitySpec
from pipeline.train.sources import list_images

from .geometry import View, crop, layer_box
from .labels import LabelMap
from .readers import DataReadError, image_size, read_mask, read_rgb, rgb_indices
from .source import ArrayLabel, ArrayLayer, LabelledSource, Scene, WindowedSource, plan_outputs
from .spec import ChangeFoldersSpec, ClassFoldersSpec
from .splits import SplitError, explicit_split, membership, seeded_rule

log = logging.getLogger(__name__)


def _folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataReadError(f"{what} folder not found: {path}")
    return path


def _hr(model_specs: Mapping[str, ModalitySpec], where: str) -> ModalitySpec:
    if "hr" not in model_specs:
        raise ValueError(f"{where}: RGB images are the 'hr' modality; the model takes only {sorted(model_specs)}")
    return model_specs["hr"]


class ClassFoldersSource(LabelledSource):
    """``<path>/<class>/**/<image>``: scene classification of HR RGB images (label: class index, int64 ``()``).

    Samples are images; the deterministic view is the centred ``size`` px footprint (the whole image when it is
    smaller: padding is invalid), a training view zooms per ``scale``, moves anywhere in the image and flips.
    """

    task = "classification"
    modalities = ("hr",)

    def __init__(self, spec: ClassFoldersSpec, split: str, model_specs: Mapping[str, ModalitySpec], train: bool,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__(spec, split, train)
        root = _folder(Path(spec.path), "class_folders")
        hr = _hr(model_specs, spec.path)
        rule = seeded_rule(spec, seed)
        explicit = [explicit_split(spec, s, root) for s in ("train", "val", "test")]
        roots = [root] if rule is not None else [r[0] for r in explicit if r is not None]
        folders = sorted({p.name for r in dict.fromkeys(roots) for p in r.iterdir() if p.is_dir()})
        self.classes = list(spec.classes) if spec.classes is not None else folders
        if not self.classes:
            raise DataReadError(f"{root}: no class sub-folders")
        here = explicit_split(spec, split, root) if rule is None else (root, None)
        files: list[Path] = []
        labels: list[int] = []
        keys: list[str] = []
        split_root = here[0] if here is not None else root
        for c, name in enumerate(self.classes if here is not None else ()):
            folder = split_root / name
            if not folder.is_dir():
                if rule is not None or split_root == root:
                    raise DataReadError(f"class folder {folder} not found (classes: {self.classes})")
                continue  # an explicit split folder may lack a class
            images = list_images(folder)
            if not images:
                raise DataReadError(f"class folder {folder} holds no images")
            files += images
            labels += [c] * len(images)
            keys += [f"{name}/{p.relative_to(folder).as_posix()}" for p in images]
        if here is None:
            keep = np.zeros(len(keys), dtype=bool)
        else:
            keep, _ = membership(keys, split, rule, here[1], groups=labels)
        self.files = [f for f, k in zip(files, keep) if k]
        self.labels = [lab for lab, k in zip(labels, keep) if k]
        self.keys = [key for key, k in zip(keys, keep) if k]
        if files:
            rgb_indices(files[0], hr)  # a model that wants NIR fails here, not in a DataLoader worker
        gsd = spec.gsd or hr.gsd
        self.outputs = plan_outputs({"hr": hr}, {"hr": gsd}, spec.size, spec.path)
        self.side = spec.size * self.outputs["hr"].gsd / gsd
        self.stats.counts = np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.classes))
        self.stats.extra["source_gsd"] = {"hr": gsd}

    def __len__(self) -> int:
        return len(self.files)

    def locate(self, index: int) -> tuple[int, Scene, float | None, float | None]:
        """The decoded image as a scene with its class as target."""
        x = read_rgb(self.files[index], self.outputs["hr"].spec)[None]  # (1, C, H, W)
        layers = {(0, "hr"): ArrayLayer(x, [0])}
        target = torch.tensor(self.labels[index], dtype=torch.long)
        return index, Scene(self.keys[index], x.shape[-2:], layers, self.side, target=target), None, None


@dataclass
class ImageLayer:
    """An RGB image file read when a sample needs it."""

    path: Path
    spec: ModalitySpec
    ratio: float = 1.0

    def read(self, view: View, rng: np.random.Generator | None) -> tuple[np.ndarray, list[int]]:
        """The view's box as (1, C, n, n) (NaN outside the image)."""
        return crop(read_rgb(self.path, self.spec)[None], *layer_box(view, self.ratio), fill=math.nan), [0]


@dataclass
class MaskLabel:
    """A single-channel label image, mapped to class indices when read."""

    path: Path
    labels: LabelMap

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """The box of class indices (IGNORE outside)."""
        return ArrayLabel(self.labels.apply(read_mask(self.path), str(self.path))).read(y0, x0, h, w)


DEFAULT_CHANGE_CLASSES = {0: "no_change", 255: "change"}


class ChangeFoldersSource(WindowedSource):
    """``A/<name>``, ``B/<name>``, ``label/<name>`` (LEVIR-CD, DSIFN-CD): two HR periods and a change mask.

    Pairs are matched by file stem. Samples are windows of the sample footprint over each pair (see
    :class:`~.source.WindowedSource`); a seeded split assigns pairs (or, with ``block``, blocks of pairs).
    """

    task = "change"
    modalities = ("hr",)

    def __init__(self, spec: ChangeFoldersSpec, split: str, model_specs: Mapping[str, ModalitySpec], train: bool,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__(spec, split, train)
        root = _folder(Path(spec.path), "change_folders")
        hr = _hr(model_specs, spec.path)
        rule = seeded_rule(spec, seed)
        here = (root, None) if rule is not None else explicit_split(spec, split, root)
        classes = spec.classes if spec.classes is not None else DEFAULT_CHANGE_CLASSES
        self.labels = LabelMap.build(classes, spec.label_nodata)
        self.classes = list(self.labels.names)
        gsd = spec.gsd or hr.gsd
        self.outputs = plan_outputs({"hr": hr}, {"hr": gsd}, spec.size, spec.path)
        side = spec.size * self.outputs["hr"].gsd / gsd
        self.scenes = [] if here is None else self._pairs(here[0], hr, side)
        keys = [s.key for s in self.scenes]
        if here is not None and here[1] is not None and not keys:
            raise SplitError(f"{split}: no change pairs under {here[0]}")
        in_split, self.blocks = membership(keys, split, rule, None if here is None else here[1],
                                           shapes=[s.shape for s in self.scenes])  # fmt: skip
        self.index(list(in_split))
        self.stats.extra["source_gsd"] = {"hr": gsd}

    def _pairs(self, root: Path, hr: ModalitySpec, side: float) -> list[Scene]:
        spec: Any = self.spec
        roles = (("before", spec.before), ("after", spec.after), ("label", spec.label))
        folders = [_folder(root / sub, f"change_folders {role}") for role, sub in roles]
        a, b, lab = ({p.stem: p for p in list_images(f)} for f in folders)
        names = sorted(set(a) & set(b) & set(lab))
        incomplete = sorted((set(a) | set(b) | set(lab)) - set(names))
        if incomplete:
            log.warning("%s: %d names without all of A/B/label are left out, e.g. %s", root, len(incomplete),
                        incomplete[:3])  # fmt: skip
            self.stats.extra["incomplete"] = len(incomplete)
        if names:
            rgb_indices(a[names[0]], hr)
        scenes = []
        for n in names:
            shape = image_size(lab[n])
            for p in (a[n], b[n]):
                if image_size(p) != shape:
                    raise DataReadError(f"{p}: size {image_size(p)} differs from its label {lab[n]} {shape}")
            layers = {(0, "hr"): ImageLayer(a[n], hr), (1, "hr"): ImageLayer(b[n], hr)}
            scenes.append(Scene(n, shape, layers, side, label=MaskLabel(lab[n], self.labels)))  # type: ignore[arg-type]
        return scenes
