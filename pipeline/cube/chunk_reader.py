"""Reading one cube chunk of one date with rasterio, pixel for pixel what odc-stac reads, with datasets kept open.

Why not ``odc.stac.load`` per chunk row (measured on loopback COGs, ``benchmarks/RESULTS.md``): it builds a dask
graph for every call (~45 ms of single-threaded Python per row of chunks), and its reader opens every asset again
for every chunk and band, so the header is parsed and every COG tile is decoded once per chunk that touches it (a
512 px chunk off the COG's tile grid touches 4 tiles). :class:`DatasetPool` keeps open datasets across chunks, so
GDAL's block cache serves tiles shared by neighbouring chunks, bands of one pixel-interleaved file, and rows.

The pixels are odc-stac's (odc-stac 0.5 / odc-loader 0.6), because the decisions are taken the same way and the
same GDAL calls are made: band dtype, nodata and fill value from ``odc.stac.parse_items`` +
``odc.loader.resolve_load_cfg``; items binned to chunks by footprint (``GeoboxTiles.tiles``); per item and band,
``compute_reproject_roi`` then a windowed read when the grids align (paste) or ``rasterio.warp.reproject`` onto the
chunk's overlap otherwise (the warp's destination window changes GDAL's approximate transformer, so warps stay per
chunk), the same overview choice, and "first valid item wins" fusing. ``tests/test_cube_reader_perf.py`` checks
this against :func:`pipeline.cube.reader.load_bands` (odc-stac itself) on the sample data.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pystac
import rasterio
import rasterio.warp
from odc.geo.converters import rio_geobox
from odc.geo.geobox import GeoBox, GeoboxTiles
from odc.geo.overlap import ReprojectInfo, compute_reproject_roi
from odc.geo.roi import roi_is_empty, roi_shape, w_
from odc.geo.warp import resampling_s2rio
from odc.loader import (
    RasterLoadParams,
    RasterSource,
    resolve_dst_dtype,
    resolve_dst_nodata,
    resolve_load_cfg,
    resolve_src_nodata,
)
from odc.stac import parse_items

from pipeline.catalog.gdal import GDAL_ENV, gdal_path
from pipeline.catalog.redact import public_href, redact

log = logging.getLogger(__name__)

READ_ERRORS = (
    rasterio.errors.RasterioError,
    rasterio.errors.RasterioIOError,
    rasterio.errors.RasterBlockError,
    rasterio.errors.WarpOperationError,
    rasterio.errors.WindowEvaluationError,
)
"""What odc-loader treats as a read failure (raised, or skipped with ``fail_on_error=False``)."""


class DatasetPool:
    """Open rasterio datasets shared by worker threads, kept open so GDAL's block cache serves the next chunk.

    GDAL datasets are not thread-safe and GDAL's block cache is per dataset, so a dataset is checked out with
    :meth:`open` and given back when the block ends, and the most recently returned one is handed out first (it holds
    the freshest decoded tiles). At most ``max_idle`` idle datasets stay open (least recently used closed first). A
    dataset whose read raised is closed, not given back.

    ``patch_url`` (re-signing of signed hrefs) is applied when a dataset is opened, and an idle dataset is handed
    out again only while ``patch_url`` leaves the href it was opened with as it is (a token with time left, for
    :meth:`pipeline.catalog.signing.Resigner.fresh`) or still maps ``uri`` to it; otherwise it is reopened.
    """

    def __init__(self, patch_url: Callable[[str], str] | None = None, max_idle: int = 64) -> None:
        self.patch_url, self.max_idle = patch_url, max_idle
        self._free: dict[tuple[str, int | None], list[tuple[int, rasterio.DatasetReader, str]]] = {}
        self._order: OrderedDict[int, tuple[str, int | None]] = OrderedDict()  # idle ones, least recently used first
        self._lock = threading.Lock()
        self._serial = 0
        self.opened = 0  # datasets opened so far (the benchmark reports it)

    def _current(self, uri: str, opened_with: str) -> bool:
        if self.patch_url is None:
            return True
        return self.patch_url(opened_with) == opened_with or self.patch_url(uri) == opened_with

    @contextmanager
    def open(self, uri: str, overview: int | None = None) -> Iterator[rasterio.DatasetReader]:
        """An open dataset of ``uri`` (at ``overview`` level), for the caller's thread only until the block ends."""
        key = (uri, overview)
        ds = None
        with self._lock:
            stack = self._free.get(key)
            if stack:
                serial, ds, href = stack.pop()
                del self._order[serial]
        if ds is not None and not self._current(uri, href):
            ds.close()
            ds = None
        if ds is None:
            href = self.patch_url(uri) if self.patch_url else uri
            kw = {} if overview is None else {"overview_level": overview}
            with rasterio.Env(**GDAL_ENV):
                ds = rasterio.open(gdal_path(href), "r", sharing=False, **kw)
            with self._lock:
                self.opened += 1
        try:
            yield ds
        except BaseException:
            ds.close()
            raise
        with self._lock:
            self._serial += 1
            self._free.setdefault(key, []).append((self._serial, ds, href))
            self._order[self._serial] = key
            while len(self._order) > self.max_idle:
                _, oldest = self._order.popitem(last=False)
                self._free[oldest].pop(0)[1].close()  # the stack's bottom is its least recently returned

    def close(self) -> None:
        """Close every idle dataset."""
        with self._lock:
            for stack in self._free.values():
                for _, ds, _ in stack:
                    ds.close()
            self._free.clear()
            self._order.clear()


