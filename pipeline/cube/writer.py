"""Filling the cube template chunk by chunk: read (:mod:`pipeline.cube.chunk_reader`), convert to units, write, record.

Pending chunks are cut into row segments (consecutive chunks of one date and chunk row); a pool of ``workers``
threads takes one segment at a time and reads, converts, writes and records its chunks in order, so memory stays at
one chunk per thread and neighbouring chunks reuse the open datasets and decoded COG tiles of the previous one. The
GIL is released while GDAL decodes and warps and while Blosc compresses, so threads overlap. Rows of different dates
run side by side (segments ordered by block of ``workers`` dates, then row): threads then read different files, and
the next row of a date picks up the dataset (and the tiles it shares with the row above) the previous row used.
Each chunk is recorded in the manifest only after its data and mask are written. A chunk whose read fails is
retried once (with freshly opened datasets); if it fails again its culprit is looked up
(:func:`pipeline.cube.reader.find_unreadable`), recorded as failed, and the chunk is re-read skipping the failing
reads, so those pixels become nodata (invalid) and the rest is kept. Failure records and warnings never hold a
token: the culprits are :class:`~pipeline.cube.reader.AssetProblem` messages and the error is redacted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import rasterio
from tqdm.auto import tqdm

from pipeline.catalog.gdal import GDAL_ENV
from pipeline.catalog.redact import redact
from pipeline.cube import layout
from pipeline.cube.chunk_reader import ChunkReader, DatasetPool
from pipeline.cube.manifest import ChunkIndex, ChunkManifest
from pipeline.cube.plan import ModalityPlan
from pipeline.cube.reader import find_unreadable, split_band_ref

log = logging.getLogger(__name__)

Segment = tuple[int, int, list[int]]  # (time, chunk row, chunk columns: consecutive)


def to_units(raw: np.ndarray, fills: list[float | None], plan: ModalityPlan, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw (1, refs, y, x) source values of date ``t`` -> (float32 data in the modality's units, uint8 valid mask).

    Source nodata (``fills``) becomes NaN, then scale/offset (in float64) and the dB conversion are applied.
    """
    nb = len(plan.bands)
    x = raw[:, :nb].astype("float32")
    for b, fill in enumerate(fills[:nb]):
        if fill is not None and not np.isnan(fill):
            x[:, b][raw[:, b] == fill] = np.nan
    scale, offset = plan.scale[t][None, :, None, None], plan.offset[t][None, :, None, None]
    if np.any(scale != 1.0) or np.any(offset != 0.0):
        x = (x.astype("float64") * scale + offset).astype("float32")
    if plan.linear_to_db:
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(x > 0, 10.0 * np.log10(x), np.nan).astype("float32")
    valid = np.isfinite(x).all(axis=1)
    if plan.mask_ref:
        valid &= ~np.isin(raw[:, nb], plan.mask_invalid_values)
    return x, valid.astype("uint8")


def segments(pending: list[ChunkIndex], max_len: int) -> Iterator[Segment]:
    """Runs of consecutive chunks (same date and row, ascending columns) of at most ``max_len`` chunks."""
    run: list[int] = []
    key = None
    for t, y, x in sorted(pending):
        if run and ((t, y) != key or x != run[-1] + 1 or len(run) >= max_len):
            yield (*key, run)
            run = []
        key = (t, y)
        run.append(x)
    if run:
        yield (*key, run)


