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
from functools import partial
from typing import Any, Literal

import numpy as np
import pystac
import xarray as xr
import zarr
from tqdm.auto import tqdm

from pipeline import __version__, storage
from pipeline.catalog.assets import open_asset
from pipeline.catalog.search import EmptySearchError
from pipeline.cube import layout
from pipeline.cube.grid import CubeGrid, native_gsd, region_grid
from pipeline.cube.manifest import ChunkManifest
from pipeline.cube.plan import ModalityPlan, SourceLike, plan_modality
from pipeline.cube.reader import asset_href, split_band_ref
from pipeline.cube.writer import ChunkWriter
from pipeline.errors import InputsUnreadableError
from pipeline.modalities import GRID_GSD, ModalitySpec, get_modality

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
    cpu_s: float = 0.0  # CPU seconds of the Ray tasks that filled it (distributed builds)
    worker_peak_rss: int = 0  # peak resident bytes of a worker process that ran them (distributed builds)


def _native_resolution(
    spec: ModalitySpec, items: Sequence[pystac.Item], source: SourceLike, crs: str, patch_url: Any
) -> float:
    """The source's own GSD in ``crs`` (read from the first item's first asset header)."""
    href = asset_href(items[0], split_band_ref(next(iter(source.assets.values())))[0])
    with open_asset(patch_url(href) if patch_url else href) as src:
        return native_gsd(list(src.transform)[:6], src.crs.to_wkt(), crs)


def _resolution(spec: ModalitySpec, wanted: float | None, native: Callable[[], float]) -> float:
    """The cube resolution of a modality: the job's (checked or snapped), its default, or its snapped native GSD."""
    if wanted is None and spec.default_resolution is not None:
        return float(spec.default_resolution)
    res = spec.check_resolution(native() if wanted is None else float(wanted))
    if spec.snap_resolution:
        log.info("%s: GSD snapped to %.4g m (= %g m / %d)", spec.name, res, GRID_GSD, round(GRID_GSD / res))
    return res


