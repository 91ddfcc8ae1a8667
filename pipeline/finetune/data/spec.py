"""The data spec of a fine-tuning task: one typed model per on-disk format, validated once at the edge.

Example (a task's ``data:`` entries)::

    - format: class_folders                # RSSCN7: one sub-folder of RGB images per class
      path: ../shared/data/rsscn7
      size: 128
      gsd: 1.0
      scale: [0.5, 2.0]
      split: {seed: 0, fractions: [0.8, 0.1, 0.1]}
    - format: raster_pairs                 # Sen1Floods11: S2Hand/, S1Hand/, LabelHand/
      path: ../shared/data/sen1floods11
      modalities:
        s2: {glob: "S2Hand/*.tif"}         # bands matched by description (B2 == B02)
        s1: {glob: "S1Hand/*.tif"}
      label: {glob: "LabelHand/*.tif"}
      classes: {0: dry, 1: water}
      label_nodata: [-1]
      size: 64
      split: {seed: 0, fractions: [0.6, 0.2, 0.2], block: 128, gap: 8}
    - format: cube                         # a cube built by ``skypipe cube build`` + land-cover polygons
      path: outputs/slovenia.zarr
      labels: ../shared/data/eolearn_slovenia/lulc_polygons.gpkg
      class_column: LULC_ID
      name_column: LULC_NAME
      label_nodata: [0]
    - format: dota                         # object boxes: DOTA images/ + labelTxt/ (voc, vector_boxes alike)
      path: ../shared/data/detection/dota
      classes: [ship, harbor]
      size: 256
      split: {fractions: [0.7, 0.1, 0.2], block: 320, gap: 16}

Relative paths (``path``, ``labels``) are resolved against the folder the caller gives (the task file's folder) as
validation context ``{"base_dir": ...}``, so a task folder can be moved as a whole; globs and explicit split
entries are relative to ``path``.

Splits: either explicit ``train`` / ``val`` / ``test`` (a sub-folder of ``path`` holding that split in the format's
layout, a ``.txt`` file listing sample keys, or glob patterns matched against the sample keys) or ``split``, a
seeded split by sample (stratified per class for ``class_folders``) or, with ``block``, a spatially blocked split of
each scene (see :class:`SplitSpec`). Neither: a seeded 80/10/10 split (``bigearthnet``: the patches' own split
field).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import UserError
from pipeline.spec import TimeRange

SplitName = Literal["train", "val", "test"]
SPLITS: tuple[str, str, str] = ("train", "val", "test")
_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")


class DataSpecError(UserError):
    """An invalid data spec; the message names the source, each offending field and the bad value."""


def _absolute(value: str, info: ValidationInfo) -> str:
    """``value`` as an absolute path, relative to the caller's ``base_dir`` (URLs are kept as they are)."""
    value = os.path.expandvars(os.path.expanduser(value))
    if "://" in value:
        return value
    base = Path((info.context or {}).get("base_dir") or Path.cwd())
    path = Path(value)
    return str((path if path.is_absolute() else base / path).resolve())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitSpec(_Strict):
    """A seeded split.

    Attributes:
        seed: seed of the assignment; ``None`` = the task's seed (the ``seed`` given to ``open_dataset``).
        fractions: shares of train, val and test (summing to 1); a split with share 0 is empty.
        block: cut each scene into ``block`` x ``block`` px blocks (pixels of the finest modality) and assign blocks,
            not samples, to splits: a spatially blocked split for single scenes.
        gap: pixels within ``gap`` px (Chebyshev distance) of a block of another split are unlabelled, so labelled
            pixels of two splits never touch.

    """

    seed: int | None = None
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    block: int | None = Field(None, gt=0)
    gap: int = Field(0, ge=0)

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or not math.isclose(sum(v), 1.0, abs_tol=1e-6):
            raise ValueError(f"fractions [train, val, test] must be >= 0 and sum to 1, got {list(v)} (sum {sum(v):g})")
        if v[0] <= 0:
            raise ValueError(f"the train fraction must be positive, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _gap_needs_block(self) -> SplitSpec:
        if self.gap and self.block is None:
            raise ValueError("gap is the margin between blocks of a spatially blocked split: set block too")
        if self.block is not None and 2 * self.gap >= self.block:
            raise ValueError(f"gap {self.gap} must be less than half the block {self.block}, or no pixel is labelled")
        return self


SplitRef = str | list[str]
"""An explicit split: a sub-folder of ``path``, a ``.txt`` file of sample keys, or glob pattern(s) of sample keys."""


class _DataBase(_Strict):
    """Fields every format has.

    Attributes:
        path: root folder (or the cube); absolute after validation.
        classes: class names (index = position), or for label rasters a mapping ``raw label value -> name``
            (index = position in the mapping); default from the data.
        colors: ``#rrggbb`` per class (class maps and quicklooks); default the shared palette.
        label_nodata: raw label values meaning "unlabelled"; mapped to IGNORE (-1).
        size: sample side in pixels of the finest modality (at the model's GSD).
        gsd: declared ground sampling distance in metres of the finest source pixels, for data without a
            georeference (default: the georeference, else the modality's nominal GSD).
        scale: train-time zoom range: a random-resized crop with a zoom factor drawn log-uniformly from it
            (2 = twice as close); the sample keeps the declared GSD, as a user's image of unknown zoom would.
        weight: sampling weight of this dataset when a task has several.
        train, val, test: explicit splits (see :data:`SplitRef`).
        split: a seeded (optionally spatially blocked) split instead of explicit ones.

    """

    path: str = Field(min_length=1)
    classes: list[str] | dict[int, str] | None = None
    colors: list[str] | None = None
    label_nodata: list[float] = Field(default_factory=list)
    size: int = Field(64, gt=0, le=8192)
    gsd: float | None = Field(None, gt=0)
    scale: tuple[float, float] = (1.0, 1.0)
    weight: float = Field(1.0, ge=0)
    train: SplitRef | None = None
    val: SplitRef | None = None
    test: SplitRef | None = None
    split: SplitSpec | None = None

    pixel_labels: ClassVar[bool] = False
    """Whether the format's labels are rasters (a spatially blocked split needs pixels)."""

    @field_validator("path")
    @classmethod
    def _abs(cls, v: str, info: ValidationInfo) -> str:
        return _absolute(v, info)

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str] | dict[int, str] | None) -> list[str] | dict[int, str] | None:
        names = list(v.values()) if isinstance(v, dict) else v
        if names is not None:
            if not names:
                raise ValueError("classes must not be empty")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"class names must be unique, repeated: {dup}")
        return v

    @field_validator("colors")
    @classmethod
    def _colors(cls, v: list[str] | None) -> list[str] | None:
        bad = [c for c in v or [] if not _COLOR.match(c)]
        if bad:
            raise ValueError(f"colors are '#rrggbb' strings, got {bad}")
        return v

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"scale is a zoom range [min, max] with 0 < min <= max, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> _DataBase:
        explicit = [s for s in SPLITS if getattr(self, s) is not None]
        if explicit and self.split is not None:
            raise ValueError(f"give explicit splits ({', '.join(explicit)}) or a seeded split, not both")
        if self.split is not None and self.split.block is not None and not self.pixel_labels:
            raise ValueError(f"split.block (a spatially blocked split) needs pixel labels; {self.format!r} has none")
        if self.colors is not None and self.classes is not None and len(self.colors) != len(self.classes):
            raise ValueError(f"{len(self.colors)} colors for {len(self.classes)} classes")
        both = sorted(set(self.label_nodata) & set(self.classes)) if isinstance(self.classes, dict) else []
        if both:
            raise ValueError(f"label values {both} are both classes and label_nodata")
        return self

    format: str


