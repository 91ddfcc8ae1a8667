"""What a cube build will do for one modality, decided before any pixel is read.

A :class:`ModalityPlan` fixes the band list, the grid, the dates (items grouped by solar day), the scale/offset per
date and band, and which items are unusable (checked by opening every asset header). Its :meth:`fingerprint` is
stored with the cube, so a resumed build refuses to mix chunks from a different plan. What it stores (provenance
hrefs, asset problems) holds hrefs without their tokens (:func:`pipeline.catalog.redact.public_href`); the items
themselves keep their signed hrefs for reading.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

import numpy as np
import pystac
from odc.geo.geobox import GeoBox

from pipeline.catalog.redact import public_href
from pipeline.cube.reader import AssetProblem, asset_href, check_assets, split_band_ref

log = logging.getLogger(__name__)


class SourceLike(Protocol):
    """The parts of a catalog's ``ModalitySource`` the cube needs (any object with these attributes works)."""

    collection: str
    assets: dict[str, str]
    nodata: float | None
    scale: float
    offset: float
    units: str | None
    linear_to_db: bool
    mask_asset: str | None
    mask_invalid_values: list[int]
    processing_level: str | None


class BandNotFoundError(ValueError):
    """A requested band is not provided by the collection or its items."""


@dataclass
class ModalityPlan:
    """Everything needed to read and write one modality group of the cube."""

    name: str
    bands: list[str]
    refs: list[str]
    resampling: list[str]
    mask_ref: str | None
    mask_invalid_values: list[int]
    geobox: GeoBox
    chunks: tuple[int, int, int]  # (time, y, x)
    dates: list[np.datetime64]
    groups: list[list[pystac.Item]]  # usable items per date (may be empty: the date is kept, fully invalid)
    item_ids: list[list[str]]  # all items found per date, usable or not
    scale: np.ndarray  # (T, B) raw -> units
    offset: np.ndarray  # (T, B)
    nodata: float | None
    linear_to_db: bool
    units: str
    processing_level: str | None
    collection: str
    problems: list[AssetProblem] = field(default_factory=list)
    source_crs: dict[str, str] = field(default_factory=dict)
    patch_url: Callable[[str], str] | None = None  # href re-signing at read time (not part of the fingerprint)

    @property
    def resolution(self) -> float:
        """Pixel size in metres."""
        return float(self.geobox.resolution.x)

    def provenance(self) -> dict[str, Any]:
        """Source item ids and hrefs (without tokens) per date (ISO date -> list), stored in the group's attributes."""
        out: dict[str, Any] = {}
        for date, group, ids in zip(self.dates, self.groups, self.item_ids):
            usable = {it.id: it for it in group}
            out[str(date)[:19]] = [
                {
                    "id": item_id,
                    "usable": item_id in usable,
                    "hrefs": (
                        {r: public_href(asset_href(usable[item_id], split_band_ref(r)[0])) for r in self.refs}
                        if item_id in usable
                        else {}
                    ),
                }
                for item_id in ids
            ]
        return out

    def fingerprint(self) -> str:
        """Hash of everything that determines the cube's pixel values."""
        data = {
            "bands": self.bands,
            "refs": self.refs,
            "resampling": self.resampling,
            "mask": [self.mask_ref, self.mask_invalid_values],
            "geobox": [list(self.geobox.shape), list(self.geobox.transform)[:6], str(self.geobox.crs)],
            "chunks": list(self.chunks),
            "dates": [str(d) for d in self.dates],
            # item ids, not hrefs: signed or loopback URLs change between runs of the same job
            "items": [[(i, any(it.id == i for it in g)) for i in ids] for g, ids in zip(self.groups, self.item_ids)],
            "scale": self.scale.tolist(),
            "offset": self.offset.tolist(),
            "nodata": None if self.nodata is None or np.isnan(self.nodata) else self.nodata,
            "db": self.linear_to_db,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def item_datetime(item: pystac.Item) -> datetime:
    """Acquisition time (UTC) of an item: ``datetime``, else ``start_datetime``."""
    dt = item.datetime or item.common_metadata.start_datetime
    if dt is None:
        raise ValueError(f"item {item.id!r} has neither 'datetime' nor 'start_datetime'")
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def group_by_solar_day(items: Sequence[pystac.Item], lon: float) -> list[list[pystac.Item]]:
    """Items grouped by local solar date at longitude ``lon`` (adjacent tiles of one overpass form one date)."""
    offset = timedelta(hours=lon / 15.0)
    groups: dict[Any, list[pystac.Item]] = {}
    for item in sorted(items, key=lambda it: (item_datetime(it), it.id)):
        groups.setdefault((item_datetime(item) + offset).date(), []).append(item)
    return [groups[k] for k in sorted(groups)]


def _scale_offset(source: SourceLike, item: pystac.Item, ref: str) -> tuple[float, float]:
    how = getattr(source, "scale_offset_for", None)
    if how is None:
        return float(source.scale), float(source.offset)
    key, idx = split_band_ref(ref)
    rbands = item.assets[key].extra_fields.get("raster:bands") or []
    rband = rbands[idx - 1] if len(rbands) >= idx else None
    scale, offset = how(rband, item.properties)
    return float(scale), float(offset)


def _band_refs(name: str, source: SourceLike, bands: Sequence[str]) -> list[str]:
    missing = [b for b in bands if b not in source.assets]
    if missing:
        raise BandNotFoundError(
            f"modality {name!r}: band(s) {missing} are not mapped to assets of collection {source.collection!r}; "
            f"mapped bands: {sorted(source.assets)}. Add them to the catalog's 'assets' or drop them from the job"
        )
    return [source.assets[b] for b in bands]


def _check_items_have_assets(
    name: str, items: Sequence[pystac.Item], bands: Sequence[str], refs: Sequence[str]
) -> list[AssetProblem]:
    problems = []
    for band, ref in zip(bands, refs):
        key = split_band_ref(ref)[0]
        lacking = [it for it in items if key not in it.assets]
        if len(lacking) == len(items):
            it = lacking[0]
            raise BandNotFoundError(
                f"modality {name!r}: band {band!r} needs asset {key!r}, which item {it.id!r} (and every other item) "
                f"lacks; available assets: {sorted(it.assets)}. Fix the band -> asset mapping in the catalog"
            )
        problems += [
            AssetProblem(it.id, key, "", f"no asset {key!r} (available: {sorted(it.assets)})", "This item is skipped")
            for it in lacking
        ]
    return problems


def plan_modality(
    name: str,
    items: Sequence[pystac.Item],
    source: SourceLike,
    *,
    bands: Sequence[str],
    geobox: GeoBox,
    chunks: tuple[int, int, int],
    centre_lon: float,
    units: str,
    patch_url: Callable[[str], str] | None = None,
) -> ModalityPlan:
    """Decide dates, usable items and scaling for one modality (opens every asset header once)."""
    if not items:
        raise ValueError(f"modality {name!r}: no items to build from (the catalog search returned nothing)")
    refs = _band_refs(name, source, bands)
    mask_ref = source.mask_asset or None
    all_refs = [*refs, *([mask_ref] if mask_ref else [])]
    problems = _check_items_have_assets(name, items, bands, refs)
    if mask_ref:
        problems += _check_items_have_assets(name, items, ["mask"], [mask_ref])
    bad = {p.item for p in problems}
    header_problems, source_crs = check_assets([it for it in items if it.id not in bad], all_refs, patch_url)
    problems += header_problems
    bad |= {p.item for p in header_problems}
    for p in problems:
        log.warning("%s: %s", name, p.message())
    crs_set = sorted(set(source_crs.values()))
    if len(crs_set) > 1 or (crs_set and crs_set[0] != str(geobox.crs)):
        log.info("%s: sources in %s are reprojected to %s", name, ", ".join(crs_set), geobox.crs)

    all_groups = group_by_solar_day(items, centre_lon)
    dates, groups, ids = [], [], []
    scale = np.ones((len(all_groups), len(refs)))
    offset = np.zeros((len(all_groups), len(refs)))
    for t, group in enumerate(all_groups):
        dates.append(np.datetime64(item_datetime(group[0]).astimezone(timezone.utc).replace(tzinfo=None), "ns"))
        ids.append([it.id for it in group])
        usable = [it for it in group if it.id not in bad]
        groups.append(usable)
        if not usable:
            log.warning(
                "%s: date %s has no usable item (%s); kept as fully invalid", name, str(dates[-1])[:19], ids[-1]
            )
            continue
        per_item = [[_scale_offset(source, it, r) for r in refs] for it in usable]
        if any(p != per_item[0] for p in per_item[1:]):
            log.warning(
                "%s: items of date %s disagree on scale/offset; using those of %s", name, dates[-1], usable[0].id
            )
        scale[t], offset[t] = zip(*per_item[0])
    resampling = ["bilinear"] * len(refs) + (["nearest"] if mask_ref else [])
    return ModalityPlan(
        name=name,
        bands=list(bands),
        refs=all_refs,
        resampling=resampling,
        mask_ref=mask_ref,
        mask_invalid_values=[int(v) for v in (source.mask_invalid_values or [])],
        geobox=geobox,
        chunks=chunks,
        dates=dates,
        groups=groups,
        item_ids=ids,
        scale=scale,
        offset=offset,
        nodata=source.nodata,
        linear_to_db=bool(source.linear_to_db),
        units=source.units or units,
        processing_level=source.processing_level,
        collection=source.collection,
        problems=problems,
        source_crs=source_crs,
        patch_url=patch_url,
    )
