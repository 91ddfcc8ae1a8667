"""The tile store: the on-disk contract between the inference stage (writer) and the mosaic stage (reader).

This module is the only one that knows the layout; the inference actors write through :func:`open_or_create_store`,
:func:`write_tile` and :class:`TileManifest`, and every reader (mosaic, archive, status) goes through
:func:`open_tile_store`. Layout under a job's output folder (local path or fsspec URL)::

    tiles.zarr/                 Zarr v3 group
        attrs   grid {crs (WKT), transform (a, b, c, d, e, f), height, width}, kind, product (continuous |
                classes | tile_classes | tile_labels), channels, class_names, class_colors, periods, tile_size,
                overlap, margin, context_radius, output_ratio (output pixels per 10 m cell: 1, or finer for maps at
                the finest input resolution; lengths here are in output pixels), padded [rows, cols], n_tiles,
                provenance {model, code_version, checkpoint, checkpoint_sha256,
                preprocessing {modality: {bands, mean, std, units}}, cube, time, modalities}
        data    (n_tiles, C, S, S) float32, chunks (1, C, S, S), NaN fill: model output, NaN where no valid input
                or outside the grid
        origin  (n_tiles, 2) int64: (row, col) of each tile's top-left pixel on the output grid
        valid   (n_tiles, S, S) uint8, chunks (1, S, S), 0 fill: 1 where the model had any valid input
        pooled  (n_tiles, C) float32, chunks (1, C), NaN fill: mean of ``data`` over valid pixels; for per-tile
                products (``tile_classes``, ``tile_labels``) the tile's own vector, and ``data`` stays empty
    manifest/tiles/<tile_id>.json   {tile_id, index, origin, status: done|skipped|failed, reason, error, attempts,
                                     seconds, valid_fraction, worker, finished_at}
    detections/<tile_id>.parquet    box products (``boxes``, detection) only: the tile's decoded objects, one row each
                                    (see :data:`DETECTION_COLUMNS`); ``pooled`` holds the tile's objects per class

One chunk per tile, so every tile write is chunk-aligned and concurrent writers never touch the same chunk. A
manifest record is written atomically only after the tile's arrays (and its detections file), so "done" in the
manifest means the tile is complete; tiles never written read back as fill. Tile ids are the rows of the arrays. A
detections file is written atomically and whole; a tile rerun after a kill rewrites it with the same content.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr
from affine import Affine
from zarr.codecs import BloscCodec

from pipeline import storage

log = logging.getLogger(__name__)

TILES = "tiles.zarr"
MANIFEST = "manifest/tiles"
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
"""[ours] Embeddings barely compress (about 0.9 with any codec); lz4 writes a 128 x 64 x 64 tile in half the time
of Zarr's default zstd, which matters when a GPU produces tiles faster than one CPU core can compress them."""
FINISHED = ("done", "skipped")

# Attributes that must match for a run to continue an existing store; code_version may differ.
_IDENTITY = ("kind", "channels", "tile_size", "overlap", "margin", "context_radius", "grid", "n_tiles")
_PROVENANCE_IDENTITY = ("model", "checkpoint_sha256", "preprocessing", "cube", "time", "modalities")


class TileStoreMismatchError(ValueError):
    """An existing tile store was written by a different job (model, checkpoint, tiling, grid, ...)."""


def tiles_url(output_url: str) -> str:
    """The tile store of a job output folder."""
    return storage.join(output_url, TILES)