class ChunkWriter:
    """Reads, converts and writes the chunks of one modality; thread-safe bookkeeping of finished chunks."""

    def __init__(self, url: str, plan: ModalityPlan, manifest: ChunkManifest, bar: tqdm, node: str | None = None):
        self.plan, self.manifest, self.bar, self.node = plan, manifest, bar, node
        self.data_arr, self.valid_arr = layout.open_arrays(url, plan.name, plan.chunks)
        self._lock = threading.Lock()
        self.done: set[ChunkIndex] = set()
        self.pool: DatasetPool | None = None
        self.reader: ChunkReader | None = None

    def run(self, pending: list[ChunkIndex], batch: int, workers: int) -> None:
        """Write every pending chunk with ``workers`` threads, a segment of at most ``batch`` chunks per task."""
        if not pending:
            return
        p = self.plan
        n_assets = len({split_band_ref(r)[0] for r in p.refs})
        self.pool = DatasetPool(p.patch_url, max_idle=max(64, 2 * workers * n_assets))
        self.reader = ChunkReader(p.geobox, p.chunks[1:], p.groups, p.refs, p.resampling, p.nodata, self.pool)
        seg_len = max(1, min(batch, -(-len(pending) // workers)))  # enough segments to keep every thread busy
        todo = sorted(segments(pending, seg_len), key=lambda s: (s[0] // workers, s[1], s[0], s[2][0]))
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cube-chunk")
        try:
            for future in [executor.submit(self._segment, seg) for seg in todo]:
                future.result()
        except BaseException:
            executor.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            executor.shutdown(wait=True)
            self.pool.close()

    def _segment(self, seg: Segment) -> None:
        t, iy, xs = seg
        with rasterio.Env(**GDAL_ENV):
            for ix in xs:
                self._chunk((t, iy, ix))

    def _chunk(self, index: ChunkIndex) -> None:
        t, iy, ix = index
        assert self.reader is not None
        if not self.plan.groups[t]:
            self.write(None, index, None)
            return
        failure = None
        try:
            bands, fills = self.reader.read(t, iy, ix)
        except Exception:  # a transient error, or an expired signature: the failing dataset was closed, reopen
            try:
                bands, fills = self.reader.read(t, iy, ix)
            except Exception as exc:
                failure = self._failure(index, exc)
                bands, fills = self.reader.read(t, iy, ix, fail_on_error=False)
        self.write(bands, index, failure, fills)

    def _failure(self, index: ChunkIndex, exc: Exception) -> dict:
        """Name the unreadable assets of a chunk that failed twice; log them and return the failure record."""
        p, t = self.plan, index[0]
        error = redact(" ".join(str(exc).split())) or type(exc).__name__  # GDAL's message holds the signed path
        region = layout.chunk_region(index, (len(p.dates), *p.geobox.shape), p.chunks)
        bounds = tuple(p.geobox[region[1], region[2]].boundingbox)
        culprits = find_unreadable(p.groups[t], p.refs, bounds, str(p.geobox.crs), p.patch_url)
        for c in culprits or [None]:
            log.warning(
                "%s: chunk %s (date %s) could not be read: %s; the unreadable pixels are marked invalid",
                p.name,
                index,
                str(p.dates[t])[:19],
                c.message() if c else error,
            )
        return {
            "error": error,
            "items": sorted({c.item for c in culprits}) or [it.id for it in p.groups[t]],
            "problems": [c.message() for c in culprits],
        }

    def write(
        self, bands: list[np.ndarray] | None, index: ChunkIndex, failure: dict | None, fills: list[float | None] = ()
    ) -> None:
        """Stack the band blocks, convert, write and record one chunk."""
        t = index[0]
        if bands is None:
            status, record = "empty", {"reason": "no usable item for this date", "items": self.plan.item_ids[t]}
        else:
            raw = np.stack(bands, axis=1)  # (1, refs, cy, cx)
            data, valid = to_units(raw, list(fills), self.plan, t)
            layout.write_chunk(self.data_arr, self.valid_arr, index, data, valid)
            status, record = "ok", {"valid_pixels": int(valid.sum())}
        if failure is not None:
            status, record = "failed", {**record, **failure}
        if self.node is not None:  # which cluster node wrote it (distributed builds)
            record["node"] = self.node
        self.manifest.mark(self.plan.name, index, status, record)
        with self._lock:
            self.done.add(index)
            self.bar.update(1)
