"""DOTA: images with ``labelTxt`` files of oriented quadrilaterals -> detection chips (:mod:`.boxes`).

A label file has optional ``key:value`` header lines (``imagesource:GoogleEarth``, ``gsd:0.2556``) and then one
object per line: ``x1 y1 x2 y2 x3 y3 x4 y4 category difficult`` in pixel coordinates (``difficult`` may be
missing: 0). Each quadrilateral becomes its minimum-area rectangle. A line that is neither a header nor an object
is an error naming the file and the line; so is a category outside the classes. Objects with no area or wholly
outside their image are left out, counted and reported.

GSD of an image: its ``gsd:`` header when it has a number there, else the data spec's ``gsd``; neither is an
error (a wrong scale would train silently wrong sizes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.modalities import ModalitySpec
from pipeline.train.sources import list_images

from .boxes import BoxSource, CachedImageLayer, check_classes, class_index, polygons_to_objects, selected
from .readers import DataReadError, image_size
from .source import Scene
from .spec import DotaSpec
from .splits import SPLIT_INDEX, explicit_split, seeded_rule


@dataclass(frozen=True)
class DotaObject:
    """One label line: its four corners ``(4, 2)``, category, difficult flag and line number."""

    quad: np.ndarray
    name: str
    difficult: bool
    line: int


def parse_dota(path: Path) -> tuple[float | None, list[DotaObject]]:
    """The header GSD (None when absent or ``null``) and the objects of a DOTA label file.

    Raises:
        DataReadError: unreadable file, a malformed line or a bad ``gsd:`` value, naming the file and line.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataReadError(f"{path}: cannot read the label file ({err})") from None
    gsd: float | None = None
    objects = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) == 1 and ":" in line:  # header
            key, _, value = line.partition(":")
            if key.strip().lower() == "gsd" and value.strip().lower() not in ("", "null", "none"):
                try:
                    gsd = float(value)
                except ValueError:
                    raise DataReadError(f"{path}:{n}: gsd {value.strip()!r} is not a number") from None
                if not (math.isfinite(gsd) and gsd > 0):
                    raise DataReadError(f"{path}:{n}: gsd must be a positive number of metres, got {gsd}")
            continue
        if len(parts) not in (9, 10):
            raise DataReadError(f"{path}:{n}: expected 'x1 y1 x2 y2 x3 y3 x4 y4 category [difficult]', got {line!r}")
        try:
            coords = np.array([float(v) for v in parts[:8]]).reshape(4, 2)
            difficult = int(parts[9]) if len(parts) == 10 else 0
        except ValueError:
            raise DataReadError(f"{path}:{n}: coordinates and difficult must be numbers, got {line!r}") from None
        if not np.isfinite(coords).all() or difficult not in (0, 1):
            raise DataReadError(f"{path}:{n}: non-finite coordinates or difficult not 0/1 in {line!r}")
        objects.append(DotaObject(coords, parts[8], bool(difficult), n))
    return gsd, objects


@dataclass(frozen=True)
class DotaImage:
    """One labelled image: its file, its label file, the header GSD and the objects."""

    image: Path
    label: Path
    gsd: float | None
    objects: list[DotaObject]


def dota_images(root: Path, images: str, labels: str) -> dict[str, DotaImage]:
    """``{name: DotaImage}`` of the images under ``root/images`` with a label file in ``root/labels``."""
    folders = (root / images, root / labels)
    for folder, what in zip(folders, ("images", "labels")):
        if not folder.is_dir():
            raise DataReadError(f"dota {what} folder not found: {folder}")
    files = {p.stem: p for p in list_images(folders[0])}
    label_files = {p.stem: p for p in sorted(folders[1].glob("*.txt"))}
    keys = sorted(set(files) & set(label_files))
    if not keys:
        raise DataReadError(f"{root}: no image in {images}/ has a label file in {labels}/")
    return {k: DotaImage(files[k], label_files[k], *parse_dota(label_files[k])) for k in keys}


class DotaSource(BoxSource):
    """``<path>/<images>/<name>.<ext>`` + ``<path>/<labels>/<name>.txt``; samples are chips of the images.

    An explicit split may name a sub-folder of ``path`` with its own ``images``/``labels`` folders, or key patterns.
    """

    def __init__(self, spec: DotaSpec, split: str, model_specs: Mapping[str, ModalitySpec], train: bool,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__(spec, split, train)
        root = Path(spec.path)
        rule = seeded_rule(spec, seed)
        refs = [(root, None)] if rule is not None else [explicit_split(spec, s, root) for s in SPLIT_INDEX]
        here = (root, None) if rule is not None else explicit_split(spec, split, root)
        tables = {r[0]: dota_images(r[0], spec.images, spec.labels) for r in refs if r is not None}
        found = sorted({o.name for t in tables.values() for im in t.values() for o in im.objects})
        self.classes = list(spec.classes) if spec.classes is not None else found
        check_classes(self.classes, str(root))
        hr = model_specs.get("hr")
        table = tables[here[0]] if here is not None else {}
        self.scenes, gsds = [], []
        for k in selected(list(table), spec.select):
            im = table[k]
            gsd = im.gsd or spec.gsd
            if gsd is None:
                raise DataReadError(f"{im.label}: no gsd header and no gsd in the data spec: declare the images' "
                                    "ground sampling distance (metres per pixel)")  # fmt: skip
            shape = image_size(im.image)
            where = [f"{im.label}:{o.line}" for o in im.objects]
            names = [class_index(self.classes, o.name, w) for o, w in zip(im.objects, where)]
            ignore = [o.difficult and spec.difficult == "ignore" for o in im.objects]
            quads = np.stack([o.quad for o in im.objects]) if im.objects else np.zeros((0, 4, 2))
            objects = polygons_to_objects(quads, names, ignore, shape, where, self.skipped)
            layers = {(0, "hr"): CachedImageLayer(im.image, hr)} if hr is not None else {}
            self.scenes.append(Scene(k, shape, layers, 0.0, target=objects))  # type: ignore[arg-type]
            gsds.append(gsd)
        out = self.plan(model_specs, gsds)
        for scene, g in zip(self.scenes, gsds):
            scene.side = spec.size * out / g
        self.index(np.ones(len(self.scenes), dtype=bool), seed, None if here is None else here[1])