@dataclass
class DateSources:
    """What odc-stac resolves for one date's items: load settings per band, sources per item, items per chunk."""

    cfg: dict[str, RasterLoadParams]
    fill: dict[str, float]  # the value a chunk starts from, and that marks pixels no item has filled yet
    sources: list[dict[str, RasterSource | None]]  # per item (odc-stac's order), band ref -> source
    bins: dict[tuple[int, int], list[int]]  # chunk (iy, ix) -> indices of the items whose footprint touches it

    @classmethod
    def resolve(
        cls,
        items: Sequence[pystac.Item],
        band_refs: Sequence[str],
        resampling: Sequence[str],
        nodata: float | None,
        fail_on_error: bool,
        tiles: GeoboxTiles,
    ) -> DateSources:
        """Band settings and chunk bins exactly as ``odc.stac.load(items, bands=..., geobox=..., chunks=...)``."""
        refs = list(dict.fromkeys(band_refs))
        parsed = list(parse_items(items))
        cfg = resolve_load_cfg(
            parsed[0].collection.resolve_bands(refs),
            dict(zip(band_refs, resampling)),
            dtype=None if nodata is not None else "float32",
            nodata=nodata,
            fail_on_error=fail_on_error,
        )
        # odc-stac sorts a group by (time, id); the plan's groups are already in that order, checked here.
        order = sorted(range(len(parsed)), key=lambda i: (parsed[i].nominal_datetime, parsed[i].id))
        if order != list(range(len(parsed))):
            parsed = [parsed[i] for i in order]
        bins: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(parsed):
            geom = p.safe_geometry(tiles.base.crs)
            if geom is None:
                raise ValueError(f"item {p.id!r} has no footprint: cannot tell which chunks it covers")
            for idx in tiles.tiles(geom):
                bins.setdefault(idx, []).append(i)
        fill = {}
        for ref, c in cfg.items():
            nodata_dst = resolve_dst_nodata(np.dtype(c.dtype), c, resolve_src_nodata(c.fill_value, c))
            fill[ref] = 0 if nodata_dst is None else nodata_dst
        return cls(cfg, fill, [p.resolve_bands(refs) for p in parsed], bins)  # type: ignore[arg-type]


def _nodata_mask(pix: np.ndarray, nodata: float | None) -> np.ndarray:
    """Missing pixels as odc-loader sees them: NaN (and ``nodata``) for floats, ``== nodata`` for integers."""
    if pix.dtype.kind == "f":
        if nodata is None or math.isnan(nodata):
            return np.isnan(pix)
        return np.isnan(pix) | (pix == nodata)
    if nodata is None:
        return np.zeros(pix.shape, dtype=bool)
    return pix == nodata


