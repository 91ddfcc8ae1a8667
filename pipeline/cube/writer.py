"""Filling the cube template chunk by chunk: read (odc-stac via dask), convert to units, write, record.

Pending chunks are cut into row segments (consecutive chunks of one date and chunk row); each segment gets its own
small lazy read over just its footprint, so the dask graph of one call stays proportional to the batch instead of
the whole region (culling one huge graph per batch made large builds quadratic). Each chunk task converts raw
values to the modality's units, writes data and mask into the template, and only then records itself in the
manifest. A chunk whose read fails is retried alone; if it fails again its culprit is looked up
(:func:`pipeline.cube.reader.find_unreadable`), recorded as failed, and the chunk is re-read skipping the failing
reads, so those pixels become nodata (invalid) and the rest is kept.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import dask
import numpy as np
from tqdm.auto import tqdm

from pipeline.cube import layout
from pipeline.cube.manifest import ChunkIndex, ChunkManifest
from pipeline.cube.plan import ModalityPlan
from pipeline.cube.reader import find_unreadable, load_bands

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

    def __init__(self, url: str, plan: ModalityPlan, manifest: ChunkManifest, bar: tqdm) -> None:
        self.plan, self.manifest, self.bar = plan, manifest, bar
        self.data_arr, self.valid_arr = layout.open_arrays(url, plan.name, plan.chunks)
        self._lock = threading.Lock()
        self.done: set[ChunkIndex] = set()

    def tasks(self, seg: Segment, fail_on_error: bool = True, failure: dict | None = None) -> list[Any]:
        """One delayed write per chunk of ``seg``, reading only the segment's footprint."""
        p = self.plan
        t, iy, xs = seg
        write = dask.delayed(self.write, pure=False)
        if not p.groups[t]:
            return [write(None, (t, iy, ix), failure) for ix in xs]
        (_, cy, cx), (h, w) = p.chunks, p.geobox.shape
        footprint = p.geobox[iy * cy : min((iy + 1) * cy, h), xs[0] * cx : min((xs[-1] + 1) * cx, w)]
        bands, fills = load_bands(
            [p.groups[t]], p.refs, footprint, (cy, cx), p.resampling, p.nodata, fail_on_error, patch_url=p.patch_url
        )
        blocks = [b.to_delayed().ravel() for b in bands]  # per band: len(xs) blocks of (1, cy, cx)
        return [write(list(per_band), (t, iy, ix), failure, fills) for per_band, ix in zip(zip(*blocks), xs)]

    def write(
        self, bands: list[np.ndarray] | None, index: ChunkIndex, failure: dict | None, fills: list[float | None] = ()
    ) -> None:
        """Stack the band blocks, convert, write and record one chunk (runs inside a dask task)."""
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
        self.manifest.mark(self.plan.name, index, status, record)
        with self._lock:
            self.done.add(index)
            self.bar.update(1)

    def run(self, pending: list[ChunkIndex], batch: int, workers: int) -> None:
        """Write every pending chunk, ``batch`` chunks per dask call (this bounds memory)."""
        todo: list[Segment] = []
        for seg in [*segments(pending, batch), None]:
            if seg is not None and sum(len(s[2]) for s in todo) + len(seg[2]) <= batch:
                todo.append(seg)
                continue
            if todo:
                self._compute(todo, workers)
            todo = [seg] if seg is not None else []

    def _compute(self, segs: list[Segment], workers: int) -> None:
        try:
            dask.compute(*[task for seg in segs for task in self.tasks(seg)], scheduler="threads", num_workers=workers)
        except Exception:  # find the failing chunk(s): retry the unfinished ones one by one
            for t, iy, xs in segs:
                for ix in xs:
                    if (t, iy, ix) not in self.done:
                        self._run_one((t, iy, ix), workers)

    def _run_one(self, index: ChunkIndex, workers: int) -> None:
        t, iy, ix = index
        try:
            dask.compute(*self.tasks((t, iy, [ix])), scheduler="threads", num_workers=workers)
            return
        except Exception as exc:
            error = " ".join(str(exc).split()) or type(exc).__name__
        p = self.plan
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
        record = {
            "error": error,
            "items": sorted({c.item for c in culprits}) or [it.id for it in p.groups[t]],
            "problems": [c.message() for c in culprits],
        }
        failed = self.tasks((t, iy, [ix]), fail_on_error=False, failure=record)
        dask.compute(*failed, scheduler="threads", num_workers=workers)
