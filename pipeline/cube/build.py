"""Building a cube: plan every modality, write the Zarr template, then fill it chunk by chunk.

1. plan (:mod:`pipeline.cube.plan`): one projected grid for the region, dates by solar day, usable items (every
   asset header opened once), scale/offset per date; hashed into a fingerprint per modality;
2. template (:mod:`pipeline.cube.layout`): coordinates, CRS, attributes and empty arrays, written once with
   ``to_zarr(compute=False)``; a cube already at ``url`` with the same fingerprints is resumed instead;
3. chunks (:mod:`pipeline.cube.writer`): a thread pool reads (:mod:`pipeline.cube.chunk_reader`, odc-stac's pixels
   from datasets kept open), converts and writes one chunk at a time per thread, each chunk written whole and then
   recorded in the manifest (:mod:`pipeline.cube.manifest`), so memory stays at a chunk per thread and a killed
   build picks up where it stopped;
4. per-date valid fractions and chunk failures go into the group attributes; quicklooks beside the cube.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pystac
import rasterio
import xarray as xr
import zarr
from tqdm.auto import tqdm

from pipeline import __version__
from pipeline.cube import layout
from pipeline.cube.grid import SENTINEL_GSDS, native_gsd, region_grid, snap_hr_gsd
from pipeline.cube.manifest import ChunkManifest
from pipeline.cube.plan import ModalityPlan, SourceLike, plan_modality
from pipeline.cube.reader import GDAL_OPTIONS, asset_href, gdal_path, split_band_ref
from pipeline.cube.writer import ChunkWriter
from pipeline.modalities import GRID_GSD, get_modality

log = logging.getLogger(__name__)


@dataclass
class CubeReport:
    """What a build did, per modality: chunk counts, failures and per-date valid fractions."""

    url: str
    chunks: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    valid_fraction: dict[str, list[float]] = field(default_factory=dict)
    quicklooks: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _hr_resolution(
    name: str, items: Sequence[pystac.Item], source: SourceLike, crs: str, wanted: float | None, patch_url: Any
) -> float:
    if wanted is None:
        href = asset_href(items[0], split_band_ref(next(iter(source.assets.values())))[0])
        with rasterio.Env(**GDAL_OPTIONS), rasterio.open(gdal_path(patch_url(href) if patch_url else href)) as src:
            wanted = native_gsd(list(src.transform)[:6], src.crs.to_wkt(), crs)
    snapped = snap_hr_gsd(wanted)
    log.info("%s: GSD %.4g m snapped to %.4g m (= 10 m / %d)", name, wanted, snapped, round(GRID_GSD / snapped))
    return snapped


def build_cube(
    url: str,
    items: Mapping[str, Sequence[pystac.Item]],
    sources: Mapping[str, SourceLike],
    *,
    region: tuple[float, float, float, float],
    crs: str | int | None = None,
    resolutions: Mapping[str, float | None] | None = None,
    chunks: tuple[int, int] = (512, 512),
    bands: Mapping[str, Sequence[str]] | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    batch_chunks: int | None = None,
    progress: bool = True,
    quicklooks: bool = True,
    attrs: Mapping[str, Any] | None = None,
    patch_url: Callable[[str], str] | None = None,
) -> CubeReport:
    """Build (or resume) a Zarr cube at ``url`` from STAC items, one group per modality.

    Args:
        url: local path or fsspec URL of the cube (``s3://...``, ``memory://...``).
        items: STAC items per modality (``s2``, ``s1``, ``hr``), from any search.
        sources: how to read each modality's items (the catalog's ``ModalitySource``, or anything alike).
        region: WGS84 bbox (min lon, min lat, max lon, max lat) the cube must cover.
        crs: target projected CRS; default the UTM zone of the region centre.
        resolutions: metres per modality; S2/S1 default 10 m, HR defaults to its native GSD snapped to the
            model's HR grids (:data:`pipeline.cube.grid.HR_GSDS`).
        chunks: (y, x) chunk shape in pixels of each modality's grid (one date per chunk).
        bands: band names per modality (default: the modality's bands in :mod:`pipeline.modalities`).
        overwrite: discard an existing cube built from a different plan instead of refusing.
        workers: reader/writer threads (default ``2 * cpu_count``, at least 4: reads wait on I/O).
        batch_chunks: at most this many consecutive chunks of a row per thread task (default ``2 * workers``).
        progress: show a tqdm bar over chunks.
        quicklooks: write PNG previews beside the cube when done.
        attrs: extra root attributes (job name, time range, ...).
        patch_url: href rewriter applied when reading (re-signing for signed catalogs).

    """
    start = time.perf_counter()
    resolutions = dict(resolutions or {})
    for name in items:
        if name not in sources:
            raise ValueError(f"modality {name!r} has items but no source configuration")
        res = resolutions.get(name)
        if name != "hr" and res is not None and float(res) not in SENTINEL_GSDS:
            raise ValueError(f"resolution of {name!r} must be one of {list(SENTINEL_GSDS)} m, got {res}")
    snap = max([GRID_GSD, *(float(resolutions.get(n) or GRID_GSD) for n in items if n != "hr")])
    grid = region_grid(region, crs, snap=snap)
    centre_lon = (region[0] + region[2]) / 2
    plans: dict[str, ModalityPlan] = {}
    for name, its in items.items():
        if not its:
            raise ValueError(f"modality {name!r}: no items to build from (the catalog search returned nothing)")
        if name == "hr":
            res = _hr_resolution(name, its, sources[name], grid.crs, resolutions.get(name), patch_url)
        else:
            res = float(resolutions.get(name) or GRID_GSD)
        spec = get_modality(name)
        plans[name] = plan_modality(
            name,
            its,
            sources[name],
            bands=list((bands or {}).get(name) or spec.bands),
            geobox=grid.geobox(res),
            chunks=(1, *chunks),
            centre_lon=centre_lon,
            units=spec.units,
            patch_url=patch_url,
        )

    fingerprints = {name: p.fingerprint() for name, p in plans.items()}
    root = {
        "region": list(region),
        "crs": grid.crs,
        "grid": grid.to_dict(),
        "modalities": list(plans),
        "code_version": f"skypipe {__version__}",
        "fingerprints": fingerprints,
        **dict(attrs or {}),
    }
    manifest = ChunkManifest(url)
    existing = layout.root_attrs(url)
    if not overwrite and (existing is not None or layout.store_exists(url)):
        if existing is None or "fingerprints" not in existing:
            raise ValueError(f"{url} exists and is not a skypipe cube; choose another cube path or pass --overwrite")
        if existing["fingerprints"] != fingerprints:
            raise ValueError(
                f"a cube built from a different plan (other items, grid, bands or chunks) exists at {url}; "
                "pass --overwrite (overwrite=True) to replace it, or choose another cube path"
            )
    stored = manifest.plan()
    if existing and existing.get("fingerprints") == fingerprints and stored and stored["fingerprints"] == fingerprints:
        log.info("resuming the cube at %s", url)
    else:
        manifest.clear()
        layout.write_root(url, root)
        for name, p in plans.items():
            layout.write_template(url, name, _group_template(p))
        # Per-item problems found before reading (404, unreadable header, missing asset) go into the manifest too.
        skipped = {name: [vars(x) for x in p.problems] for name, p in plans.items()}
        manifest.reset({"fingerprints": fingerprints, "skipped_assets": skipped})

    report = CubeReport(url=url)
    workers = workers or max(4, 2 * (os.cpu_count() or 2))
    batch = batch_chunks or 2 * workers
    pending_by = {}
    for name, p in plans.items():
        statuses = manifest.statuses(name)
        ny, nx = (-(-n // c) for n, c in zip(p.geobox.shape, p.chunks[1:]))
        all_chunks = [(t, y, x) for t in range(len(p.dates)) for y in range(ny) for x in range(nx)]
        pending_by[name] = [i for i in all_chunks if i not in statuses]
        report.chunks[name] = {"total": len(all_chunks), "skipped": len(all_chunks) - len(pending_by[name])}
    total = sum(c["total"] for c in report.chunks.values())
    done = sum(c["skipped"] for c in report.chunks.values())
    with tqdm(total=total, initial=done, unit="chunk", desc="cube", disable=not progress) as bar:
        for name, p in plans.items():
            runner = ChunkWriter(url, p, manifest, bar)
            runner.run(pending_by[name], batch, workers)
            report.chunks[name]["written"] = len(runner.done)
    for name, p in plans.items():
        report.failures[name] = manifest.failures(name)
        report.valid_fraction[name] = _finalise_group(url, p, report.failures[name])
    if quicklooks:
        from pipeline.cube.quicklook import write_quicklooks

        report.quicklooks = write_quicklooks(url)
    report.seconds = time.perf_counter() - start
    return report


def _group_template(p: ModalityPlan) -> xr.Dataset:
    spec = get_modality(p.name)
    attrs = {
        "modality": p.name,
        "collection": p.collection,
        "processing_level": p.processing_level,
        "units": p.units,
        "resolution": p.resolution,
        "bands": p.bands,
        "source_refs": p.refs,
        "scale": p.scale.tolist(),
        "offset": p.offset.tolist(),
        "linear_to_db": p.linear_to_db,
        "source_nodata": None if p.nodata is None or np.isnan(p.nodata) else p.nodata,
        "mask_asset": p.mask_ref,
        "mask_invalid_values": p.mask_invalid_values,
        "resampling": p.resampling,
        "items": p.provenance(),
        "skipped_assets": [vars(x) for x in p.problems],
        "fingerprint": p.fingerprint(),
        "modality_spec": spec.to_dict(),
    }
    data_attrs = {"long_name": f"{p.name} {p.units}", "units": p.units}
    return layout.template(p.geobox, p.dates, p.bands, p.chunks, attrs, data_attrs)


def _finalise_group(url: str, p: ModalityPlan, failures: list[dict[str, Any]]) -> list[float]:
    """Store per-date valid fractions and chunk failures in the group's attributes; log all-invalid dates."""
    group = zarr.open_group(url, mode="r+", zarr_format=3)[p.name]
    fractions = layout.valid_fractions(group[layout.VALID_VAR])
    for date, f in zip(p.dates, fractions):
        if f == 0.0:
            log.warning(
                "%s: date %s has no valid pixel (all nodata, masked or unreadable); kept as invalid",
                p.name,
                str(date)[:19],
            )
    group.attrs.update({"valid_fraction": fractions, "failures": failures})
    return fractions