def _same_nodata(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (math.isnan(a) and math.isnan(b)) or a == b


def _pick_overview(read_shrink: int, overviews: Sequence[int]) -> int | None:
    """The coarsest overview not coarser than ``read_shrink`` (odc-loader's rule), ``None`` for full resolution."""
    if not overviews or read_shrink < overviews[0]:
        return None
    found = 0
    for i, ovr in enumerate(overviews):
        if ovr > read_shrink:
            break
        found = i
    return found


def read_source(
    rdr: rasterio.DatasetReader, bidx: int, cfg: RasterLoadParams, gbox: GeoBox, rr: ReprojectInfo
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Band ``bidx`` of ``rdr`` onto the part ``rr.roi_dst`` of ``gbox`` it covers (odc-loader's ``_do_read``)."""
    roi_dst: tuple[slice, slice] = rr.roi_dst  # type: ignore[assignment]
    out = np.empty(roi_shape(roi_dst), dtype=resolve_dst_dtype(rdr.dtypes[bidx - 1], cfg))
    src_nodata = resolve_src_nodata(rdr.nodatavals[bidx - 1], cfg)
    dst_nodata = resolve_dst_nodata(out.dtype, cfg, src_nodata)
    if roi_is_empty(roi_dst):
        return roi_dst, out
    if roi_is_empty(rr.roi_src):  # footprint touches the chunk, pixels do not (odc-loader leaves 0-fill unset)
        out.fill(0 if dst_nodata is None else dst_nodata)
    elif rr.paste_ok and rr.read_shrink == 1:
        rdr.read(bidx, out=out, window=w_[rr.roi_src])
        # (odc-loader also remaps when an integer source has no nodata; that mask is all False, skipped here)
        remap = src_nodata is not None or out.dtype.kind == "f"
        if remap and dst_nodata is not None and not _same_nodata(src_nodata, dst_nodata):
            np.copyto(out, dst_nodata, where=_nodata_mask(out, src_nodata))
    else:
        rasterio.warp.reproject(
            rasterio.band(rdr, bidx),
            out,
            src_nodata=src_nodata,
            dst_crs=str(gbox.crs),
            dst_transform=gbox[roi_dst].transform,
            dst_nodata=dst_nodata,
            resampling=resampling_s2rio(cfg.resampling),
        )
    return roi_dst, out


class ChunkReader:
    """Reads chunks of one modality's grid: raw source values per band ref, fused over the date's items."""

    def __init__(
        self,
        geobox: GeoBox,
        chunks: tuple[int, int],
        groups: Sequence[Sequence[pystac.Item]],
        band_refs: Sequence[str],
        resampling: Sequence[str],
        nodata: float | None,
        pool: DatasetPool,
    ) -> None:
        self.geobox, self.groups, self.refs = geobox, groups, list(band_refs)
        self.resampling, self.nodata, self.pool = list(resampling), nodata, pool
        self.tiles = GeoboxTiles(geobox, chunks)
        self._dates: dict[tuple[int, bool], DateSources] = {}
        self._grids: dict[str, tuple[GeoBox, tuple]] = {}  # uri -> source grid, and a cheap key for it
        self._rois: OrderedDict[tuple[tuple, tuple[int, int], float], ReprojectInfo] = OrderedDict()
        self._lock = threading.Lock()

    def date(self, t: int, fail_on_error: bool = True) -> DateSources:
        """The resolved sources of date ``t`` (computed once, thread-safe)."""
        key = (t, fail_on_error)
        with self._lock:
            found = self._dates.get(key)
        if found is None:
            found = DateSources.resolve(
                self.groups[t], self.refs, self.resampling, self.nodata, fail_on_error, self.tiles
            )
            with self._lock:
                found = self._dates.setdefault(key, found)
        return found

    def read(self, t: int, iy: int, ix: int, fail_on_error: bool = True) -> tuple[list[np.ndarray], list[float | None]]:
        """Chunk (iy, ix) of date ``t``: one (1, cy, cx) array per band ref, and each band's fill value.

        The fill value is the source nodata (or NaN) that :func:`pipeline.cube.writer.to_units` turns into NaN,
        as :func:`pipeline.cube.reader.load_bands` returns it.
        """
        date = self.date(t, fail_on_error)
        gbox = self.tiles[iy, ix]
        unique = list(dict.fromkeys(self.refs))
        out: dict[str, np.ndarray | None] = dict.fromkeys(unique)
        for i in date.bins.get((iy, ix), []):
            by_uri: dict[str, list[str]] = {}
            for ref in unique:
                src = date.sources[i][ref]
                if src is not None:
                    by_uri.setdefault(src.uri, []).append(ref)
            for uri, refs in by_uri.items():
                for ref in refs:
                    read = self._read_band(uri, date.sources[i][ref].band, date.cfg[ref], gbox, (iy, ix))
                    if read is not None:
                        self._fuse(out, ref, *read, date.fill[ref], gbox)
        for ref in unique:
            if out[ref] is None:
                out[ref] = np.full(gbox.shape.yx, date.fill[ref], dtype=date.cfg[ref].dtype)
        fills = [None if date.cfg[r].fill_value is None else float(date.cfg[r].fill_value) for r in self.refs]
        return [out[r][None] for r in self.refs], fills  # type: ignore[index]

    @staticmethod
    def _fuse(
        out: dict[str, np.ndarray | None],
        ref: str,
        roi: tuple[slice, slice],
        pix: np.ndarray,
        fill: float,
        gbox: GeoBox,
    ) -> None:
        """odc-loader's fuser: copy ``pix`` where the chunk is still missing (``fill``), so the first valid item wins.

        Into a fresh chunk (all ``fill``) that copies everything, so a source covering the chunk is taken as it is.
        """
        dst = out[ref]
        if dst is None:
            if pix.shape == gbox.shape.yx:
                out[ref] = pix
                return
            dst = out[ref] = np.full(gbox.shape.yx, fill, dtype=pix.dtype)
        np.copyto(dst[roi], pix, where=_nodata_mask(dst[roi], fill))

    def _reproject_info(
        self, uri: str, rdr: rasterio.DatasetReader, gbox: GeoBox, chunk: tuple[int, int], ttol: float
    ) -> ReprojectInfo:
        """``compute_reproject_roi``, cached: sources on one grid (the same tile on every date) share it."""
        grid = self._grids.get(uri)
        if grid is None:
            box = rio_geobox(rdr)
            grid = self._grids.setdefault(uri, (box, (*box.shape.yx, *tuple(box.transform)[:6], box.crs.to_wkt())))
        key = (grid[1], chunk, ttol)  # hashing a GeoBox would format its CRS as WKT every time
        with self._lock:
            rr = self._rois.get(key)
            if rr is not None:
                self._rois.move_to_end(key)
                return rr
        rr = compute_reproject_roi(grid[0], gbox, ttol=ttol)
        with self._lock:
            self._rois[key] = rr
            while len(self._rois) > 4096:
                self._rois.popitem(last=False)
        return rr

    def _read_band(
        self, uri: str, bidx: int, cfg: RasterLoadParams, gbox: GeoBox, chunk: tuple[int, int]
    ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Band ``bidx`` of ``uri`` onto chunk ``gbox`` (odc-loader's ``_rio_read``); ``None`` for a skipped failure."""
        try:
            with self.pool.open(uri) as rdr:
                if bidx > rdr.count:
                    raise ValueError(f"Requested band {bidx} from {uri} with only {rdr.count} bands")
                ttol = 0.9 if cfg.nearest else 0.05  # odc-loader: sub-pixel shifts do not matter to nearest
                rr = self._reproject_info(uri, rdr, gbox, chunk, ttol)
                ovr = None
                if cfg.use_overviews and rr.read_shrink > 1:
                    ovr = _pick_overview(rr.read_shrink, rdr.overviews(bidx))
                if ovr is None:
                    return read_source(rdr, bidx, cfg, gbox, rr)
            with self.pool.open(uri, ovr) as rdr_ovr:
                return read_source(rdr_ovr, bidx, cfg, gbox, rr)
        except READ_ERRORS as exc:
            if cfg.fail_on_error:
                raise
            log.warning("Ignoring read failure reading %s:%d (reason: '%s')", public_href(uri), bidx, redact(str(exc)))
            return None