def plan_cube(
    items: Mapping[str, Sequence[pystac.Item]],
    sources: Mapping[str, SourceLike],
    *,
    region: tuple[float, float, float, float],
    crs: str | int | None,
    resolutions: Mapping[str, float | None],
    chunks: tuple[int, int],
    bands: Mapping[str, Sequence[str]] | None,
    patch_url: Callable[[str], str] | None,
) -> tuple[CubeGrid, dict[str, ModalityPlan]]:
    """The 10 m grid and one :class:`ModalityPlan` per modality (every asset header is opened once).

    Raises:
        InputsUnreadableError: not one item of a modality is usable (nothing to build it from).
    """
    specs = {name: get_modality(name) for name in items}
    for name in items:
        if name not in sources:
            raise ValueError(f"modality {name!r} has items but no source configuration")
        if resolutions.get(name) is not None:
            specs[name].check_resolution(float(resolutions[name]))  # before any header is read
    # Grid edges on multiples of the coarsest fixed resolution, so every modality's pixels nest in the grid.
    fixed = [float(resolutions.get(n) or specs[n].default_resolution or GRID_GSD) for n in items]
    grid = region_grid(region, crs, snap=max([GRID_GSD, *fixed]))
    plans: dict[str, ModalityPlan] = {}
    for name, its in items.items():
        if not its:
            raise EmptySearchError(f"modality {name!r}: no items to build from (the catalog search returned nothing)")
        spec = specs[name]
        native = partial(_native_resolution, spec, its, sources[name], grid.crs, patch_url)
        res = _resolution(spec, resolutions.get(name), native)
        plan = plan_modality(
            name, its, sources[name], bands=list((bands or {}).get(name) or spec.bands), geobox=grid.geobox(res),
            chunks=(1, *chunks), centre_lon=(region[0] + region[2]) / 2, units=spec.units, patch_url=patch_url,
        )  # fmt: skip
        if not any(plan.groups):
            shown = "; ".join(p.message() for p in plan.problems[:3])
            raise InputsUnreadableError(
                f"no {name} input could be read: all {len(its)} item(s) are unusable ({shown}). Fix the catalog or "
                "the files and rerun"
            )
        plans[name] = plan
    return grid, plans


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
    executor: Literal["threads", "ray"] = "threads",
) -> CubeReport:
    """Build (or resume) a Zarr cube at ``url`` from STAC items, one group per modality.

    Args:
        url: local path or fsspec URL of the cube (``s3://...``, ``memory://...``).
        items: STAC items per modality (``s2``, ``s1``, ``hr``), from any search.
        sources: how to read each modality's items (the catalog's ``ModalitySource``, or anything alike).
        region: WGS84 bbox (min lon, min lat, max lon, max lat) the cube must cover.
        crs: target projected CRS; default the UTM zone of the region centre.
        resolutions: metres per modality; default each modality's ``default_resolution``, or its native GSD
            snapped to its allowed resolutions (HR, :data:`pipeline.modalities.HR_GSDS`).
        chunks: (y, x) chunk shape in pixels of each modality's grid (one date per chunk).
        bands: band names per modality (default: the modality's bands in :mod:`pipeline.modalities`).
        overwrite: discard an existing cube built from a different plan instead of refusing.
        workers: reader/writer threads (default ``2 * cpu_count``, at least 4: reads wait on I/O).
        batch_chunks: at most this many consecutive chunks of a row per thread task (default ``2 * workers``).
        progress: show a tqdm bar over chunks.
        quicklooks: write PNG previews beside the cube when done.
        attrs: extra root attributes (job name, time range, ...).
        patch_url: href rewriter applied when reading (re-signing for signed catalogs).
        executor: ``threads`` (this process) or ``ray``: every row of chunks a Ray task on the connected cluster
            (:mod:`pipeline.cube.distributed`).

    """
    start = time.perf_counter()
    grid, plans = plan_cube(
        items, sources, region=region, crs=crs, resolutions=dict(resolutions or {}), chunks=chunks, bands=bands,
        patch_url=patch_url,
    )  # fmt: skip
    fingerprints = {name: p.fingerprint() for name, p in plans.items()}
    root = {
        "region": list(region), "crs": grid.crs, "grid": grid.to_dict(), "modalities": list(plans),
        "code_version": f"skypipe {__version__}", "fingerprints": fingerprints, **dict(attrs or {}),
    }  # fmt: skip
    manifest = ChunkManifest(url)
    _write_or_resume(url, plans, root, manifest, overwrite)
    report = CubeReport(url=url)
    workers = workers or max(4, 2 * (os.cpu_count() or 2))
    _fill(url, plans, manifest, report, workers, batch_chunks or 2 * workers, progress, executor)
    for name, p in plans.items():
        report.failures[name] = manifest.failures(name)
        report.valid_fraction[name] = _finalise_group(url, p, report.failures[name])
    if quicklooks:
        from pipeline.cube.quicklook import write_quicklooks

        report.quicklooks = write_quicklooks(url)
    report.seconds = time.perf_counter() - start
    return report


def _write_or_resume(
    url: str, plans: dict[str, ModalityPlan], root: dict[str, Any], manifest: ChunkManifest, overwrite: bool
) -> None:
    """Write the template, or keep the cube at ``url`` when it was built from the same plan (resume)."""
    fingerprints = root["fingerprints"]
    existing = layout.root_attrs(url)
    if not overwrite and (existing is not None or storage.exists(url)):
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
        return
    manifest.clear()
    layout.write_root(url, root)
    for name, p in plans.items():
        layout.write_template(url, name, _group_template(p))
    # Per-item problems found before reading (404, unreadable header, missing asset) go into the manifest too.
    skipped = {name: [vars(x) for x in p.problems] for name, p in plans.items()}
    manifest.reset({"fingerprints": fingerprints, "skipped_assets": skipped})


def _fill(
    url: str, plans: dict[str, ModalityPlan], manifest: ChunkManifest, report: CubeReport, workers: int, batch: int,
    progress: bool, executor: str = "threads",
) -> None:  # fmt: skip
    """Read, write and record every chunk not recorded yet, modality by modality."""
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
        if executor == "ray":
            from pipeline.cube.distributed import fill_on_ray

            for name, r in fill_on_ray(url, plans, pending_by, bar).items():
                report.chunks[name].update(written=r["written"], nodes=sorted(r["nodes"]))
                report.cpu_s += r["cpu_s"]
                report.worker_peak_rss = max(report.worker_peak_rss, r["peak_rss"])
            return
        for name, p in plans.items():
            runner = ChunkWriter(url, p, manifest, bar)
            runner.run(pending_by[name], batch, workers)
            report.chunks[name]["written"] = len(runner.done)


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
