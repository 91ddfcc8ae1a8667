"""BigEarthNet v1 patch folders as multi-label samples (19-class nomenclature), S2 and / or S1.

Layout (see :class:`pipeline.train.sources.BigEarthNetSource`): ``<patch>/S1.tif`` (VV, VH dB),
``S2_10m.tif`` / ``S2_20m.tif`` / ``S2_60m.tif`` (L2A x 10000, bands named by their descriptions) and
``labels.json`` (``labels_19``, a split field); ``classes.json`` beside the patches lists the 19 classes. The model's
S2 bands are picked by name from the three resolution files and resampled bilinearly to the 10 m grid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.modalities import ModalitySpec

from .labels import LabelValueError
from .readers import DataBandError, DataReadError, band_indices, canonical_band, parse_date, raster_info, read_window
from .source import ArrayLayer, LabelledSource, Scene, missing_modalities, plan_outputs
from .spec import BigEarthNetSpec
from .splits import SplitError, explicit_split, membership, seeded_rule

S2_FILES = ("S2_10m.tif", "S2_20m.tif", "S2_60m.tif")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataReadError(f"{path}: cannot read the JSON ({err})") from None


def _read_all(path: Path, bands: list[int]) -> np.ndarray:
    h, w = raster_info(str(path)).shape
    return read_window(str(path), bands, 0, 0, h, w).astype(np.float32)


def read_s2(patch: Path, spec: ModalitySpec) -> np.ndarray:
    """(C, H, W) of the model's S2 bands on the 10 m grid of ``S2_10m.tif``, picked by band description."""
    where: dict[str, tuple[Path, int]] = {}
    for name in S2_FILES:
        path = patch / name
        if path.is_file():
            for i, d in enumerate(raster_info(str(path)).descriptions):
                where.setdefault(canonical_band(d), (path, i + 1))
    missing = [b for b in spec.bands if canonical_band(b) not in where]
    if missing:
        raise DataBandError(patch / "S2_*.tif", spec.name, spec.bands, tuple(where))
    shape = raster_info(str(patch / S2_FILES[0])).shape
    out = np.empty((spec.num_bands, *shape), dtype=np.float32)
    for path in dict.fromkeys(where[canonical_band(b)][0] for b in spec.bands):
        idx = [i for i, b in enumerate(spec.bands) if where[canonical_band(b)][0] == path]
        block = torch.from_numpy(_read_all(path, [where[canonical_band(spec.bands[i])][1] for i in idx]))
        if tuple(block.shape[-2:]) != shape:
            block = F.interpolate(block[None], size=shape, mode="bilinear", align_corners=False)[0]
        out[idx] = block.numpy()
    return out


class BigEarthNetLabelled(LabelledSource):
    """Patches as ``multilabel`` samples (float32 multi-hot over the 19 classes), S2 and / or S1 at 10 m.

    Deterministic view: the centred ``size`` px footprint (120 = the whole patch); training: zoom, shift, flips.
    Default split: each patch's ``split_field`` in ``labels.json``.
    """

    task = "multilabel"

    def __init__(self, spec: BigEarthNetSpec, split: str, model_specs: Mapping[str, ModalitySpec], train: bool,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__(spec, split, train)
        root = Path(spec.path)
        if not root.is_dir():
            raise DataReadError(f"bigearthnet folder not found: {root}")
        self.modalities = tuple(spec.modalities or [m for m in ("s2", "s1") if m in model_specs])
        if not self.modalities:
            raise ValueError(f"{spec.path}: BigEarthNet has s2 and s1; the model takes neither {sorted(model_specs)}")
        missing_modalities(list(self.modalities), model_specs, spec.path)
        self.classes = list(_json(root / "classes.json")["classes_19"])
        explicit = any(getattr(spec, s) is not None for s in ("train", "val", "test"))
        here = explicit_split(spec, split, root) if explicit else (root, None)
        patches = [] if here is None else sorted(p.parent for p in here[0].glob("*/labels.json"))
        metas = [_json(p / "labels.json") for p in patches]
        keys = [p.name for p in patches]
        if spec.split is None and not explicit:
            field = spec.split_field
            lacking = [str(p / "labels.json") for p, m in zip(patches, metas) if field not in m]
            if lacking:
                raise SplitError(f"{lacking[0]}: no {field!r} field (and {len(lacking) - 1} more); give a split")
            keep = np.array([m[field] == split for m in metas], dtype=bool)
        else:
            keep, _ = membership(keys, split, seeded_rule(spec, seed), None if here is None else here[1])
        self.patches = [p for p, k in zip(patches, keep) if k]
        self.targets = [self._target(p, m) for p, m, k in zip(patches, metas, keep) if k]
        if self.patches and self.patches[0].joinpath(S2_FILES[0]).is_file():
            gsd = raster_info(str(self.patches[0] / S2_FILES[0])).gsd
        else:
            gsd = None
        gsd = gsd or spec.gsd or 10.0
        self.outputs = plan_outputs(model_specs, {m: gsd for m in self.modalities}, spec.size, spec.path)
        self.side = spec.size * min(o.gsd for o in self.outputs.values()) / gsd
        self.stats.counts = np.sum(self.targets, axis=0).astype(np.int64) if self.targets else np.zeros(19, np.int64)
        self.stats.extra["source_gsd"] = {m: gsd for m in self.modalities}

    def _target(self, patch: Path, meta: Mapping[str, Any]) -> np.ndarray:
        names = meta.get("labels_19", [])
        bad = [n for n in names if n not in self.classes]
        if bad:
            raise LabelValueError(f"{patch / 'labels.json'}: labels {bad} are not among the 19 classes")
        y = np.zeros(len(self.classes), dtype=np.float32)
        y[[self.classes.index(n) for n in names]] = 1.0
        return y

    def __len__(self) -> int:
        return len(self.patches)

    def locate(self, index: int) -> tuple[int, Scene, float | None, float | None]:
        """The patch's layers (decoded) and its multi-hot target."""
        patch = self.patches[index]
        layers = {}
        if "s2" in self.modalities:
            s2 = read_s2(patch, self.outputs["s2"].spec)
            layers[(0, "s2")] = ArrayLayer(s2[None], [parse_date(patch.name)])
        if "s1" in self.modalities:
            info = raster_info(str(patch / "S1.tif"))
            s1 = _read_all(patch / "S1.tif", band_indices(info, self.outputs["s1"].spec, None))
            if layers and s1.shape[-2:] != layers[(0, "s2")].x.shape[-2:]:
                raise DataReadError(f"{patch / 'S1.tif'}: {s1.shape[-2:]} px, S2 is {layers[(0, 's2')].x.shape[-2:]}")
            layers[(0, "s1")] = ArrayLayer(s1[None], [0])
        shape = next(iter(layers.values())).x.shape[-2:]
        target = torch.from_numpy(self.targets[index])
        return index, Scene(patch.name, shape, layers, self.side, target=target), None, None  # type: ignore[arg-type]
