"""The tile store the inference stage writes and the mosaic stage reads, and its per-tile manifest.

Layout under a job's output folder (local path or fsspec URL)::

    tiles.zarr/                 Zarr v3 group
        attrs   grid {crs (WKT), transform (a, b, c, d, e, f), height, width}, kind, channels, tile_size, overlap,
                margin, context_radius, padded [rows, cols], n_tiles, provenance {model, code_version, checkpoint,
                checkpoint_sha256, preprocessing {modality: {bands, mean, std, units}}, cube, time, modalities}
        data    (n_tiles, C, S, S) float32, chunks (1, C, S, S), NaN fill: model output, NaN where no valid input
        origin  (n_tiles, 2) int64: (row, col) of each tile's top-left pixel on the output grid
        valid   (n_tiles, S, S) uint8, chunks (1, S, S), 0 fill: 1 where the model had any valid input
        pooled  (n_tiles, C) float32, chunks (1, C), NaN fill: mean of ``data`` over valid pixels
    manifest/tiles/<tile_id>.json   {tile_id, index, origin, status: done|skipped|failed, reason, error, attempts,
                                     seconds, valid_fraction, worker, finished_at}

One chunk per tile, so every tile write is chunk-aligned and concurrent writers never touch the same chunk. A
manifest record is written atomically (temporary file + rename; a single PUT on object stores) only after the
tile's arrays, so "done" in the manifest means the arrays are complete; tiles never written read back as fill.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import BloscCodec

TILES = "tiles.zarr"
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
"""[ours] Embeddings barely compress (about 0.9 with any codec); lz4 writes a 128 x 64 x 64 tile in half the time
of Zarr's default zstd, which matters when a GPU produces tiles faster than one CPU core can compress them."""
MANIFEST = "manifest/tiles"

# Attributes that must match for a run to continue an existing store; code_version may differ.
_IDENTITY = ("kind", "channels", "tile_size", "overlap", "margin", "context_radius", "grid", "n_tiles")
_PROVENANCE_IDENTITY = ("model", "checkpoint_sha256", "preprocessing", "cube", "time", "modalities")


class TileStoreMismatchError(ValueError):
    """An existing tile store was written by a different job (model, checkpoint, tiling, grid, ...)."""


def join(url: str, *parts: str) -> str:
    """``url/part/...`` for local paths and fsspec URLs alike."""
    return "/".join([url.rstrip("/"), *parts])


def tiles_url(output_url: str) -> str:
    """The tile store of a job output folder."""
    return join(output_url, TILES)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _identity(attrs: Mapping[str, Any]) -> dict[str, Any]:
    ident = {k: attrs.get(k) for k in _IDENTITY}
    prov = attrs.get("provenance") or {}
    ident.update({f"provenance.{k}": prov.get(k) for k in _PROVENANCE_IDENTITY})
    return _jsonable(ident)


def open_or_create_store(url: str, attrs: Mapping[str, Any], origins: np.ndarray) -> zarr.Group:
    """Create the tile store at ``url``, or reopen it after checking it belongs to the same job.

    Raises:
        TileStoreMismatchError: the store exists with other model / checkpoint / tiling / grid attributes.

    """
    attrs = _jsonable(dict(attrs))
    n, C, S = int(attrs["n_tiles"]), len(attrs["channels"]), int(attrs["tile_size"])
    try:
        group = zarr.open_group(url, mode="r+", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        group = None
    if group is not None and group.attrs.asdict():
        stored, wanted = _identity(group.attrs.asdict()), _identity(attrs)
        diff = [k for k in wanted if stored.get(k) != wanted[k]]
        if diff:
            lines = [f"  {k}: stored {_short(stored.get(k))}, this job {_short(wanted[k])}" for k in diff]
            raise TileStoreMismatchError(
                f"{url} holds tiles of a different job; refusing to mix outputs:\n"
                + "\n".join(lines)
                + "\nChoose another output.path, or delete the old outputs to recompute them."
            )
    else:
        group = zarr.open_group(url, mode="a", zarr_format=3)
        group.attrs.update(attrs)
    specs = {
        "data": ((n, C, S, S), (1, C, S, S), "float32", np.nan, ("tile", "channel", "y", "x")),
        "valid": ((n, S, S), (1, S, S), "uint8", 0, ("tile", "y", "x")),
        "pooled": ((n, C), (1, C), "float32", np.nan, ("tile", "channel")),
        "origin": ((n, 2), (max(min(n, 65536), 1), 2), "int64", -1, ("tile", "rowcol")),
    }
    for name, (shape, chunks, dtype, fill, dims) in specs.items():
        if name in group:
            if group[name].shape != shape or group[name].chunks != chunks:
                raise TileStoreMismatchError(f"{url}/{name}: shape/chunks {group[name].shape} differ from {shape}")
            continue
        arr = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, dimension_names=dims)
        if name == "origin":
            arr[:] = origins
    if not np.array_equal(group["origin"][:], origins):
        raise TileStoreMismatchError(f"{url}: stored tile origins differ from this job's tiling")
    return group


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def write_tile(group: zarr.Group, index: int, data: np.ndarray, valid: np.ndarray, pooled: np.ndarray) -> None:
    """Write one tile's (C, S, S) output, (S, S) mask and (C,) pooled vector: exactly one chunk of each array."""
    group["data"][index] = data
    group["valid"][index] = valid
    group["pooled"][index] = pooled


class TileManifest:
    """Per-tile status records under ``{output}/manifest/tiles``."""

    def __init__(self, output_url: str) -> None:
        self.url = join(output_url, MANIFEST)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def path(self, tile_id: int) -> str:
        """Record path of ``tile_id``."""
        return f"{self.root.rstrip('/')}/{tile_id}.json"

    def write(self, record: Mapping[str, Any]) -> None:
        """Store ``record`` (needs ``tile_id``) atomically."""
        path = self.path(int(record["tile_id"]))
        data = json.dumps(_jsonable(dict(record)), sort_keys=True).encode()
        if isinstance(self.fs, LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def read(self, tile_id: int) -> dict[str, Any] | None:
        """One record, or ``None``."""
        try:
            return json.loads(self.fs.cat_file(self.path(tile_id)))
        except FileNotFoundError:
            return None

    def read_all(self) -> dict[int, dict[str, Any]]:
        """Every record, keyed by tile id (temporary files of interrupted writes are ignored)."""
        if not self.fs.exists(self.root):
            return {}
        paths = [p for p in self.fs.ls(self.root, detail=False) if p.endswith(".json")]
        blobs = self.fs.cat(paths) if paths else {}
        records = {}
        for path in paths:
            rec = json.loads(blobs[path])
            records[int(rec["tile_id"])] = rec
        return records