class ClassFoldersSpec(_DataBase):
    """One sub-folder of RGB images per class (RSSCN7) -> ``classification`` of HR RGB.

    ``classes`` (a list of sub-folder names) selects and orders the classes; default every sub-folder, sorted.
    Sample keys: ``<class>/<file name>``.
    """

    format: Literal["class_folders"] = "class_folders"

    @field_validator("classes")
    @classmethod
    def _list_only(cls, v: list[str] | dict[int, str] | None) -> list[str] | dict[int, str] | None:
        if isinstance(v, dict):
            raise ValueError("class_folders classes are sub-folder names (a list), not a value -> name mapping")
        return v


class RasterModality(_Strict):
    """Where one modality's rasters are and how their values become the model's bands and units.

    Attributes:
        glob: files of this modality, relative to the data ``path``.
        bands: ``model band -> source band`` (1-based index or band description); default: match the file's band
            descriptions (``B2`` == ``B02``), or take the bands in order when the file has exactly as many.
        scale, offset: ``value = raw * scale + offset`` converts to the modality's units (e.g. ``scale: 10000`` for
            reflectance stored as DN / 10000).
        nodata: raw value of missing pixels (default: the file's nodata; NaN always counts as missing).

    """

    glob: str = Field(min_length=1)
    bands: dict[str, int | str] | None = None
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None

    @field_validator("bands")
    @classmethod
    def _bands(cls, v: dict[str, int | str] | None) -> dict[str, int | str] | None:
        bad = [k for k, i in (v or {}).items() if isinstance(i, int) and i < 1]
        if bad:
            raise ValueError(f"band indices are 1-based; bad entries for {bad}")
        return v


