"""Cloud-Optimised GeoTIFFs from (Dask-backed) mosaics, without loading them whole.

Three steps, each with bounded memory: the Dask blocks are computed in batches (any scheduler, ``distributed``
included) and written into a tiled intermediate GeoTIFF next to the output; GDAL builds the overview pyramid in
it; GDAL copies it into COG layout (``COPY_SRC_OVERVIEWS``). All three happen in a work folder
``.cog-<pid>-<machine>-*`` beside the target, and only the finished file replaces the target (``os.replace``; on
object stores one upload of the finished file), so a failed or killed write leaves the previous COG untouched; the
next write into that folder removes work folders whose writer is dead. Validity is checked with
``rio_cogeo.cogeo.cog_validate`` (:func:`cog_info`). Up to 4 bands are pixel-interleaved, more are band-interleaved
so that reading one band of an embedding COG decompresses only that band.

Size: model outputs are float32 and compress little; DEFLATE + floating-point predictor saves about a quarter,
which the overviews (+1/3) eat again. Measured on 64- and 256-channel embeddings of a real S2 chip: COG = 1.0x the
raw float32 size (``4 B x channels x pixels``), Zarr mosaic (zstd) 0.85x, int8 archive 0.25x. So a 768-channel
embedding mosaic of 100 km x 100 km at 10 m (1e8 pixels) is about 300 GB as a COG: write embedding COGs for small
areas or a few ``bands``, and keep the Zarr mosaic or the int8 archive as the bulk format. Files over 4 GB are
written as BigTIFF.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import fsspec
import numpy as np
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from affine import Affine
from fsspec.implementations.local import LocalFileSystem
from rasterio.enums import Resampling
from rasterio.shutil import copy as rio_copy
from rasterio.windows import Window

from pipeline.lease import node_tag, process_alive
from pipeline.mosaic.stitch import MOSAIC_VAR, open_mosaic
from pipeline.mosaic.style import write_class_style
from pipeline.palette import CLASS_NODATA, default_colors, palette_for

log = logging.getLogger(__name__)

_GDAL_CACHE_MB = 64  # GDAL's block cache fills with what is written: a bound on the writer's memory, not a speed knob
_BATCH_BYTES = 64 * 2**20  # computed blocks held before writing (peak memory does not grow with the area)
_PIXEL_INTERLEAVE_MAX_BANDS = 4  # beyond this, band interleave keeps a block at blocksize^2 x 4 B
_WORK_DIR = re.compile(r"^\.cog-(?P<pid>\d+)-(?P<node>[0-9a-f]{8})-[^-]+$")
_FOREIGN_WORK_DIR_AGE_S = 24 * 3600.0  # a write on another machine is surely over after a day


def dataarray_to_cog(
    arr: xr.DataArray,
    cog_path: str,
    *,
    descriptions: list[str] | None = None,
    nodata: float | None = None,
    resampling: str = "average",
    tags: dict[str, str] | None = None,
    blocksize: int = 512,
    colormap: dict[int, tuple[int, int, int, int]] | None = None,
) -> str:
    """Write a georeferenced ``(band, y, x)`` or ``(y, x)`` DataArray (NumPy or Dask) as a COG with overviews.

    Args:
        arr: array with a CRS (``.rio.crs``) and regular x/y coordinates.
        cog_path: local path or fsspec URL (non-local targets are written locally, then uploaded). An existing
            file there is replaced only by the finished COG.
        descriptions: band descriptions (default: the ``band`` coordinate, if any).
        nodata: no-data value (default: NaN for floats, none for integers).
        resampling: overview resampling (``average`` for continuous values, ``nearest``/``mode`` for classes).
        tags: dataset metadata tags.
        blocksize: COG block side.
        colormap: colour table of a single-band uint8 class map (value -> RGBA): GIS tools show it coloured.

    Returns:
        ``cog_path``.
    """
    if arr.ndim == 2:
        arr = arr.expand_dims("band")
    if arr.rio.crs is None:
        raise ValueError("cannot write a COG without a CRS (open mosaics with decode_coords='all')")
    if descriptions is None:
        descriptions = [str(b) for b in arr["band"].values] if "band" in arr.coords else None
    float_data = np.issubdtype(arr.dtype, np.floating)
    nodata = (np.nan if float_data else None) if nodata is None else nodata
    count = arr.shape[0]
    interleave = "PIXEL" if count <= _PIXEL_INTERLEAVE_MAX_BANDS else "BAND"
    predictor = 3 if float_data else 2
    fs, path = fsspec.core.url_to_fs(cog_path)
    local = isinstance(fs, LocalFileSystem)
    work_dir = os.path.dirname(os.path.abspath(path)) if local else None
    if work_dir:
        os.makedirs(work_dir, exist_ok=True)
        remove_stale_work_dirs(work_dir)
    env = rasterio.Env(
        GDAL_CACHEMAX=_GDAL_CACHE_MB, GDAL_NUM_THREADS="ALL_CPUS", GDAL_TIFF_OVR_BLOCKSIZE=str(blocksize),
        COMPRESS_OVERVIEW="DEFLATE", PREDICTOR_OVERVIEW=str(predictor), INTERLEAVE_OVERVIEW=interleave,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(dir=work_dir, prefix=_work_prefix()) as tmp, env:
        raw = os.path.join(tmp, "raw.tif")
        _write_raw(arr, raw, blocksize=blocksize, nodata=nodata, descriptions=descriptions, tags=tags or {},
                   colormap=colormap)  # fmt: skip
        with rasterio.open(raw, "r+") as dst:
            dst.build_overviews(overview_factors(arr.shape[1], arr.shape[2], blocksize), Resampling[resampling])
            dst.update_tags(ns="rio_overview", resampling=resampling)
        target = os.path.join(tmp, "out.tif")
        # the classic COG recipe: GTiff CreateCopy with COPY_SRC_OVERVIEWS puts IFDs and overviews before the
        # full-resolution data; unlike GDAL 3.10's COG driver it honours INTERLEAVE=BAND
        rio_copy(
            raw, target, driver="GTiff", COPY_SRC_OVERVIEWS="YES", TILED="YES", BLOCKXSIZE=blocksize,
            BLOCKYSIZE=blocksize, COMPRESS="DEFLATE", PREDICTOR=predictor, INTERLEAVE=interleave,
            BIGTIFF="IF_SAFER", NUM_THREADS="ALL_CPUS",
        )  # fmt: skip
        if local:
            _replace_durably(target, path)
        else:
            fs.put_file(target, path)  # only once complete; one PUT (or multipart upload) appears atomically
    size = fs.size(path)
    log.info("wrote COG %s: %d band(s), %.1f MB", cog_path, count, size / 2**20)
    return cog_path


def _work_prefix() -> str:
    """``.cog-<pid>-<machine>-``: lets a later write tell a killed run's work folder from a live one's."""
    return f".cog-{os.getpid()}-{node_tag()}-"


def remove_stale_work_dirs(folder: str, *, max_age_s: float = _FOREIGN_WORK_DIR_AGE_S) -> list[str]:
    """Delete the ``.cog-*`` work folders that killed writes left in ``folder``; returns their paths.

    A folder of this machine is stale when its writer's pid no longer runs; one of another machine (a shared
    file system) or of an older naming when it has not changed for ``max_age_s``.
    """
    removed = []
    for entry in os.scandir(folder):
        if not (entry.name.startswith(".cog-") and entry.is_dir(follow_symlinks=False)):
            continue
        match = _WORK_DIR.match(entry.name)
        if match and match["node"] == node_tag():
            stale = not process_alive(int(match["pid"]))
        else:
            try:
                stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > max_age_s
            except FileNotFoundError:
                continue
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
            log.info("removed %s, left by a COG write that did not finish", entry.path)
    return removed


def _replace_durably(src: str, dst: str) -> None:
    """Move a finished file over ``dst`` in one step (``os.replace``), fsyncing it first and the folder after."""
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, dst)
    fd = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def overview_factors(height: int, width: int, blocksize: int) -> list[int]:
    """Decimation factors 2, 4, ... until the coarsest overview fits in one block."""
    factors, f = [], 2
    while max(height, width) / (f // 2) > blocksize:
        factors.append(f)
        f *= 2
    return factors


def _grid_transform(arr: xr.DataArray) -> Affine:
    """The grid's exact transform: the stored GeoTransform if it agrees with the coordinates, else recomputed.

    (Recomputing it from float pixel-centre coordinates is off by ~1e-14.)
    """
    cached, recalc = arr.rio.transform(), arr.rio.transform(recalc=True)
    return cached if cached.almost_equals(recalc, precision=1e-6 * abs(recalc.a)) else recalc


def _write_raw(
    arr: xr.DataArray, raw: str, *, blocksize: int, nodata: float | None, descriptions: list[str] | None, tags: dict,
    colormap: dict[int, tuple[int, int, int, int]] | None = None,
) -> None:  # fmt: skip
    """Stream a ``(band, y, x)`` array block by block into a tiled GeoTIFF (pixel-interleaved up to 4 bands).

    Blocks are computed in batches with ``dask.compute`` (any scheduler, including ``distributed``) and written
    here, so only one batch (at most ``_BATCH_BYTES``) is in memory at a time.
    """
    count, height, width = arr.shape
    data = arr.data if isinstance(arr.data, da.Array) else da.from_array(arr.data)
    # Blocks of (a group of bands) x one COG tile, written spatial position by position: the mosaic chunks under a
    # tile are read once per band group (a band-major order would read the whole mosaic once per band).
    group = max(1, min(count, _BATCH_BYTES // (data.dtype.itemsize * blocksize * blocksize)))
    data = data.rechunk((group, blocksize, blocksize))
    block_bytes = data.dtype.itemsize * group * blocksize * blocksize
    per_batch = max(1, _BATCH_BYTES // block_bytes)
    starts = [np.cumsum((0, *c))[:-1] for c in data.chunks]
    keys = sorted(np.ndindex(*data.numblocks), key=lambda k: (k[1], k[2], k[0]))
    with rasterio.open(
        raw, "w", driver="GTiff", width=width, height=height, count=count, dtype=data.dtype, crs=arr.rio.crs,
        transform=_grid_transform(arr), nodata=nodata, tiled=True, blockxsize=blocksize, blockysize=blocksize,
        interleave="pixel" if count <= _PIXEL_INTERLEAVE_MAX_BANDS else "band", compress="ZSTD", BIGTIFF="IF_SAFER",
    ) as dst:  # fmt: skip
        for i, text in enumerate(descriptions or []):
            dst.set_band_description(i + 1, text)
        dst.update_tags(**tags)
        if colormap:
            dst.write_colormap(1, colormap)
        for b in range(0, len(keys), per_batch):
            batch = keys[b : b + per_batch]
            for key, block in zip(batch, dask.compute(*(data.blocks[k] for k in batch))):
                b0, r0, c0 = (int(starts[d][k]) for d, k in enumerate(key))
                window = Window(c0, r0, block.shape[2], block.shape[1])
                dst.write(block, indexes=list(range(b0 + 1, b0 + block.shape[0] + 1)), window=window)


def write_cog(
    mosaic_url: str, cog_path: str, bands: list[str] | None = None, *, variable: str | None = None, blocksize: int = 512
) -> str:
    """Write (bands of) a mosaic as a COG: right CRS, transform, nodata, band descriptions = channel names.

    Args:
        mosaic_url: a ``mosaic.zarr`` from :func:`pipeline.mosaic.stitch.stitch_tiles`.
        cog_path: output path or fsspec URL.
        bands: channel names to write (default: all).
        variable: ``data`` (default) or ``classes`` (the uint8 class map of segmentation / change mosaics,
            nodata 255, mode overviews).
        blocksize: COG block side (overviews are built down to about one block).

    Returns:
        ``cog_path``.
    """
    ds = open_mosaic(mosaic_url)
    variable = variable or MOSAIC_VAR
    if variable not in ds:
        raise KeyError(f"{mosaic_url} has no variable {variable!r} (has {sorted(ds.data_vars)})")
    arr = ds[variable]
    tags = {"kind": str(ds.attrs.get("kind", "")), "provenance": json.dumps(ds.attrs.get("provenance", {}))}
    if variable == "classes":
        names = list(ds.attrs.get("class_names") or [str(b) for b in ds["band"].values])
        colors = list(ds.attrs.get("class_colors") or default_colors(len(names)))
        tags.update(class_names=json.dumps(names), class_colors=json.dumps(colors))
        palette = palette_for(colors)
        colormap = {i: (*(int(v) for v in palette[i]), 255) for i in range(len(names))}
        colormap[CLASS_NODATA] = (0, 0, 0, 0)
        dataarray_to_cog(
            arr, cog_path, descriptions=["classes"], nodata=CLASS_NODATA, resampling="mode", tags=tags,
            blocksize=blocksize, colormap=colormap,
        )  # fmt: skip
        write_class_style(cog_path, names, colors)
        return cog_path
    if bands is not None:
        unknown = sorted(set(bands) - {str(b) for b in arr["band"].values})
        if unknown:
            raise KeyError(f"bands {unknown} not in {mosaic_url} (channels {list(map(str, arr['band'].values))})")
        arr = arr.sel(band=list(bands))
    return dataarray_to_cog(arr, cog_path, resampling="average", tags=tags, blocksize=blocksize)


def cog_info(cog_path: str | Path) -> dict:
    """Validity (``rio_cogeo.cogeo.cog_validate``) and the main properties of a COG, for tests and logs."""
    from rio_cogeo.cogeo import cog_validate

    is_valid, errors, warnings = cog_validate(str(cog_path), quiet=True)
    with rasterio.open(cog_path) as src:
        return {
            "valid": is_valid, "errors": errors, "warnings": warnings, "crs": src.crs, "transform": src.transform,
            "nodata": src.nodata, "descriptions": list(src.descriptions), "count": src.count, "dtype": src.dtypes[0],
            "overviews": src.overviews(1), "interleave": src.interleaving, "compression": src.compression,
            "tags": src.tags(), "size": os.path.getsize(cog_path),
        }  # fmt: skip