def output_of(tiles: str) -> str:
    """The job output folder of a tile store URL."""
    return storage.parent(tiles)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _identity(attrs: Mapping[str, Any]) -> dict[str, Any]:
    ident = {k: attrs.get(k) for k in _IDENTITY}
    prov = attrs.get("provenance") or {}
    ident.update({f"provenance.{k}": prov.get(k) for k in _PROVENANCE_IDENTITY})
    return _jsonable(ident)


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def open_or_create_store(url: str, attrs: Mapping[str, Any], origins: np.ndarray) -> zarr.Group:
    """Create the tile store at ``url``, or reopen it after checking it belongs to the same job.

    Raises:
        TileStoreMismatchError: the store exists with other model / checkpoint / tiling / grid attributes.

    """
    attrs = _jsonable(dict(attrs))
    n, C, S = int(attrs["n_tiles"]), len(attrs["channels"]), int(attrs["tile_size"])
    try:
        group = zarr.open_group(storage.store_path(url), mode="r+", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        group = None
    if group is not None and group.attrs.asdict():
        stored, wanted = _identity(group.attrs.asdict()), _identity(attrs)
        diff = [k for k in wanted if stored.get(k) != wanted[k]]
        if diff:
            for k in diff:
                log.info("%s: %s stored %s, this job %s", url, k, _short(stored.get(k)), _short(wanted[k]))
            names = ", ".join(k.removeprefix("provenance.") for k in diff)
            raise TileStoreMismatchError(
                f"{url} holds tiles of a different job ({names} differ); refusing to mix outputs.\n"
                "Choose another output.path, or delete the old outputs to recompute them."
            )
    else:
        group = zarr.open_group(storage.store_path(url), mode="a", zarr_format=3)
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


def open_for_writing(url: str) -> zarr.Group:
    """An existing tile store opened for tile writes (actors; the runner created it)."""
    return zarr.open_group(storage.store_path(url), mode="r+", zarr_format=3)


def write_tile(group: zarr.Group, index: int, data: np.ndarray | None, valid: np.ndarray, pooled: np.ndarray) -> None:
    """Write one tile's (C, S, S) output, (S, S) mask and (C,) pooled vector: exactly one chunk of each array.

    ``data`` None (per-tile products such as scene classes) leaves the map chunk unwritten: it reads back as NaN
    and costs no storage.
    """
    if data is not None:
        group["data"][index] = data
    group["valid"][index] = valid
    group["pooled"][index] = pooled


class TileManifest:
    """Per-tile status records under ``{output}/manifest/tiles``."""

    def __init__(self, output_url: str) -> None:
        self.url = storage.join(output_url, MANIFEST)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def path(self, tile_id: int) -> str:
        """Record URL of ``tile_id``."""
        return storage.join(self.url, f"{int(tile_id)}.json")

    def write(self, record: Mapping[str, Any]) -> None:
        """Store ``record`` (needs ``tile_id``) atomically."""
        storage.write_json(self.path(int(record["tile_id"])), _jsonable(dict(record)))

    def read(self, tile_id: int) -> dict[str, Any] | None:
        """One record, or ``None``."""
        return storage.read_json(self.path(tile_id), default=None)

    def read_all(self) -> dict[int, dict[str, Any]]:
        """Every record, keyed by tile id (temporary files of interrupted writes are ignored)."""
        if not self.fs.exists(self.root):
            return {}
        paths = [p for p in self.fs.ls(self.root, detail=False) if p.endswith(".json") and not storage.is_temporary(p)]
        blobs = self.fs.cat(paths) if paths else {}  # one batched request set on object stores
        records = {}
        for path in paths:
            rec = json.loads(blobs[path])
            records[int(rec["tile_id"])] = rec
        return records


DETECTIONS = "detections"
DETECTION_COLUMNS: dict[str, str] = {
    "tile_id": "int64", "det": "int32", "class_id": "int32", "score": "float32",
    "cx": "float64", "cy": "float64", "w": "float64", "h": "float64", "angle": "float64",
}  # fmt: skip
"""Columns of a tile's detections: the tile, the object's index in it (by descending score), its class index and
score, and its box on the store's output grid: centre column / row, width, height in output pixels and the angle of
the width side from +column towards +row in radians (:mod:`pipeline.geometry.boxes`' convention). The grid transform
(``attrs["grid"]``) maps them to the CRS."""


def detections_url(output_url: str, tile_id: int) -> str:
    """The detections file of ``tile_id``."""
    return storage.join(output_url, DETECTIONS, f"{int(tile_id)}.parquet")


def write_detections(output_url: str, tile_id: int, table: Mapping[str, np.ndarray],
                     meta: Mapping[str, Any] | None = None) -> None:  # fmt: skip
    """Write one tile's detections (columns of :data:`DETECTION_COLUMNS`, any number of rows) atomically.

    ``meta`` (e.g. the decoding thresholds) goes into the file's schema metadata. Call it before the tile's
    manifest record.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = set(DETECTION_COLUMNS) - set(table)
    if missing:
        raise ValueError(f"detections of tile {tile_id} lack columns {sorted(missing)}")
    arrays = {k: pa.array(np.asarray(table[k]).astype(t)) for k, t in DETECTION_COLUMNS.items()}
    schema_meta = {b"skypipe": json.dumps(_jsonable(dict(meta or {}))).encode()}
    buffer = io.BytesIO()
    pq.write_table(pa.table(arrays).replace_schema_metadata(schema_meta), buffer)
    storage.write_bytes(detections_url(output_url, tile_id), buffer.getvalue())


def read_detections(output_url: str, tile_ids: Sequence[int]) -> tuple[Any, dict[str, Any]]:
    """The detections of ``tile_ids`` (done tiles) as one pandas table in tile order, and the files' metadata.

    Raises:
        FileNotFoundError: a done tile without its detections file (a store of another layout, or tampered with).
    """
    import pandas as pd
    import pyarrow.parquet as pq

    urls = [detections_url(output_url, t) for t in tile_ids]
    fs, _ = fsspec.core.url_to_fs(output_url)
    paths = [fsspec.core.url_to_fs(u)[1] for u in urls]
    blobs = fs.cat(paths) if paths else {}
    frames, meta = [], {}
    for t, path in zip(tile_ids, paths):
        if path not in blobs:
            raise FileNotFoundError(f"tile {t} is done but its detections file {path} is missing")
        table = pq.read_table(io.BytesIO(blobs[path]))
        meta = meta or json.loads((table.schema.metadata or {}).get(b"skypipe", b"{}"))
        frames.append(table.to_pandas())
    empty = pd.DataFrame({k: pd.Series(dtype=t) for k, t in DETECTION_COLUMNS.items()})
    return (pd.concat(frames, ignore_index=True) if frames else empty), meta


def counts(records: Mapping[int, Mapping[str, Any]], total: int) -> dict[str, int]:
    """Tiles per status (``done``, ``skipped``, ``failed``) and ``pending`` (no record yet) out of ``total``."""
    out = {s: sum(r.get("status") == s for r in records.values()) for s in ("done", "skipped", "failed")}
    out["pending"] = total - sum(out.values())
    return out


def fingerprint(output_url: str) -> str:
    """Hash of the finished tiles (id, status, finish time): what the stages after inference depend on."""
    records = TileManifest(output_url).read_all()
    done = sorted((t, r.get("status"), r.get("finished_at")) for t, r in records.items())
    return hashlib.sha256(json.dumps(done, default=str).encode()).hexdigest()


@dataclass
class TileStore:
    """An opened tile store (read side): its grid, metadata, tile origins and which tiles are done."""

    url: str
    group: zarr.Group
    attrs: dict[str, Any]
    transform: Affine
    origins: np.ndarray  # (N, 2) int64
    done: np.ndarray  # (M,) int64 tile ids of done tiles, sorted

    @property
    def crs(self) -> str:
        """CRS of the output grid (WKT)."""
        return str(self.attrs["grid"]["crs"])

    @property
    def height(self) -> int:
        """Rows of the output grid."""
        return int(self.attrs["grid"]["height"])

    @property
    def width(self) -> int:
        """Columns of the output grid."""
        return int(self.attrs["grid"]["width"])

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the output grid."""
        return self.height, self.width

    @property
    def kind(self) -> str:
        """Output kind name (``embeddings``, ``segmentation``, ...)."""
        return str(self.attrs["kind"])

    @property
    def product(self) -> str:
        """What the channels are: ``continuous`` values or per-class scores (``classes``)."""
        return str(self.attrs.get("product", "continuous"))

    @property
    def channels(self) -> list[str]:
        """Channel names."""
        return [str(c) for c in self.attrs["channels"]]

    @property
    def class_names(self) -> list[str] | None:
        """Class names of a class-score product."""
        names = self.attrs.get("class_names")
        return None if names is None else [str(n) for n in names]

    @property
    def class_colors(self) -> list[str] | None:
        """``#rrggbb`` colour of each class (class-score products)."""
        return self.attrs.get("class_colors")

    @property
    def tile_size(self) -> int:
        """Tile side in output pixels."""
        return int(self.attrs["tile_size"])

    @property
    def overlap(self) -> int:
        """Pixels shared by neighbouring tiles."""
        return int(self.attrs.get("overlap", 0))

    @property
    def margin(self) -> int:
        """Zero-weight band at inner tile edges (blending)."""
        return int(self.attrs.get("margin", 0))

    @property
    def context_radius(self) -> int | None:
        """Stage-3/4 neighbourhood radius the tiles were computed with (None: global)."""
        return self.attrs.get("context_radius")

    @property
    def provenance(self) -> dict[str, Any]:
        """Model, checkpoint, preprocessing, cube and time of the tiles."""
        return dict(self.attrs.get("provenance", {}))

    def footprint(self, index: int) -> tuple[int, int, int, int]:
        """``(row0, row1, col0, col1)`` of tile ``index`` clipped to the grid (end-exclusive)."""
        r, c = (int(v) for v in self.origins[index])
        s = self.tile_size
        return max(r, 0), min(r + s, self.height), max(c, 0), min(c + s, self.width)

    def footprint_bounds(self, index: int) -> tuple[float, float, float, float]:
        """``(minx, miny, maxx, maxy)`` of tile ``index``'s clipped footprint in the grid CRS."""
        r0, r1, c0, c1 = self.footprint(index)
        xs, ys = zip(*(self.transform @ (c, r) for c, r in ((c0, r0), (c1, r1))))
        return min(xs), min(ys), max(xs), max(ys)


def open_tile_store(url: str) -> TileStore:
    """Open the tile store at ``url`` (a ``tiles.zarr`` group) and resolve which of its tiles are done."""
    try:
        group = zarr.open_group(storage.store_path(url), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise FileNotFoundError(f"no tile store at {url} (run the job's inference stage first)") from None
    attrs = group.attrs.asdict()
    missing = {"grid", "kind", "channels", "tile_size"} - set(attrs)
    if missing:
        raise ValueError(f"{url} is not a tile store: attrs {sorted(missing)} missing")
    transform = Affine(*attrs["grid"]["transform"][:6])
    if transform.b or transform.d:
        raise ValueError(f"{url}: rotated grids are not supported (transform {tuple(transform)[:6]})")
    origins = np.asarray(group["origin"][:], dtype=np.int64).reshape(-1, 2)
    records = TileManifest(output_of(url)).read_all()
    done = np.array(sorted(t for t, r in records.items() if r.get("status") == "done"), dtype=np.int64)
    if len(done) and not (done[0] >= 0 and done[-1] < len(origins)):
        raise ValueError(f"{url}: manifest records name tiles outside 0..{len(origins) - 1}")
    if len(done) == 0:
        log.warning("%s: no tile is done; the mosaic will be empty", url)
    return TileStore(url=url, group=group, attrs=attrs, transform=transform, origins=origins, done=done)