class RasterLabel(_Strict):
    """Where the label rasters are: ``glob`` relative to ``path``, and the 1-based ``band`` to read."""

    glob: str = Field(min_length=1)
    band: int = Field(1, ge=1)


class RasterPairsSpec(_DataBase):
    """Image rasters paired with label rasters by a key in their file names -> ``segmentation`` (or ``regression``).

    Sen1Floods11 (``S2Hand/``, ``S1Hand/``, ``LabelHand/``) and SMAGNet (``<chip>_S1Hand.tif`` +
    ``<chip>_S1LabelHand.tif`` in one folder) both fit. The label raster's grid is the reference: modality rasters
    cover the same ground (same or integer-ratio pixel grids). Georeferenced chips keep their georeference.

    Attributes:
        modalities: per model modality, its rasters and band mapping.
        label: the label rasters.
        key: regex on a file's stem whose first group (or group ``key``) pairs files into samples; default:
            everything before the stem's last ``_``. Sample keys are these.
        task: ``segmentation`` (class labels) or ``regression`` (continuous labels, NaN = unlabelled).

    """

    format: Literal["raster_pairs"] = "raster_pairs"
    modalities: dict[str, RasterModality] = Field(min_length=1)
    label: RasterLabel
    key: str = r"^(.*)_[^_]*$"
    task: Literal["segmentation", "regression"] = "segmentation"
    pixel_labels: ClassVar[bool] = True

    @field_validator("key")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as err:
            raise ValueError(f"key is not a valid regular expression: {err}") from None
        return v

    @model_validator(mode="after")
    def _regression(self) -> RasterPairsSpec:
        if self.task == "regression" and (self.classes is not None or self.colors is not None):
            raise ValueError("regression labels are values, not classes: remove classes / colors")
        return self


class ChangeFoldersSpec(_DataBase):
    """``A/``, ``B/``, ``label/`` images with the same names (LEVIR-CD, DSIFN-CD) -> ``change`` of two HR periods.

    Default classes ``{0: no_change, 255: change}``. Sample keys: the file stems.

    Attributes:
        before, after, label: the sub-folders of the two periods and of the change masks.

    """

    format: Literal["change_folders"] = "change_folders"
    before: str = "A"
    after: str = "B"
    label: str = "label"
    pixel_labels: ClassVar[bool] = True


class BigEarthNetSpec(_DataBase):
    """BigEarthNet v1 patch folders (``S1.tif``, ``S2_10m/20m/60m.tif``, ``labels.json``) -> ``multilabel``.

    The 19-class nomenclature of ``classes.json``; S2 resampled to 10 m. Default split: each patch's
    ``split_field`` in ``labels.json``. Sample keys: the patch folder names.

    Attributes:
        modalities: ``[s2, s1]``, or one of them (default: those of the two the model takes).
        split_field: the ``labels.json`` field holding ``train`` / ``val`` / ``test`` (used when no split is given).

    """

    format: Literal["bigearthnet"] = "bigearthnet"
    modalities: list[Literal["s2", "s1"]] | None = Field(None, min_length=1)
    split_field: str = "split_in_configilm_mock"
    size: int = Field(120, gt=0, le=8192)

    @field_validator("classes")
    @classmethod
    def _fixed(cls, v: list[str] | dict[int, str] | None) -> list[str] | dict[int, str] | None:
        if v is not None:
            raise ValueError("bigearthnet uses the 19-class nomenclature of classes.json; do not give classes")
        return v


