"""Pascal VOC XML annotations (DIOR horizontal boxes, DIOR-R oriented boxes) -> detection chips (:mod:`.boxes`).

Per ``<object>``: ``<name>``, ``<difficult>`` (default 0) and one box:

* ``<bndbox>`` ``xmin ymin xmax ymax``: a horizontal box (DIOR);
* ``<robndbox>`` with the four corners ``x_left_top y_left_top x_right_top ... y_left_bottom`` (DIOR-R; its
  ``<angle>`` is implied by the corners), or ``cx cy w h angle`` (roLabelImg; angle in radians, clockwise).

``<size>`` must match the image. Malformed XML, a missing field or a non-number is an error naming the file and
the object; a class outside the classes is an error too. VOC images carry no GSD: the data spec's ``gsd`` is
required.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.geometry.boxes import obb_to_polygons
from pipeline.modalities import ModalitySpec

from .boxes import BoxSource, CachedImageLayer, check_classes, class_index, polygons_to_objects, selected
from .readers import DataReadError, image_size
from .source import Scene
from .spec import VocSpec
from .splits import SPLIT_INDEX, explicit_split, seeded_rule

CORNERS = ("x_left_top", "y_left_top", "x_right_top", "y_right_top", "x_right_bottom", "y_right_bottom",
           "x_left_bottom", "y_left_bottom")  # fmt: skip


@dataclass(frozen=True)
class VocObject:
    """One ``<object>``: its polygon ``(4, 2)``, name, difficult flag and position in the file (1-based)."""

    quad: np.ndarray
    name: str
    difficult: bool
    index: int


@dataclass(frozen=True)
class VocAnnotation:
    """One annotation file: the image file it names, the declared size (H, W) if any, and its objects."""

    path: Path
    filename: str | None
    size: tuple[int, int] | None
    objects: list[VocObject]


def _number(node: ET.Element, tag: str, where: str) -> float:
    child = node.find(tag)
    if child is None or child.text is None:
        raise DataReadError(f"{where}: <{tag}> missing")
    try:
        value = float(child.text.strip())
    except ValueError:
        raise DataReadError(f"{where}: <{tag}> is not a number: {child.text.strip()!r}") from None
    if not math.isfinite(value):
        raise DataReadError(f"{where}: <{tag}> is not finite")
    return value


def parse_voc(path: Path) -> VocAnnotation:
    """Read one VOC XML file (see the module docstring).

    Raises:
        DataReadError: unreadable or malformed XML, naming the file (and the object).
    """
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        raise DataReadError(f"{path}: not a readable VOC XML file ({err})") from None
    filename = (root.findtext("filename") or "").strip() or None
    size = None
    node = root.find("size")
    if node is not None and node.find("width") is not None:
        size = (int(_number(node, "height", f"{path} <size>")), int(_number(node, "width", f"{path} <size>")))
    objects = []
    for i, obj in enumerate(root.iter("object"), start=1):
        where = f"{path} object {i}"
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataReadError(f"{where}: <name> missing")
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise DataReadError(f"{where}: <difficult> must be 0 or 1, got {difficult!r}")
        rob, bnd = obj.find("robndbox"), obj.find("bndbox")
        if rob is not None and rob.find("x_left_top") is not None:
            quad = np.array([_number(rob, t, where) for t in CORNERS]).reshape(4, 2)
        elif rob is not None:
            box = [_number(rob, t, where) for t in ("cx", "cy", "w", "h", "angle")]
            quad = obb_to_polygons(np.array([box]))[0]
        elif bnd is not None:
            x0, y0, x1, y1 = (_number(bnd, t, where) for t in ("xmin", "ymin", "xmax", "ymax"))
            quad = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        else:
            raise DataReadError(f"{where}: no <bndbox> or <robndbox>")
        objects.append(VocObject(quad, name, difficult == "1", i))
    return VocAnnotation(path, filename, size, objects)


class VocSource(BoxSource):
    """``<path>/<annotations>/<key>.xml`` + the images they name in ``<path>/<images>``; samples are chips."""

    def __init__(self, spec: VocSpec, split: str, model_specs: Mapping[str, ModalitySpec], train: bool,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__(spec, split, train)
        root = Path(spec.path)
        if spec.gsd is None:
            raise DataReadError(f"{root}: VOC images carry no GSD; declare gsd (metres per pixel) in the data spec")
        rule = seeded_rule(spec, seed)
        refs = [(root, None)] if rule is not None else [explicit_split(spec, s, root) for s in SPLIT_INDEX]
        here = (root, None) if rule is not None else explicit_split(spec, split, root)
        tables = {r[0]: self._annotations(r[0]) for r in refs if r is not None}
        found = sorted({o.name for t in tables.values() for a, _ in t.values() for o in a.objects})
        self.classes = list(spec.classes) if spec.classes is not None else found
        check_classes(self.classes, str(root))
        hr = model_specs.get("hr")
        self.scenes = []
        table = tables[here[0]] if here is not None else {}
        for key in selected(list(table), spec.select):
            ann, image = table[key]
            shape = image_size(image)
            if ann.size is not None and ann.size != shape:
                raise DataReadError(f"{ann.path}: <size> says {ann.size[1]} x {ann.size[0]} px, but {image} is "
                                    f"{shape[1]} x {shape[0]} px")  # fmt: skip
            where = [f"{ann.path} object {o.index}" for o in ann.objects]
            names = [class_index(self.classes, o.name, w) for o, w in zip(ann.objects, where)]
            ignore = [o.difficult and spec.difficult == "ignore" for o in ann.objects]
            quads = np.stack([o.quad for o in ann.objects]) if ann.objects else np.zeros((0, 4, 2))
            objects = polygons_to_objects(quads, names, ignore, shape, where, self.skipped)
            layers = {(0, "hr"): CachedImageLayer(image, hr)} if hr is not None else {}
            self.scenes.append(Scene(key, shape, layers, 0.0, target=objects))  # type: ignore[arg-type]
        out = self.plan(model_specs, [spec.gsd] * len(self.scenes))
        for scene in self.scenes:
            scene.side = spec.size * out / spec.gsd
        self.index(np.ones(len(self.scenes), dtype=bool), seed, None if here is None else here[1])

    def _annotations(self, root: Path) -> dict[str, tuple[VocAnnotation, Path]]:
        """``{key: (annotation, image file)}`` under ``root``."""
        spec: VocSpec = self.spec
        folders = (root / spec.annotations, root / spec.images)
        for folder, what in zip(folders, ("annotations", "images")):
            if not folder.is_dir():
                raise DataReadError(f"voc {what} folder not found: {folder}")
        out = {}
        for xml in sorted(folders[0].glob("*.xml")):
            ann = parse_voc(xml)
            image = folders[1] / (ann.filename or f"{xml.stem}.jpg")
            if not image.is_file():
                candidates = sorted(folders[1].glob(f"{xml.stem}.*"))
                if not candidates:
                    raise DataReadError(f"{xml}: its image {image.name} is not in {folders[1]}")
                image = candidates[0]
            out[xml.stem] = (ann, image)
        if not out:
            raise DataReadError(f"{folders[0]}: no VOC .xml annotations")
        return out
