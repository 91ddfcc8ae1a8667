"""Reading the inference stage's tile store (``{job}/tiles.zarr``) and its per-tile manifest.

Layout read here (written by ``pipeline.infer``)::

    {job}/tiles.zarr            Zarr v3 group; attrs grid {crs, transform, height, width}, kind, channels,
                                tile_size, overlap, margin, context_radius, provenance
        data    (N, C, S, S) float32, one chunk per tile
        origin  (N, 2) int64    (row, col) of each tile's top-left pixel on the output grid
        valid   (N, S, S) uint8
        pooled  (N, C) float32  per-tile mean embedding
    {job}/manifest/tiles/<tile_id>.json   {tile_id, status: done|failed|skipped, ...}

A manifest record is matched to its row of the arrays by, in order: an ``index`` field, an ``origin`` field
(``[row, col]``), or a ``tile_id`` that is an integer. Only ``done`` tiles are used. Without any manifest folder
every tile counts as done: tiles that were never written read back with ``valid == 0`` and so contribute nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr
from affine import Affine
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)


def parent_url(url: str) -> str:
    """The folder that holds ``url`` (a local path or fsspec URL)."""
    head, _, _ = url.rstrip("/").rpartition("/")
    return head or "."


def store_path(url: str) -> str:
    """``url`` as Zarr wants it: ``file://`` URLs become plain paths, other fsspec URLs pass through unchanged.

    (fsspec's local file system does not create parent folders on write; ``s3://`` and ``memory://`` need none.)
    """
    fs, path = fsspec.core.url_to_fs(url)
    return path if isinstance(fs, LocalFileSystem) else url


def join_url(url: str, *parts: str) -> str:
    """``url/part/...`` for local paths and fsspec URLs alike."""
    return "/".join([url.rstrip("/"), *parts])


@dataclass
class TileStore:
    """An opened tile store: its grid, metadata, tile origins and which tiles are done."""

    url: str
    group: zarr.Group
    crs: str
    transform: Affine
    height: int
    width: int
    kind: str
    channels: list[str]
    tile_size: int
    overlap: int
    provenance: dict[str, Any]
    origins: np.ndarray  # (N, 2) int64
    done: np.ndarray  # (M,) int64 row indices of done tiles, sorted
    tile_ids: dict[int, str] = field(default_factory=dict)
    margin: int = 0  # zero-weight band at inner tile edges (blending)
    context_radius: int | None = None  # stage-3/4 neighbourhood radius the tiles were computed with (None: global)

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the output grid."""
        return self.height, self.width

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


def read_manifest(job_url: str) -> dict[str, dict[str, Any]] | None:
    """All records of ``{job}/manifest/tiles/*.json`` keyed by tile id, or ``None`` if there is no manifest."""
    fs, root = fsspec.core.url_to_fs(join_url(job_url, "manifest", "tiles"))
    if not fs.exists(root):
        return None
    paths = [p for p in fs.find(root) if p.endswith(".json")]
    blobs = fs.cat(paths) if paths else {}  # one batched request set on object stores
    records = {}
    for path in paths:
        rec = json.loads(blobs[path])
        records[str(rec.get("tile_id", path.rsplit("/", 1)[-1][: -len(".json")]))] = rec
    return records


def _record_index(rec: dict[str, Any], tile_id: str, by_origin: dict[tuple[int, int], int]) -> int | None:
    if "index" in rec:
        return int(rec["index"])
    if "origin" in rec:
        return by_origin.get(tuple(int(v) for v in rec["origin"]))
    try:
        return int(tile_id)
    except ValueError:
        return None


def open_tile_store(tiles_url: str) -> TileStore:
    """Open ``tiles_url`` (a ``tiles.zarr`` group) and resolve which of its tiles are done."""
    group = zarr.open_group(store_path(tiles_url), mode="r")
    attrs = group.attrs.asdict()
    missing = {"grid", "kind", "channels", "tile_size"} - set(attrs)
    if missing:
        raise ValueError(f"{tiles_url} is not a tile store: attrs {sorted(missing)} missing")
    grid = attrs["grid"]
    transform = Affine(*grid["transform"][:6])
    if transform.b or transform.d:
        raise ValueError(f"{tiles_url}: rotated grids are not supported (transform {tuple(transform)[:6]})")
    origins = np.asarray(group["origin"][:], dtype=np.int64).reshape(-1, 2)
    records = read_manifest(parent_url(tiles_url))
    tile_ids: dict[int, str] = {}
    if records is None:
        log.warning("%s: no manifest/tiles folder; treating all %d tiles as done", tiles_url, len(origins))
        done = np.arange(len(origins))
    else:
        by_origin = {(int(r), int(c)): i for i, (r, c) in enumerate(origins)}
        for tile_id, rec in records.items():
            if rec.get("status") != "done":
                continue
            index = _record_index(rec, tile_id, by_origin)
            if index is None or not 0 <= index < len(origins):
                raise ValueError(f"{tiles_url}: manifest record {tile_id!r} matches no tile (index {index})")
            tile_ids[index] = tile_id
        done = np.array(sorted(tile_ids), dtype=np.int64)
        if len(done) == 0:
            log.warning("%s: no tile is done; the mosaic will be empty", tiles_url)
    return TileStore(
        url=tiles_url,
        group=group,
        crs=grid["crs"],
        transform=transform,
        height=int(grid["height"]),
        width=int(grid["width"]),
        kind=str(attrs["kind"]),
        channels=[str(c) for c in attrs["channels"]],
        tile_size=int(attrs["tile_size"]),
        overlap=int(attrs.get("overlap", 0)),
        margin=int(attrs.get("margin", 0)),
        context_radius=attrs.get("context_radius"),
        provenance=dict(attrs.get("provenance", {})),
        origins=origins,
        done=done,
        tile_ids={i: tile_ids.get(i, str(i)) for i in done.tolist()},
    )
