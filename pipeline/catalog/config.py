"""Catalog definitions: which STAC collection and assets feed each modality, and how raw values become our units.

A catalog is a small YAML file in ``catalogs/`` parsed once, here, into :class:`CatalogConfig`. Everything
downstream (search, cube building) receives plain values taken from these models.

Band notation follows odc-stac: a single-band asset is named by its asset key (``red``), band ``N`` (1-based) of a
multi-band asset is ``key.N`` (``image.4`` is NAIP's NIR). Such strings can be passed to ``odc.stac.load(bands=...)``
unchanged; :func:`split_band_ref` turns one into ``(asset_key, band_index)`` for rasterio / stackstac.

Value conversion: ``ours = raw * scale + offset`` (then ``10 * log10(ours)`` when ``linear_to_db``). The YAML's
``scale`` / ``offset`` are authoritative. Item ``raster:bands`` scale/offset are only used when
``use_item_scale_offset`` is true; they map raw values to *physical* values, so they are multiplied by
``physical_to_units`` to reach our units (Earth Search S2 L2A: ``0.0001 x 10000 = 1`` and ``-0.1 x 10000 = -1000``
for processing baseline >= 04.00, ``0`` before) - see :meth:`ModalitySource.scale_offset_for`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.modalities import DEFAULT_MODALITIES
from pipeline.resources import resource_dir, work_root

REPO_ROOT = work_root()
"""What relative paths in catalog files resolve against (:func:`pipeline.resources.work_root`)."""

CATALOGS_DIR = resource_dir("catalogs")
"""Where bare catalog names (``earth-search``) are resolved: ``catalogs/<name>.yaml`` (:mod:`pipeline.resources`)."""

# Bands a catalog may feed for each modality, in model order: the model's bands, then optional ones (HR's NIR).
_ALLOWED_BANDS: dict[str, tuple[str, ...]] = {name: spec.known_bands for name, spec in DEFAULT_MODALITIES.items()}


class CatalogConfigError(ValueError):
    """A catalog YAML file is missing, unreadable or invalid; the message names the file and the field."""


def split_band_ref(ref: str) -> tuple[str, int]:
    """``"image.4"`` -> ``("image", 4)``; ``"red"`` -> ``("red", 1)`` (odc-stac's band notation)."""
    key, sep, idx = ref.rpartition(".")
    if sep and idx.isdigit() and key:
        return key, int(idx)
    return ref, 1


class ModalitySource(BaseModel):
    """Where one modality's bands come from in a catalog and how raw values become the modality's units.

    Attributes:
        collection: STAC collection id.
        assets: OUR band name -> asset reference, in our band order (``key`` or ``key.N`` for band N of a
            multi-band asset, 1-based, as odc-stac names them).
        units: units after scale/offset (and dB conversion); compare with ``ModalitySpec.units``.
        gsd: native ground sampling distance in metres of the finest requested band.
        processing_level: product level (``L2A``, ``L1C``, ``GRD``, ``RTC``, ...). Kept visible because a model
            trained on L2A sees a shifted distribution on L1C (the local sample S2 data is L1C).
        nodata: raw value marking missing pixels (``None``: take it from the file; NaN allowed).
        scale: multiplier raw -> our units.
        offset: added after ``scale``.
        use_item_scale_offset: take scale/offset from the item's ``raster:bands`` when present (see module doc).
        physical_to_units: multiplier from the item's physical units to ours (used with ``use_item_scale_offset``).
        s2_baseline_offset: added to the offset for Sentinel-2 items whose ``s2:processing_baseline`` is >= 04.00
            (catalogs that do not harmonise the 2022 +1000 DN shift, e.g. Planetary Computer: ``-1000``).
        linear_to_db: values are linear power/amplitude; convert with ``10 * log10(x)`` (non-positive -> NaN).
        cloud_cover_property: item property holding the scene cloud cover in percent (``eo:cloud_cover``).
        mask_asset: asset holding a per-pixel classification used for masking (Sentinel-2 ``SCL``).
        mask_invalid_values: classes of ``mask_asset`` that are not valid observations.
        description: free text shown in summaries.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    collection: str
    assets: dict[str, str]
    units: str
    gsd: float = Field(gt=0)
    processing_level: str | None = None
    nodata: float | None = None
    scale: float = 1.0
    offset: float = 0.0
    use_item_scale_offset: bool = False
    physical_to_units: float = 1.0
    s2_baseline_offset: float = 0.0
    linear_to_db: bool = False
    cloud_cover_property: str | None = None
    mask_asset: str | None = None
    mask_invalid_values: list[int] = Field(default_factory=list)
    description: str = ""

    @field_validator("assets")
    @classmethod
    def _assets_not_empty(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("at least one band -> asset mapping is required")
        for band, ref in v.items():
            key, idx = split_band_ref(ref)
            if idx < 1 or not key:
                raise ValueError(f"band {band!r}: bad asset reference {ref!r} (use 'key' or 'key.N', N >= 1)")
        return v

    @model_validator(mode="after")
    def _mask_consistent(self) -> ModalitySource:
        if self.mask_invalid_values and not self.mask_asset:
            raise ValueError("mask_invalid_values given without mask_asset")
        return self

    @property
    def bands(self) -> tuple[str, ...]:
        """Our band names, in order."""
        return tuple(self.assets)

    @property
    def asset_refs(self) -> list[str]:
        """Asset references in band order (what ``odc.stac.load(bands=...)`` takes)."""
        return list(self.assets.values())

    @property
    def asset_keys(self) -> list[str]:
        """Distinct asset keys that must be read for the bands (plus the mask asset), in first-use order."""
        keys = [split_band_ref(ref)[0] for ref in self.assets.values()]
        if self.mask_asset:
            keys.append(self.mask_asset)
        return list(dict.fromkeys(keys))

    def scale_offset_for(
        self, raster_band: dict[str, Any] | None = None, properties: dict[str, Any] | None = None
    ) -> tuple[float, float]:
        """Scale and offset raw -> our units for one band of one item.

        Args:
            raster_band: the asset's ``raster:bands`` entry for this band, if any.
            properties: the item's properties (for ``s2:processing_baseline``), if any.

        """
        scale, offset = self.scale, self.offset
        if self.use_item_scale_offset and raster_band and ("scale" in raster_band or "offset" in raster_band):
            scale = float(raster_band.get("scale", 1.0)) * self.physical_to_units
            offset = float(raster_band.get("offset", 0.0)) * self.physical_to_units
        if self.s2_baseline_offset and properties and _baseline_at_least(properties.get("s2:processing_baseline"), 4.0):
            offset += self.s2_baseline_offset
        return scale, offset


def _baseline_at_least(value: Any, minimum: float) -> bool:
    try:
        return float(value) >= minimum
    except (TypeError, ValueError):
        return False


class CatalogConfig(BaseModel):
    """A STAC catalog and how our modalities map onto it.

    Attributes:
        name: short name (the YAML file's stem by convention).
        kind: ``stac-api`` (a remote STAC API at ``url``) or ``local`` (a static catalog directory at ``path``,
            served on loopback by :class:`pipeline.catalog.serve.LocalStacServer` unless ``url`` is given).
        url: STAC API root for ``stac-api`` catalogs.
        path: static catalog directory (``collection.json`` + ``items.ndjson`` files) for ``local`` catalogs;
            relative paths are relative to the repository root. ``SKYPIPE_LOCAL_CATALOG`` overrides it.
        signing: how asset hrefs are signed for reading (see :mod:`pipeline.catalog.signing`): ``none``,
            ``planetary-computer`` (a fresh SAS token per href from the Planetary Computer) or ``sas-token`` (the
            token in ``$SKYPIPE_SAS_TOKEN``, e.g. for a private Azure container; never written in the catalog).
        modalities: our modality name (``hr``, ``s2``, ``s1``) -> its source.
        query_extension: whether to send cloud filters with the STAC ``query`` extension; ``None`` asks the
            server's ``conformsTo``.
        description: free text.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["stac-api", "local"]
    url: str | None = None
    path: str | None = None
    signing: Literal["none", "planetary-computer", "sas-token"] = "none"
    modalities: dict[str, ModalitySource]
    query_extension: bool | None = None
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> CatalogConfig:
        if self.kind == "stac-api" and not self.url:
            raise ValueError("kind 'stac-api' needs a 'url'")
        if self.kind == "local" and not (self.path or self.url):
            raise ValueError("kind 'local' needs a 'path' (static catalog directory) or a 'url'")
        for name, src in self.modalities.items():
            if name not in _ALLOWED_BANDS:
                raise ValueError(f"modalities.{name}: unknown modality; known: {sorted(_ALLOWED_BANDS)}")
            allowed = _ALLOWED_BANDS[name]
            unknown = [b for b in src.assets if b not in allowed]
            if unknown:
                raise ValueError(f"modalities.{name}.assets: unknown bands {unknown}; allowed: {list(allowed)}")
            expected = [b for b in allowed if b in src.assets]
            if list(src.assets) != expected:
                raise ValueError(f"modalities.{name}.assets: bands must follow the model order {expected}")
        return self

    def source(self, modality: str) -> ModalitySource:
        """The source of ``modality``, with an error listing what this catalog offers."""
        try:
            return self.modalities[modality]
        except KeyError:
            raise CatalogConfigError(
                f"catalog {self.name!r} has no modality {modality!r}; it offers {sorted(self.modalities)}"
            ) from None

    def local_path(self) -> Path:
        """Directory of a ``local`` catalog (env ``SKYPIPE_LOCAL_CATALOG`` wins, then ``path``)."""
        env = os.environ.get("SKYPIPE_LOCAL_CATALOG")
        if env:
            return Path(env)
        if not self.path:
            raise CatalogConfigError(f"catalog {self.name!r} has no 'path'")
        p = Path(self.path).expanduser()
        return p if p.is_absolute() else REPO_ROOT / p


def resolve_catalog_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A YAML path for a bare name (``catalogs/<name>.yaml``) or an existing file path."""
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} or p.exists() or len(p.parts) > 1:
        if not p.is_file():
            raise CatalogConfigError(f"catalog file {p} does not exist")
        return p
    candidate = CATALOGS_DIR / f"{p}.yaml"
    if not candidate.is_file():
        known = sorted(q.stem for q in CATALOGS_DIR.glob("*.yaml") if not q.stem.endswith("-index"))
        raise CatalogConfigError(f"no catalog named {str(p)!r} (looked for {candidate}); known catalogs: {known}")
    return candidate


def format_validation_error(path: Path | str, err: ValidationError) -> str:
    """One line per problem: ``file: field.path: message``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        lines.append(f"{path}: {loc}: {e['msg']}")
    return "invalid catalog definition:\n  " + "\n  ".join(lines)


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse a YAML mapping with errors naming the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CatalogConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise CatalogConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_catalog(name_or_path: str | os.PathLike[str]) -> CatalogConfig:
    """Load a catalog definition by bare name (``earth-search``) or YAML path.

    Raises:
        CatalogConfigError: the file is missing, not YAML, or a field is invalid (the message names both).

    """
    path = resolve_catalog_path(name_or_path)
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    try:
        return CatalogConfig.model_validate(data)
    except ValidationError as err:
        raise CatalogConfigError(format_validation_error(path, err)) from None
