"""Embedding archives: int8 (or float32) embedding mosaics plus a GeoParquet table of per-tile vectors.

Layout of ``{archive}`` (a local folder or fsspec URL)::

    archive.json              format, version, provenance (model, code_version, checkpoint, checkpoint_sha256,
                              preprocessing), quantized, crs of the table, mosaics (names, in order of appending),
                              sources {name: fingerprint, tiles_url, mosaic_url, tiles} (what each mosaic came from)
    mosaics/<name>.zarr       Zarr v3, opens with ``xr.open_zarr(..., decode_coords="all")``:
        embedding   (band, y, x) int8 (quantized; -128 = no data) or float32 (NaN = no data)
        scale, zero_point (band,) float64   dequantise: ``x = scale * (q - zero_point)``
        valid       (y, x) uint8;  x, y, spatial_ref as in the mosaic;  attrs: provenance, kind, grid, time
    tiles.parquet             GeoParquet (``geopandas.read_parquet``), one row per done tile: geometry (tile
                              footprint polygon in the table CRS = the first mosaic's grid CRS), tile_id, mosaic,
                              row, col, time_start, time_end, model, code_version, checkpoint, checkpoint_sha256,
                              preprocessing (JSON), grid_crs, vector (fixed_size_list<float32>[C], pooled embedding)
    patches/<name>/part-*.parquet   the regular patch table: one int8 vector per P x P patch of every mosaic's grid,
                              one folder per mosaic (:mod:`pipeline.mosaic.patches`); ``archive.json`` records the
                              patch settings (``patches``: size, min_valid, rows_per_file) and each mosaic's files
                              (``sources[<name>]["patches"]``)
    index/                    nearest-neighbour index (FAISS IVF) over the patch vectors (:mod:`pipeline.mosaic.ann`),
                              updated after every build and append

Quantization is affine per channel over the channel's valid range ``[lo, hi]``: ``q = round((x - lo) / scale) -
127`` with ``scale = (hi - lo) / 254``, so the absolute error of every value is at most ``scale / 2 = (hi - lo) /
508`` (0.2 % of the channel's range) plus float32 rounding, and the archive is 4x smaller than float32. Cosine
similarities of dequantised embeddings stay within about 1e-3 of float ones (measured 1e-4 to 9e-4 on 16-256
channel embeddings of a real S2 chip; the test allows 1e-2).

Provenance (checkpoint sha256 and preprocessing) is checked whenever an archive is opened or appended to: mixing
models or preprocessing raises :class:`ProvenanceError` naming both sides.

Writing is idempotent and single-writer. Each mosaic's sources get a content fingerprint
(:func:`source_fingerprint`: grid, tiling, provenance, the done tiles and a hash of their pooled vectors, blending;
not the URLs, so the same tiles copied elsewhere are recognised). :func:`build_archive` into an archive that already
holds exactly that mosaic and :func:`append_to_archive` of sources already present under the same (or no) name do
nothing; appending them under another name raises :class:`DuplicateSourcesError` (two names for one set of tiles
would count every tile twice in the table). ``archive.json`` is written last (atomically): it is the commit point,
and table rows of a mosaic it does not list (an append that was killed) are dropped by the next append. Both
functions hold an :class:`~pipeline.lease.OutputLease` on the archive folder while they write. The patch index is
derived data, updated after the commit: an update that was killed leaves a stale index, which the next build,
append, index or search brings up to date (resuming at the first shard not yet written).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import fsspec
import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xarray as xr

from pipeline.infer.store import open_tile_store
from pipeline.lease import LEASE_FILE, LOCK_FILE, OutputLease
from pipeline.mosaic import ann, patches
from pipeline.mosaic.quantize import dequantize, quantize
from pipeline.mosaic.stitch import MOSAIC_VAR, open_mosaic
from pipeline.mosaic.tile_table import DESCRIBE, canonical, read_table, tile_table, write_table
from pipeline.storage import exists, read_json, remove, store_path, write_json
from pipeline.storage import join as join_url

log = logging.getLogger(__name__)

FORMAT = "skypipe-embedding-archive"
VERSION = 1
_IDENTITY = ("checkpoint_sha256", "preprocessing")  # what must match for embeddings to be comparable


class ProvenanceError(ValueError):
    """Embeddings from different models or preprocessing were about to be mixed."""


class DuplicateSourcesError(ValueError):
    """The tiles of a mosaic are already in the archive under another name."""


def _summary(prov: dict[str, Any]) -> str:
    pre = canonical(prov.get("preprocessing"))
    return f"model {prov.get('model')!r} (checkpoint sha256 {prov.get('checkpoint_sha256')}, preprocessing {pre})"


def check_provenance(expected: dict[str, Any], actual: dict[str, Any], *, what: str, against: str) -> None:
    """Raise :class:`ProvenanceError` unless ``actual`` has the same checkpoint sha256 and preprocessing."""
    differ = [k for k in _IDENTITY if canonical(expected.get(k)) != canonical(actual.get(k))]
    if differ:
        raise ProvenanceError(
            f"refusing to mix embeddings: {what} comes from {_summary(actual)}, but {against} holds "
            f"{_summary(expected)} ({' and '.join(differ)} differ)"
        )


def _write_mosaic(mosaic: xr.Dataset, url: str, quantized: bool, name: str) -> None:
    emb = mosaic[MOSAIC_VAR]
    out = quantize(emb) if quantized else xr.Dataset({"embedding": emb.astype(np.float32)})
    out["valid"] = mosaic["valid"]
    out = out.assign_coords(spatial_ref=mosaic["spatial_ref"])
    keep = ("kind", "channels", "grid", "provenance", "tile_size")
    out.attrs = {k: mosaic.attrs[k] for k in keep if k in mosaic.attrs}
    out.attrs.update(name=name, quantized=quantized)
    for var in out.variables.values():
        var.encoding = {}  # the source Zarr's encodings (chunks, fill values) do not apply here
    out.to_zarr(store_path(url), zarr_format=3, consolidated=False, mode="w")


def source_fingerprint(mosaic: xr.Dataset, store: Any) -> str:
    """Content hash of what a mosaic adds to an archive (its tile store's tiles, tiling and provenance, its blend).

    Args:
        mosaic: the opened mosaic (only its ``blend`` attribute counts: the pixels follow from the tiles).
        store: its opened tile store (:func:`pipeline.infer.store.open_tile_store`).
    """
    done = store.done
    pooled = np.ascontiguousarray(np.asarray(store.group["pooled"][:], dtype=np.float32)[done])
    content = {
        "grid": [str(store.crs), [float(v) for v in tuple(store.transform)[:6]], int(store.height), int(store.width)],
        "tiling": [store.kind, list(store.channels), store.tile_size, store.overlap, store.margin],
        "context_radius": store.context_radius,
        "provenance": store.provenance,
        "tiles": [[i, *(int(v) for v in store.origins[i])] for i in done.tolist()],
        "pooled_sha256": hashlib.sha256(pooled.tobytes()).hexdigest(),
        "blend": mosaic.attrs.get("blend"),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class _Sources:
    """An opened mosaic + tile store pair and its fingerprint."""

    mosaic_url: str
    tiles_url: str
    mosaic: xr.Dataset
    store: Any
    fingerprint: str

    @classmethod
    def open(cls, mosaic_url: str, tiles_url: str) -> _Sources:
        mosaic, store = open_mosaic(mosaic_url), open_tile_store(tiles_url)
        return cls(mosaic_url, tiles_url, mosaic, store, source_fingerprint(mosaic, store))

    def record(self) -> dict[str, Any]:
        """What ``archive.json`` keeps about them."""
        return {"fingerprint": self.fingerprint, "tiles_url": self.tiles_url, "mosaic_url": self.mosaic_url,
                "tiles": len(self.store.done)}  # fmt: skip


def _patch_settings(size: int, min_valid: float, rows_per_file: int) -> dict[str, Any]:
    if size < 1:
        raise ValueError(f"patch size must be at least 1 grid cell, not {size}")
    if not 0 < min_valid <= 1:
        raise ValueError(f"min_valid is a share of a patch's pixels in (0, 1], not {min_valid}")
    return {"size": int(size), "min_valid": float(min_valid), "rows_per_file": int(rows_per_file)}


def _write_patches(archive_url: str, meta: dict[str, Any], name: str) -> dict[str, Any]:
    """Compute and write the patch files of archive mosaic ``name`` (from its stored pixels); returns the record."""
    ds = open_mosaic(join_url(archive_url, "mosaics", f"{name}.zarr"))
    settings = meta["patches"]
    grid = patches.PatchGrid.of(ds, settings["size"])
    return patches.write_patches(
        archive_url, name, dequantize(ds), grid, provenance=ds.attrs.get("provenance") or meta["provenance"],
        table_crs=meta["crs"], min_valid=settings["min_valid"], rows_per_file=settings["rows_per_file"],
    )  # fmt: skip


def ensure_patches(archive_url: str, meta: dict[str, Any], **settings: Any) -> list[str]:
    """Give every mosaic of an archive its patch files (archives written before patch tables existed).

    The caller holds the lease. ``settings`` (size, min_valid, rows_per_file) apply when the archive has none yet.
    Returns the mosaics that got patch files; commits ``archive.json`` when there were any.
    """
    if "patches" not in meta:
        meta["patches"] = _patch_settings(
            settings.get("size", patches.DEFAULT_PATCH_SIZE), settings.get("min_valid", patches.DEFAULT_MIN_VALID),
            settings.get("rows_per_file", patches.DEFAULT_ROWS_PER_FILE),
        )  # fmt: skip
    patches.remove_uncommitted(archive_url, meta["mosaics"])
    sources = meta.setdefault("sources", {})
    added = []
    for name in meta["mosaics"]:
        if "patches" not in (sources.get(name) or {}):
            sources.setdefault(name, {})["patches"] = _write_patches(archive_url, meta, name)
            added.append(name)
    if added:
        write_json(join_url(archive_url, "archive.json"), meta, indent=1)
    return added


def _add(archive_url: str, meta: dict[str, Any], src: _Sources, name: str | None) -> str | None:
    """Add ``src`` as mosaic ``name`` (default: the next number); ``None`` when the archive already holds it."""
    check_provenance(meta["provenance"], src.mosaic.attrs.get("provenance", {}), what=src.mosaic_url,
                     against=archive_url)  # fmt: skip
    check_provenance(meta["provenance"], src.store.provenance, what=src.tiles_url, against=archive_url)
    sources = meta.setdefault("sources", {})
    same = [n for n in meta["mosaics"] if (sources.get(n) or {}).get("fingerprint") == src.fingerprint]
    if same and name in (None, *same):
        log.info("%s already holds the tiles of %s as mosaic %r: nothing to append", archive_url, src.tiles_url,
                 same[0])  # fmt: skip
        return None
    if same:
        raise DuplicateSourcesError(
            f"{archive_url} already holds the tiles of {src.tiles_url} as mosaic {same[0]!r} (sources fingerprint "
            f"{src.fingerprint[:12]}); appending them again as {name!r} would count every tile twice"
        )
    name = name or f"{len(meta['mosaics']):04d}"
    if name in meta["mosaics"]:
        raise ValueError(f"{archive_url} already has a mosaic named {name!r} (from other tiles)")
    _write_mosaic(src.mosaic, join_url(archive_url, "mosaics", f"{name}.zarr"), meta["quantized"], name)
    patch_record = _write_patches(archive_url, meta, name)
    table_url = join_url(archive_url, "tiles.parquet")
    new = tile_table(src.store, name, meta["crs"])
    if exists(table_url):
        old = read_table(table_url).replace_schema_metadata(None)
        if old.schema.field("vector").type != new.schema.field("vector").type:
            raise ProvenanceError(f"vector type {new.schema.field('vector').type} != {old.schema.field('vector').type}")
        committed = pc.is_in(old["mosaic"], value_set=pa.array(meta["mosaics"], pa.string()))
        if not pc.all(committed).as_py():  # rows of an append killed before it wrote archive.json
            orphans = len(old) - pc.sum(committed).as_py()
            log.warning("%s: dropping %d table rows of an append that did not finish", archive_url, orphans)
            old = old.filter(committed)
        new = pa.concat_tables([old, new])
    write_table(table_url, new, meta["crs"])
    meta["mosaics"].append(name)
    sources[name] = {**src.record(), "patches": patch_record}
    write_json(join_url(archive_url, "archive.json"), meta, indent=1)  # the commit point
    ann.update_index(archive_url, meta)
    return name


def _clear(archive_url: str) -> None:
    """Remove an archive's contents but not its lease (``archive.json`` first: a half-cleared one is no archive)."""
    remove(join_url(archive_url, "archive.json"))
    fs, path = fsspec.core.url_to_fs(archive_url)
    if not fs.exists(path):
        return
    for entry in fs.ls(path, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1] not in (LEASE_FILE, LOCK_FILE):
            fs.rm(entry, recursive=True)


def _settings(meta: dict[str, Any]) -> str:
    """Everything in ``archive.json`` but the mosaic list, canonically (to compare two archives)."""
    return json.dumps({k: v for k, v in meta.items() if k not in ("mosaics", "sources")}, sort_keys=True, default=str)


def _read_meta(archive_url: str) -> dict[str, Any] | None:
    meta = read_json(join_url(archive_url, "archive.json"), default=None)
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def build_archive(
    mosaic_url: str,
    tiles_url: str,
    archive_url: str,
    quantize: bool = True,
    *,
    name: str = "0000",
    break_lease: bool = False,
    patch_size: int = patches.DEFAULT_PATCH_SIZE,
    min_valid: float = patches.DEFAULT_MIN_VALID,
    rows_per_file: int = patches.DEFAULT_ROWS_PER_FILE,
) -> str:
    """Create an embedding archive from one stitched mosaic and its tile store (replacing any other archive there).

    Writes the int8 mosaic, the per-tile table, the regular patch table and its nearest-neighbour index. If
    ``archive_url`` already is exactly this archive (same sources fingerprint, name, quantization, patch settings
    and provenance, and nothing else), nothing is written (a stale index is brought up to date).

    Args:
        mosaic_url: an ``embeddings`` mosaic from :func:`pipeline.mosaic.stitch.stitch_tiles`.
        tiles_url: the tile store it was stitched from (per-tile pooled vectors, footprints, provenance).
        archive_url: output folder (local path or fsspec URL).
        quantize: store int8 + per-channel scale / zero point (default) instead of float32.
        name: the mosaic's name inside the archive.
        break_lease: take the archive's lease even if another run seems to hold it (that run is dead).
        patch_size: side of the patch table's patches, in grid cells (8: 80 m at 10 m).
        min_valid: share of a patch's pixels that must have an embedding for the patch to get a row.
        rows_per_file: patch rows per Parquet file (about).

    Returns:
        ``archive_url``.

    Raises:
        pipeline.lease.LeaseHeldError: another run is writing this archive.
    """
    patch_settings = _patch_settings(patch_size, min_valid, rows_per_file)
    with OutputLease(archive_url, what="embedding archive", force=break_lease):
        src = _Sources.open(mosaic_url, tiles_url)
        prov = {k: src.store.provenance.get(k) for k in DESCRIBE}
        meta = {"format": FORMAT, "version": VERSION, "provenance": prov, "quantized": bool(quantize),
                "crs": src.store.crs, "patches": patch_settings, "mosaics": [], "sources": {}}  # fmt: skip
        old = _read_meta(archive_url)
        if old is not None:
            old_source = (old.get("sources") or {}).get(name) or {}
            if (
                _settings(old) == _settings(meta)
                and old["mosaics"] == [name]
                and old_source.get("fingerprint") == src.fingerprint
            ):
                log.info("%s already holds mosaic %r of %s: up to date", archive_url, name, tiles_url)
                if not ann.index_status(archive_url, old).fresh:
                    ann.update_index(archive_url, old)
                return archive_url
            dropped = [n for n in old["mosaics"] if n != name]
            if dropped:
                log.warning("%s: rebuilding the archive drops its other mosaics %s", archive_url, dropped)
        _clear(archive_url)
        _add(archive_url, meta, src, name)
    return archive_url


def append_to_archive(
    archive_url: str, mosaic_url: str, tiles_url: str, *, name: str | None = None, break_lease: bool = False
) -> str:
    """Add another mosaic (same model and preprocessing; any region or time) to an existing archive.

    Appending sources the archive already holds (same fingerprint) under the same name or without a name does
    nothing; under another name it raises :class:`DuplicateSourcesError`.

    Raises:
        ProvenanceError: the new tiles or mosaic come from another checkpoint or preprocessing.
        DuplicateSourcesError: these tiles are already in the archive under another name.
        pipeline.lease.LeaseHeldError: another run is writing this archive.
    """
    with OutputLease(archive_url, what="embedding archive", force=break_lease):
        meta = open_archive(archive_url).meta
        ensure_patches(archive_url, meta)  # an archive of an older version gets its patch table first
        if _add(archive_url, meta, _Sources.open(mosaic_url, tiles_url), name) is None:
            ann.update_index(archive_url, meta)  # nothing new; finish an index update a killed append left
    return archive_url


def index_archive(
    archive_url: str, *, rebuild: bool = False, break_lease: bool = False, **patch_settings: Any
) -> dict[str, Any]:
    """Bring an archive's patch table and index up to date (build them for archives written before they existed).

    Args:
        rebuild: retrain the index and re-encode every shard.
        patch_settings: ``size``, ``min_valid``, ``rows_per_file`` for an archive that has no patch table yet.

    Returns:
        the index's ``index.json`` content.
    """
    with OutputLease(archive_url, what="embedding archive", force=break_lease):
        meta = archive_meta(archive_url)
        ensure_patches(archive_url, meta, **patch_settings)
        return ann.update_index(archive_url, meta, rebuild=rebuild)


def archive_meta(archive_url: str) -> dict[str, Any]:
    """An archive's ``archive.json`` (no table or mosaic is opened); a clear error when it is not an archive."""
    meta = _read_meta(archive_url)
    if meta is None:
        raise FileNotFoundError(
            f"{archive_url} is not an embedding archive (no {FORMAT} archive.json); build one with "
            "`skypipe archive build` or `skypipe run` of an embeddings job"
        )
    return meta


@dataclass
class Archive:
    """An opened, provenance-checked archive."""

    url: str
    meta: dict[str, Any]
    tiles: gpd.GeoDataFrame

    @property
    def provenance(self) -> dict[str, Any]:
        """Model and preprocessing shared by everything in the archive."""
        return self.meta["provenance"]

    @property
    def names(self) -> list[str]:
        """Mosaic names, in the order they were added."""
        return list(self.meta["mosaics"])

    def mosaic(self, name: str | None = None) -> xr.Dataset:
        """The stored mosaic ``name`` (default: the first), lazily."""
        name = name or self.names[0]
        if name not in self.names:
            raise KeyError(f"{self.url} has no mosaic {name!r} (has {self.names})")
        return open_mosaic(join_url(self.url, "mosaics", f"{name}.zarr"))

    def embeddings(self, name: str | None = None) -> xr.DataArray:
        """Dequantised float32 ``(band, y, x)`` embeddings of mosaic ``name``, with CRS, lazily."""
        ds = self.mosaic(name)
        emb = dequantize(ds).assign_coords(spatial_ref=ds["spatial_ref"])
        return emb.rio.write_crs(ds.rio.crs).rio.write_transform(ds.rio.transform())


def open_archive(archive_url: str, expect: dict[str, Any] | None = None) -> Archive:
    """Open an archive, checking that its table and mosaics (and ``expect``, if given) share one provenance."""
    meta = read_json(join_url(archive_url, "archive.json"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{archive_url} is not a {FORMAT} (format {meta.get('format')!r})")
    if expect is not None:
        check_provenance(meta["provenance"], expect, what="the expected provenance", against=archive_url)
    tiles = gpd.read_parquet(join_url(archive_url, "tiles.parquet"))
    for model, sha, pre in tiles[["model", "checkpoint_sha256", "preprocessing"]].drop_duplicates().itertuples(False):
        row = {"checkpoint_sha256": sha, "preprocessing": json.loads(pre), "model": model}
        check_provenance(meta["provenance"], row, what=f"{archive_url}/tiles.parquet", against="archive.json")
    archive = Archive(archive_url, meta, tiles)
    for name in archive.names:
        prov = archive.mosaic(name).attrs.get("provenance", {})
        check_provenance(meta["provenance"], prov, what=f"mosaic {name!r}", against=f"{archive_url}/archive.json")
    return archive
