"""Data specs of the object-detection formats (``dota``, ``voc``, ``vector_boxes``) -> ``detection`` of HR images."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.spec import TimeRange

from .spec_base import _DataBase, _Strict, absolute_labels


class _BoxesBase(_DataBase):
    """Fields of the object-detection formats (``dota``, ``voc``, ``vector_boxes``) -> ``detection`` of HR images.

    Images are cut into overlapping chips of ``size`` px at the output GSD (:mod:`.boxes`: the supported HR GSD
    nearest the images' median GSD). A spatially blocked ``split`` assigns objects by the block under their centre.

    Attributes:
        size: chip side in pixels at the output GSD (a whole number of 10 m cells: 256 px at 0.3125 m).
        overlap: pixels (at the output GSD) shared by neighbouring chips.
        min_visible: an object with less of its area than this inside a chip is an ignore box in that chip.
        difficult: ``ignore`` difficult objects (neither found nor penalised: the DOTA / VOC evaluation rule) or
            ``train`` on them as on any other.
        select: glob patterns of the image keys this dataset uses (before any split); default every image.
    """

    size: int = Field(256, gt=0, le=8192)
    overlap: int = Field(64, ge=0)
    min_visible: float = Field(0.5, gt=0, le=1)
    difficult: Literal["ignore", "train"] = "ignore"
    select: list[str] | None = Field(None, min_length=1)
    pixel_labels: ClassVar[bool] = True  # objects have places: a spatially blocked split assigns them by centre

    @field_validator("classes")
    @classmethod
    def _names(cls, v: list[str] | dict[int, str] | None) -> list[str] | dict[int, str] | None:
        if isinstance(v, dict):
            raise ValueError("object classes are names (a list), not a value -> name mapping")
        return v

    @model_validator(mode="after")
    def _chips(self) -> _BoxesBase:
        if self.overlap >= self.size:
            raise ValueError(f"overlap {self.overlap} must be less than the chip size {self.size}")
        return self


class DotaSpec(_BoxesBase):
    """DOTA: ``<images>/<name>.png`` + ``<labels>/<name>.txt`` -> oriented boxes.

    Label lines are ``x1 y1 ... x4 y4 class difficult`` after a ``gsd:`` header (:mod:`.dota`). An image's GSD is
    its header's, else the spec's ``gsd``. Sample keys: the image names.

    Attributes:
        images, labels: sub-folders of ``path``.
    """

    format: Literal["dota"] = "dota"
    images: str = "images"
    labels: str = "labelTxt"


class VocSpec(_BoxesBase):
    """Pascal VOC XML -> boxes: DIOR's ``bndbox`` (horizontal), DIOR-R's ``robndbox`` (corners, or cx cy w h angle).

    The images carry no GSD: give ``gsd``. Sample keys: the annotation file stems.

    Attributes:
        images: sub-folder of ``path`` with the images (``<filename>`` of each annotation).
        annotations: sub-folder of ``path`` with the XML files (DIOR-R: ``Annotations/Oriented_Bounding_Boxes``).
    """

    format: Literal["voc"] = "voc"
    images: str = "JPEGImages"
    annotations: str = "Annotations"


class ImageValues(_Strict):
    """How a GeoTIFF's bands become the model's (HR: 8-bit R, G, B).

    Attributes:
        bands: model band -> 1-based source band (``{R: 1, G: 1, B: 1}`` repeats a grey band); default: the first
            bands in order.
        scale, offset: ``value = raw * scale + offset`` (e.g. an 11-bit image to 0-255).
        nodata: raw value of missing pixels (default: the file's).
    """

    bands: dict[str, int] | None = None
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None


class VectorBoxesSpec(_BoxesBase):
    """Georeferenced polygons over a GeoTIFF or a Zarr cube -> their oriented minimum rectangles as boxes.

    ``path`` is the image (a GeoTIFF with a CRS) or the cube; ``labels`` GeoJSON / GeoParquet / GeoPackage in any CRS.

    The scene is one image: splits are spatially blocked (``split.block``, default blocks of one chip).

    Attributes:
        labels: the polygon file.
        class_column: column of class names (default: every polygon is ``classes[0]``, or ``object``).
        image: band mapping and value conversion of a GeoTIFF.
        time, modalities: a cube's dates and groups (default all; see the ``cube`` format).
    """

    format: Literal["vector_boxes"] = "vector_boxes"
    labels: str = Field(min_length=1)
    class_column: str | None = None
    image: ImageValues = ImageValues()
    time: TimeRange | None = None
    modalities: list[str] | None = None

    one_scene: ClassVar[str | None] = "split (spatial blocks)"
    _abs_labels = field_validator("labels")(absolute_labels)

    @model_validator(mode="after")
    def _one_image(self) -> VectorBoxesSpec:
        if self.select is not None:
            raise ValueError("vector_boxes is one scene: select (of images) does not apply")
        return self
