"""Image rasters paired with label rasters by a key in their file names (Sen1Floods11, SMAGNet): segmentation.

The label raster's grid is the reference; each modality raster covers the same ground on the same or an
integer-ratio pixel grid (checked, and against the georeference when both have one). Bands are mapped to the
model's bands per file (:func:`~.readers.band_indices`), values converted to the modality's units with the spec's
``scale`` / ``offset``, nodata (the spec's or the file's) and NaN become invalid pixels.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.modalities import ModalitySpec

from .labels import LabelMap, parse_classes_tag, regression_values
from .readers import DataReadError, RasterInfo, band_indices, raster_info, read_band, read_window
from .source import RasterLayer, Scene, WindowedSource, missing_modalities, plan_outputs
from .spec import RasterPairsSpec
from .splits import SPLIT_INDEX, explicit_split, membership, seeded_rule

log = logging.getLogger(__name__)


@dataclass
class RasterLabelLayer:
    """One band of a label raster, mapped when read (class indices / IGNORE, or values / NaN)."""

    path: str
    band: int
    mapper: Callable[[np.ndarray, str], np.ndarray]

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """The box, mapped (outside the raster: unlabelled)."""
        return self.mapper(read_window(self.path, [self.band], y0, x0, h, w)[0], self.path)


def pair_files(root: Path, pattern: str, key: re.Pattern[str]) -> dict[str, Path]:
    """``{key: file}`` of the files matching ``pattern`` under ``root``; two files with one key are an error."""
    out: dict[str, Path] = {}
    for p in sorted(root.glob(pattern)):
        if not p.is_file():
            continue
        m = key.search(p.stem)
        if m is None:
            continue
        k = m.group("key") if "key" in key.groupindex else (m.group(1) if key.groups else m.group(0))
        if k in out:
            raise DataReadError(f"{out[k]} and {p} have the same key {k!r}; make the key regex tell them apart")
        out[k] = p
    return out


def _bounds(info: RasterInfo) -> tuple[float, float, float, float]:
    t, (h, w) = info.transform, info.shape
    return t.c, t.f + t.e * h, t.c + t.a * w, t.f


class RasterPairsSource(WindowedSource):
    """Samples are windows of the footprint over each chip; a seeded split assigns chips (or blocks of chips)."""

    def __init__(self, spec: RasterPairsSpec, split: str, model_specs: Mapping[str, ModalitySpec], train: bool,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__(spec, split, train)
        self.task = spec.task
        root = Path(spec.path)
        if not root.is_dir():
            raise DataReadError(f"raster_pairs folder not found: {root}")
        missing_modalities(list(spec.modalities), model_specs, spec.path)
        self.modalities = tuple(spec.modalities)
        self.key = re.compile(spec.key)
        rule = seeded_rule(spec, seed)
        roots = [root] if rule is not None else [r[0] for s in SPLIT_INDEX if (r := explicit_split(spec, s, root))]
        here = (root, None) if rule is not None else explicit_split(spec, split, root)
        self.labels = self._label_map([p for r in dict.fromkeys(roots) for p in self._labels(r).values()])
        self.classes = None if self.labels is None else list(self.labels.names)
        self.scenes = [] if here is None else self._scenes(here[0], model_specs)
        in_split, self.blocks = membership([s.key for s in self.scenes], split, rule, None if here is None else here[1],
                                           shapes=[s.shape for s in self.scenes])  # fmt: skip
        self.index(list(in_split))

    def _labels(self, root: Path) -> dict[str, Path]:
        return pair_files(root, self.spec.label.glob, self.key)

    def _label_map(self, files: list[Path]) -> LabelMap | None:
        """The class map (None for regression); without declared classes, the values found in every label file."""
        if self.task == "regression":
            return None
        found: set[float] = set()
        named = parse_classes_tag(raster_info(str(files[0])).tags.get("classes")) if files else {}
        if self.spec.classes is None:
            for f in files:
                found |= set(np.unique(read_band(str(f), self.spec.label.band)).tolist())
        return LabelMap.build(self.spec.classes, self.spec.label_nodata, found, named)

    def _map(self, raw: np.ndarray, where: str) -> np.ndarray:
        if self.labels is None:
            return regression_values(raw, self.label_nodata)
        return self.labels.apply(raw, where)

    def _scenes(self, root: Path, model_specs: Mapping[str, ModalitySpec]) -> list[Scene]:
        spec: RasterPairsSpec = self.spec
        labels = self._labels(root)
        files = {m: pair_files(root, ms.glob, self.key) for m, ms in spec.modalities.items()}
        keys = sorted(set(labels).intersection(*files.values()))
        incomplete = sorted((set(labels).union(*files.values())) - set(keys))
        if incomplete:
            log.warning("%s: %d keys without a label and every modality are left out, e.g. %s", root,
                        len(incomplete), incomplete[:3])  # fmt: skip
            self.stats.extra["incomplete"] = len(incomplete)
        if not keys:
            globs = {m: ms.glob for m, ms in spec.modalities.items()} | {"label": spec.label.glob}
            raise DataReadError(f"{root}: no complete raster pairs for globs {globs} with key regex {spec.key!r}")
        scenes = []
        for k in keys:
            linfo = raster_info(str(labels[k]))
            layers, gsd = {}, {}
            for m, ms in spec.modalities.items():
                info = raster_info(str(files[m][k]))
                ratio = self._ratio(info, linfo)
                bands = band_indices(info, model_specs[m], ms.bands)
                nodata = ms.nodata if ms.nodata is not None else info.nodata
                layers[(0, m)] = RasterLayer(info.path, bands, ratio, info.doy, nodata, ms.scale, ms.offset)
                gsd[m] = ratio
            ref_gsd = linfo.gsd or spec.gsd or min(model_specs[m].gsd * r for m, r in gsd.items())
            gsd = {m: ref_gsd / r for m, r in gsd.items()}
            if not scenes:
                self.outputs = plan_outputs(model_specs, gsd, spec.size, spec.path)
                self.stats.extra["source_gsd"] = gsd
            fine = min(o.gsd for o in self.outputs.values())
            quantum = max(1.0, *(1 / layer.ratio for layer in layers.values()))
            georef = (linfo.crs, linfo.transform) if linfo.crs else None
            label = RasterLabelLayer(linfo.path, spec.label.band, self._map)
            scenes.append(Scene(k, linfo.shape, layers, spec.size * fine / ref_gsd, label, None, georef, quantum))
        return scenes

    @staticmethod
    def _ratio(info: RasterInfo, label: RasterInfo) -> float:
        """Pixels of ``info`` per label pixel; the rasters must cover the same ground."""
        ry, rx = info.shape[0] / label.shape[0], info.shape[1] / label.shape[1]
        if abs(ry - rx) > 1e-6 or (ry < 1 and abs(1 / ry - round(1 / ry)) > 1e-6) or (ry >= 1 and ry != round(ry)):
            raise DataReadError(
                f"{info.path}: {info.shape} px does not nest in the label grid {label.shape} of {label.path}"
            )
        if info.crs and label.crs:
            from rasterio.crs import CRS

            if info.crs != label.crs and CRS.from_wkt(info.crs) != CRS.from_wkt(label.crs):
                raise DataReadError(f"{info.path}: its CRS differs from the label {label.path}'s; reproject it")
            a, b = _bounds(info), _bounds(label)
            tol = abs(label.transform.a) / 2
            if max(abs(u - v) for u, v in zip(a, b)) > tol:
                raise DataReadError(f"{info.path}: bounds {a} differ from the label {label.path} bounds {b}")
        return ry
