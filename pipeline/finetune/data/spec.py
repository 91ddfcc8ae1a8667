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

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from pipeline.spec import TimeRange

from .spec_base import SPLITS, DataSpecError, SplitName, SplitRef, SplitSpec, _DataBase, _Strict, absolute_labels
from .spec_boxes import DotaSpec, ImageValues, VectorBoxesSpec, VocSpec

__all__ = [
    "SPLITS", "AnyDataSpec", "BigEarthNetSpec", "ChangeFoldersSpec", "ClassFoldersSpec", "CubeDataSpec", "DataSpec",
    "DataSpecError", "DotaSpec", "ImageValues", "RasterLabel", "RasterModality", "RasterPairsSpec", "SplitName",
    "SplitRef", "SplitSpec", "VectorBoxesSpec", "VocSpec", "format_errors", "parse_data_spec",
]  # fmt: skip


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

    one_scene: ClassVar[str | None] = "split (seeded windows or blocks)"
    _abs_labels = field_validator("labels")(absolute_labels)

    @property
    def vector_labels(self) -> bool:
        """Whether ``labels`` is a vector file (by its extension)."""
        return Path(self.labels).suffix.lower() in (".geojson", ".json", ".gpkg", ".parquet", ".geoparquet", ".shp")


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
