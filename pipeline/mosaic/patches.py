"""The patch table of an embedding archive: one int8 vector per regular ``P x P`` patch of every mosaic's grid.

Layout (inside the archive folder, :mod:`pipeline.mosaic.archive`)::

    patches/<mosaic>/part-00000.parquet, part-00001.parquet, ...

One folder per mosaic, so appending a job's region adds files and never rewrites the others. Each file is
GeoParquet (``geopandas.read_parquet(file)``; ``pyarrow.dataset.dataset("ARCHIVE/patches")`` reads them all), one
row per patch, in the order the mosaic is read (windows of patches, row by row)::

    patch_id           prow * patch columns + pcol (unique within the mosaic)
    mosaic             the mosaic's name in the archive
    prow, pcol         the patch's row and column on the patch grid; it covers pixels
    row, col           [row, row + P) x [col, col + P) of the mosaic grid (patches are aligned to the grid's origin,
                       not to inference tiles; edge patches are cut at the grid's edge)
    valid_fraction     share of the patch's P x P pixels with an embedding (patches under ``min_valid`` are left out)
    lon, lat           the patch centre in WGS84 degrees (bounding-box filters, maps)
    time_start, time_end   the job's time range
    vector             fixed_size_list<int8>[C]: the mean embedding of the patch's valid pixels, quantised per row
    scale              float32: ``vector_float = scale * vector`` (symmetric: scale = max |x| / 127)
    model, code_version, checkpoint, checkpoint_sha256, preprocessing (JSON)   provenance, as in ``tiles.parquet``
    geometry           the patch footprint (polygon) in the archive's table CRS (``archive.json`` ``crs``)

Vectors are computed from the archive's own stored mosaic (the dequantised int8 pixels), so the table can be rebuilt
from the archive alone and equals what a search over the mosaic itself would see. Per-row symmetric int8 keeps every
component within ``scale / 2`` (0.4 % of the row's largest component); cosine similarities move by about 1e-3.

Which files belong to the archive is recorded in ``archive.json`` (``sources[<mosaic>]["patches"]``), written last
by the archive: folders of mosaics it does not list are leftovers of a killed append and are removed by the next one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyproj
import shapely
import xarray as xr
from affine import Affine

from pipeline.storage import join as join_url

log = logging.getLogger(__name__)

PATCHES_DIR = "patches"
DEFAULT_PATCH_SIZE = 8
DEFAULT_MIN_VALID = 0.5
DEFAULT_ROWS_PER_FILE = 262_144
_STRIP_BYTES = 32 * 2**20  # float32 pixels read at once (one window of patches)
_DESCRIBE = ("model", "code_version", "checkpoint", "checkpoint_sha256")


@dataclass(frozen=True)
class PatchGrid:
    """The regular patch grid of one mosaic grid: ``size`` x ``size`` pixels from the grid's origin."""

    crs: str
    transform: tuple[float, ...]  # the pixel grid's 6 affine coefficients
    height: int
    width: int
    size: int

    @classmethod
    def of(cls, ds: xr.Dataset, size: int) -> PatchGrid:
        """The patch grid of a mosaic (its ``grid`` attribute, else its CRS and transform)."""
        grid = ds.attrs.get("grid") or {}
        crs = grid.get("crs") or ds.rio.crs.to_string()
        transform = tuple(grid.get("transform") or tuple(ds.rio.transform())[:6])
        return cls(str(crs), tuple(float(v) for v in transform[:6]), int(ds.sizes["y"]), int(ds.sizes["x"]), int(size))

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PatchGrid:
        """The grid recorded in ``archive.json``."""
        return cls(obj["crs"], tuple(obj["transform"]), int(obj["height"]), int(obj["width"]), int(obj["size"]))

    def to_json(self) -> dict[str, Any]:
        """What ``archive.json`` records (``sources[<mosaic>]["patches"]["grid"]``)."""
        return {"crs": self.crs, "transform": list(self.transform), "height": self.height, "width": self.width,
                "size": self.size}  # fmt: skip

    @property
    def rows(self) -> int:
        """Patch rows (the last one may be cut by the grid's edge)."""
        return -(-self.height // self.size)

    @property
    def cols(self) -> int:
        """Patch columns."""
        return -(-self.width // self.size)

    @property
    def affine(self) -> Affine:
        """The pixel grid's transform."""
        return Affine(*self.transform)

    def boxes(self, prow: np.ndarray, pcol: np.ndarray) -> np.ndarray:
        """``(n,)`` footprints (shapely polygons, grid CRS) of patches ``(prow, pcol)``, cut at the grid's edge."""
        s = self.size
        r0, c0 = np.asarray(prow) * s, np.asarray(pcol) * s
        r1, c1 = np.minimum(r0 + s, self.height), np.minimum(c0 + s, self.width)
        t = self.affine
        xs0, ys0 = t.c + t.a * c0 + t.b * r0, t.f + t.d * c0 + t.e * r0
        xs1, ys1 = t.c + t.a * c1 + t.b * r1, t.f + t.d * c1 + t.e * r1
        return shapely.box(np.minimum(xs0, xs1), np.minimum(ys0, ys1), np.maximum(xs0, xs1), np.maximum(ys0, ys1))

    def centres(self, prow: np.ndarray, pcol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Patch centres ``(x, y)`` in the grid CRS."""
        s = self.size
        r = (np.asarray(prow) * s + np.minimum(np.asarray(prow) * s + s, self.height)) / 2
        c = (np.asarray(pcol) * s + np.minimum(np.asarray(pcol) * s + s, self.width)) / 2
        t = self.affine
        return t.c + t.a * c + t.b * r, t.f + t.d * c + t.e * r

    def locate(self, x: float, y: float) -> tuple[int, int] | None:
        """The ``(prow, pcol)`` holding grid-CRS point ``(x, y)``, or ``None`` outside the grid."""
        col, row = ~self.affine * (x, y)
        if not (0 <= row < self.height and 0 <= col < self.width):
            return None
        return int(row // self.size), int(col // self.size)


def quantize_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: ``(q (n, C) int8, scale (n,) float32)`` with ``x ~ scale * q``."""
    vectors = np.asarray(vectors, dtype=np.float32)
    scale = np.abs(vectors).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.round(vectors / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(n, C)`` float32 vectors of :func:`quantize_rows` output."""
    return np.asarray(q, dtype=np.float32) * np.asarray(scale, dtype=np.float32)[:, None]


def _windows(emb: xr.DataArray, size: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Per window of patches: ``(first patch row, first patch col, sums (C, r, c) float64, valid counts (r, c))``.

    A window holds at most ``_STRIP_BYTES`` of float32 pixels (and at least one patch), whatever the mosaic's width,
    so the archive's memory does not grow with the region; windows go row by row, left to right.
    """
    height, width = emb.sizes["y"], emb.sizes["x"]
    per_patch = 4 * emb.sizes["band"] * size * size
    rows, cols = -(-height // size), -(-width // size)
    side = max(1, int((_STRIP_BYTES // per_patch) ** 0.5))  # patches per window side
    wcols = min(cols, max(side, (_STRIP_BYTES // per_patch) // max(min(rows, side), 1)))
    wrows = max(1, min(rows, (_STRIP_BYTES // per_patch) // wcols))
    for pr0 in range(0, rows, wrows):
        for pc0 in range(0, cols, wcols):
            y0, y1 = pr0 * size, min(height, (pr0 + wrows) * size)
            x0, x1 = pc0 * size, min(width, (pc0 + wcols) * size)
            block = np.asarray(emb.isel(y=slice(y0, y1), x=slice(x0, x1)).values, dtype=np.float32)  # (C, h, w)
            ok = np.isfinite(block).all(axis=0)
            pad_h, pad_w = -(y1 - y0) % size, -(x1 - x0) % size
            vals = np.pad(np.where(ok, block, 0.0), ((0, 0), (0, pad_h), (0, pad_w)))
            okp = np.pad(ok, ((0, pad_h), (0, pad_w)))
            c, hh, ww = vals.shape
            sums = vals.reshape(c, hh // size, size, ww // size, size).sum(axis=(2, 4), dtype=np.float64)
            counts = okp.reshape(hh // size, size, ww // size, size).sum(axis=(1, 3))
            yield pr0, pc0, sums, counts


def _provenance_columns(provenance: dict[str, Any], n: int) -> dict[str, pa.Array]:
    text = {k: pa.array([None if provenance.get(k) is None else str(provenance[k])] * n, pa.string())
            for k in _DESCRIBE}  # fmt: skip
    pre = json.dumps(provenance.get("preprocessing"), sort_keys=True)
    return {**text, "preprocessing": pa.array([pre] * n, pa.string())}


def _geo_metadata(crs: str, geoms: np.ndarray) -> dict[bytes, bytes]:
    col = {
        "encoding": "WKB",
        "geometry_types": ["Polygon"],
        "crs": pyproj.CRS.from_user_input(crs).to_json_dict(),
        "bbox": [float(v) for v in shapely.total_bounds(geoms)] if len(geoms) else [],
    }
    return {
        b"geo": json.dumps({"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": col}}).encode()
    }


def patch_table(
    grid: PatchGrid, prow: np.ndarray, pcol: np.ndarray, vectors: np.ndarray, valid_fraction: np.ndarray, *,
    mosaic: str, provenance: dict[str, Any], table_crs: str,
) -> pa.Table:  # fmt: skip
    """The rows of patches ``(prow, pcol)`` with float vectors ``(n, C)`` (quantised here); no GeoParquet metadata."""
    n = len(prow)
    q, scale = quantize_rows(vectors)
    geoms = grid.boxes(prow, pcol)
    grid_crs = pyproj.CRS.from_user_input(grid.crs)
    if not grid_crs.equals(pyproj.CRS.from_user_input(table_crs)):
        import geopandas as gpd

        geoms = gpd.GeoSeries(geoms, crs=grid_crs).to_crs(table_crs).values
    x, y = grid.centres(prow, pcol)
    lon, lat = pyproj.Transformer.from_crs(grid_crs, "EPSG:4326", always_xy=True).transform(x, y)
    start, end = [*(provenance.get("time") or []), None, None][:2]
    cols = {
        "patch_id": pa.array(np.asarray(prow, np.int64) * grid.cols + np.asarray(pcol, np.int64)),
        "mosaic": pa.array([mosaic] * n, pa.string()),
        "prow": pa.array(np.asarray(prow, np.int32)),
        "pcol": pa.array(np.asarray(pcol, np.int32)),
        "row": pa.array(np.asarray(prow, np.int32) * grid.size),
        "col": pa.array(np.asarray(pcol, np.int32) * grid.size),
        "valid_fraction": pa.array(np.asarray(valid_fraction, np.float32)),
        "lon": pa.array(np.asarray(lon, np.float64)),
        "lat": pa.array(np.asarray(lat, np.float64)),
        "time_start": pa.array([None if start is None else str(start)] * n, pa.string()),
        "time_end": pa.array([None if end is None else str(end)] * n, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(q.reshape(-1), pa.int8()), q.shape[1]),
        "scale": pa.array(scale),
        **_provenance_columns(provenance, n),
        "geometry": pa.array(shapely.to_wkb(geoms), pa.binary()),
    }
    return pa.table(cols)


def mosaic_dir(archive_url: str, mosaic: str) -> str:
    """The folder of one mosaic's patch files."""
    return join_url(archive_url, PATCHES_DIR, mosaic)


def write_patches(
    archive_url: str,
    mosaic: str,
    emb: xr.DataArray,
    grid: PatchGrid,
    *,
    provenance: dict[str, Any],
    table_crs: str,
    min_valid: float = DEFAULT_MIN_VALID,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
) -> dict[str, Any]:
    """Write the patch files of one archive mosaic (float ``(band, y, x)`` embeddings, lazy) and say what was written.

    The mosaic is read one window of patches at a time (bounded memory); a file is written once it holds
    ``rows_per_file`` rows or more.

    Returns:
        the record ``archive.json`` keeps: ``{"grid", "min_valid", "rows", "files": [{"path", "rows"}], "time"}``
        (paths relative to the archive folder).
    """
    folder = mosaic_dir(archive_url, mosaic)
    fs, path = fsspec.core.url_to_fs(folder)
    if fs.exists(path):
        fs.rm(path, recursive=True)  # what a killed write of this mosaic left
    fs.makedirs(path, exist_ok=True)
    files: list[dict[str, Any]] = []
    pending: list[pa.Table] = []

    def flush() -> None:
        table = pa.concat_tables(pending)
        pending.clear()
        geoms = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
        table = table.replace_schema_metadata(_geo_metadata(table_crs, geoms))
        name = f"part-{len(files):05d}.parquet"
        with fs.open(f"{path}/{name}", "wb") as f:
            pq.write_table(table, f, compression="zstd", row_group_size=65536)
        files.append({"path": f"{PATCHES_DIR}/{mosaic}/{name}", "rows": len(table)})

    need = max(min_valid * grid.size * grid.size, 1)
    for pr0, pc0, sums, counts in _windows(emb, grid.size):
        pr, pc = np.nonzero(counts >= need)
        for i in range(0, len(pr), rows_per_file):  # a window may hold more patches than one file
            r, c = pr[i : i + rows_per_file], pc[i : i + rows_per_file]
            vectors = (sums[:, r, c] / counts[r, c]).T.astype(np.float32)  # (n, C)
            pending.append(patch_table(grid, r + pr0, c + pc0, vectors, counts[r, c] / grid.size**2, mosaic=mosaic,
                                       provenance=provenance, table_crs=table_crs))  # fmt: skip
            if sum(len(t) for t in pending) >= rows_per_file:
                flush()
    if pending:
        flush()
    total = sum(f["rows"] for f in files)
    log.info("%s: %d patches of %d x %d pixels in %d file(s)", mosaic, total, grid.size, grid.size, len(files))
    time_range = provenance.get("time")
    return {"grid": grid.to_json(), "min_valid": min_valid, "rows": total, "files": files,
            "time": [None if t is None else str(t) for t in time_range] if time_range else None}  # fmt: skip


def remove_uncommitted(archive_url: str, committed: list[str]) -> list[str]:
    """Delete patch folders of mosaics ``archive.json`` does not list (a killed append's); returns their names."""
    fs, path = fsspec.core.url_to_fs(join_url(archive_url, PATCHES_DIR))
    if not fs.exists(path):
        return []
    gone = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name not in committed:
            fs.rm(entry, recursive=True)
            gone.append(name)
    if gone:
        log.warning("%s: removed patch files of mosaics %s that no finished append recorded", archive_url, gone)
    return gone


def read_file(archive_url: str, rel_path: str, columns: list[str] | None = None) -> pa.Table:
    """Columns of one patch file (path relative to the archive)."""
    with fsspec.open(join_url(archive_url, rel_path), "rb") as f:
        return pq.read_table(f, columns=columns)


def file_vectors(table: pa.Table) -> np.ndarray:
    """``(n, C)`` float32 vectors of a table holding ``vector`` and ``scale``."""
    vec = table["vector"].combine_chunks()
    q = vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), vec.type.list_size)
    return dequantize_rows(q, table["scale"].to_numpy())