class CubeDataSpec(_DataBase):
    """A Zarr cube built by ``skypipe cube build`` plus labels -> ``segmentation`` windows of ``size`` px.

    Attributes:
        labels: a label GeoTIFF in any CRS (reprojected onto the grid of the cube's finest modality, nearest
            neighbour) or vector labels (GeoJSON / GeoPackage / GeoParquet polygons, any CRS, rasterised).
        class_column: vector labels: the column of class values (required for vectors).
        name_column: vector labels: a column of class names (default names: the class values).
        label_band: raster labels: the 1-based band.
        time: dates of the cube to use (default all).
        modalities: cube groups to read (default: every group of the cube the model has).
        num_dates: dates per modality and sample (default: all in ``time``): the most valid ones of the window,
            random ones among the valid when training.
        min_labelled: keep windows with at least this fraction of labelled pixels (default: any).

    """

    format: Literal["cube"] = "cube"
    labels: str = Field(min_length=1)
    class_column: str | None = None
    name_column: str | None = None
    label_band: int = Field(1, ge=1)
    time: TimeRange | None = None
    modalities: list[str] | None = None
    num_dates: int | None = Field(None, gt=0)
    min_labelled: float = Field(0.0, ge=0, le=1)
    pixel_labels: ClassVar[bool] = True

    @field_validator("labels")
    @classmethod
    def _abs_labels(cls, v: str, info: ValidationInfo) -> str:
        return _absolute(v, info)

    @model_validator(mode="after")
    def _explicit(self) -> CubeDataSpec:
        given = [s for s in SPLITS if getattr(self, s) is not None]
        if given:
            raise ValueError(f"a cube is one scene: use split (seeded windows or blocks), not explicit {given}")
        return self

    @property
    def vector_labels(self) -> bool:
        """Whether ``labels`` is a vector file (by its extension)."""
        return Path(self.labels).suffix.lower() in (".geojson", ".json", ".gpkg", ".parquet", ".geoparquet", ".shp")


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

    @field_validator("labels")
    @classmethod
    def _abs_labels(cls, v: str, info: ValidationInfo) -> str:
        return _absolute(v, info)

    @model_validator(mode="after")
    def _one_scene(self) -> VectorBoxesSpec:
        given = [s for s in SPLITS if getattr(self, s) is not None]
        if given:
            raise ValueError(f"vector_boxes is one scene: use split (spatial blocks), not explicit {given}")
        if self.select is not None:
            raise ValueError("vector_boxes is one scene: select (of images) does not apply")
        return self


DataSpec = Annotated[
    ClassFoldersSpec
    | RasterPairsSpec
    | ChangeFoldersSpec
    | BigEarthNetSpec
    | CubeDataSpec
    | DotaSpec
    | VocSpec
    | VectorBoxesSpec,
    Field(discriminator="format"),
]
"""One dataset of a fine-tuning task, discriminated on ``format``."""

AnyDataSpec = (
    ClassFoldersSpec
    | RasterPairsSpec
    | ChangeFoldersSpec
    | BigEarthNetSpec
    | CubeDataSpec
    | DotaSpec
    | VocSpec
    | VectorBoxesSpec
)
"""The type of a validated data spec."""

_ADAPTER: TypeAdapter[AnyDataSpec] = TypeAdapter(DataSpec)


def format_errors(source: str, err: ValidationError) -> str:
    """One line per error: ``field.path: message (got value)``."""
    lines = [f"{source}: invalid data spec:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "union[", "tuple[")))
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {loc}: unknown field (check the spelling)")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  - {loc or '<top level>'}: {msg}{shown}")
    return "\n".join(lines)


def parse_data_spec(
    data: Any, base_dir: str | os.PathLike[str] | None = None, source: str = "<data spec>"
) -> AnyDataSpec:
    """Validate one ``data`` entry; relative paths are resolved against ``base_dir`` (default: the working dir).

    Raises:
        DataSpecError: naming ``source``, each field and the bad value.
    """
    try:
        return _ADAPTER.validate_python(data, context={"base_dir": str(base_dir) if base_dir is not None else None})
    except ValidationError as err:
        raise DataSpecError(format_errors(source, err)) from None
