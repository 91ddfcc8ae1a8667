"""An opened patch index: the merged FAISS index of every shard plus the per-row metadata of the prefilters.

Layout, settings and why: :mod:`pipeline.mosaic.ann` (which writes and updates the index).
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.mosaic.ann import (
    META_COLUMNS,
    StaleIndexError,
    _faiss,
    committed_files,
    index_status,
    index_url,
    normalise,
    read_state,
    update_index,
)
from pipeline.mosaic.patches import read_file
from pipeline.storage import read_bytes

log = logging.getLogger(__name__)


def _load_npy(url: str) -> np.ndarray:
    """A ``.npy`` of the index: memory-mapped when local, read whole otherwise."""
    from pipeline.storage import is_local, store_path

    if is_local(url):
        return np.load(store_path(url), mmap_mode="r")
    return np.load(io.BytesIO(read_bytes(url)))


@dataclass
class PatchIndex:
    """An opened index with the per-row metadata the prefilters and results need.

    Row ``i`` of the metadata arrays is the ``i``-th vector in shard order; ``ids[i]`` is its FAISS id.
    """

    archive_url: str
    state: dict[str, Any]
    index: Any
    shards: list[dict[str, Any]]
    shard_of: np.ndarray  # (n,) int32: the shard of each row
    row_in_shard: np.ndarray  # (n,) int64
    ids: np.ndarray  # (n,) int64
    columns: dict[str, np.ndarray]  # prow, pcol, lon, lat: (n,)
    load_seconds: float = 0.0
    _cache: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(
        cls, archive_url: str, meta: dict[str, Any], *, update: bool = True, break_lease: bool = False
    ) -> PatchIndex:
        """Load the index (bringing it up to date first when the archive has unindexed patch files).

        Args:
            update: update a stale index (under the archive's lease); ``False`` raises :class:`StaleIndexError`.

        Raises:
            StaleIndexError: the index is stale and ``update`` is false, or the archive has no patch table.
        """
        status = index_status(archive_url, meta)
        if not committed_files(meta):
            raise StaleIndexError(
                f"{archive_url} has no patch table (an archive written before patch tables existed, or an empty one); "
                f"run `skypipe archive index {archive_url}` to build it"
            )
        if not status.fresh:
            if not update:
                raise StaleIndexError(
                    f"the patch index of {archive_url} is stale ({status.describe()}); run `skypipe archive index "
                    f"{archive_url}` to update it"
                )
            from pipeline.lease import OutputLease

            log.warning("%s: %s; updating the index first", archive_url, status.describe())
            with OutputLease(archive_url, what="embedding archive", force=break_lease):
                update_index(archive_url, meta)
        return cls.load(archive_url)

    @classmethod
    def load(cls, archive_url: str) -> PatchIndex:
        """Load ``index.json``, the trained index and every shard (merged into one in-memory index)."""
        faiss = _faiss()
        start = time.perf_counter()
        state = read_state(archive_url)
        if state is None:
            raise StaleIndexError(f"{archive_url} has no patch index; run `skypipe archive index {archive_url}`")
        index = faiss.deserialize_index(np.frombuffer(read_bytes(index_url(archive_url, "trained.faiss")), np.uint8))
        shard_of, rows, ids, cols = [], [], [], {c: [] for c in META_COLUMNS}
        for k, s in enumerate(state["shards"]):
            part = faiss.deserialize_index(np.frombuffer(read_bytes(index_url(archive_url, s["file"])), np.uint8))
            index.merge_from(part, 0)
            table = read_file(archive_url, s["path"], META_COLUMNS)
            for c in META_COLUMNS:
                cols[c].append(table[c].to_numpy())
            shard_of.append(np.full(s["rows"], k, np.int32))
            rows.append(np.arange(s["rows"], dtype=np.int64))
            ids.append(np.arange(s["start"], s["start"] + s["rows"], dtype=np.int64))
        cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
        out = cls(archive_url, state, index, list(state["shards"]), cat(shard_of, np.int32), cat(rows, np.int64),
                  cat(ids, np.int64), {c: cat(cols[c], np.float64) for c in META_COLUMNS})  # fmt: skip
        out.load_seconds = time.perf_counter() - start
        return out

    @property
    def provenance(self) -> dict[str, Any]:
        """The provenance of the indexed vectors."""
        return self.state["provenance"]

    @property
    def size(self) -> int:
        """Indexed vectors."""
        return len(self.ids)

    def mosaic_of_rows(self) -> np.ndarray:
        """``(n,)`` mosaic name of every row (object array)."""
        names = np.array([s["mosaic"] for s in self.shards] or [""], dtype=object)
        return names[self.shard_of]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), C)`` float32 stored (dequantised) vectors of metadata rows ``rows`` (the shards' arrays)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(rows), int(self.state["dim"])), np.float32)
        for k in np.unique(self.shard_of[rows]):
            sel = np.flatnonzero(self.shard_of[rows] == k)
            q, scale = self._arrays(int(k))
            take = self.row_in_shard[rows[sel]]
            out[sel] = np.asarray(q[take], np.float32) * np.asarray(scale[take], np.float32)[:, None]
        return out

    def _arrays(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._cache:
            stem = self.shards[k]["file"].rsplit(".", 1)[0]
            self._cache[k] = (_load_npy(index_url(self.archive_url, f"{stem}.q.npy")),
                              _load_npy(index_url(self.archive_url, f"{stem}.scale.npy")))  # fmt: skip
        return self._cache[k]

    def search(
        self, queries: np.ndarray, k: int, *, mask: np.ndarray | None = None, nprobe: int | None = None,
        exact_below: int = 50_000,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Top-``k`` rows by cosine similarity for each query.

        Args:
            queries: ``(q, C)`` query vectors (any length; normalised here).
            mask: ``(n,)`` bool: only these rows may be returned (the prefilters).
            nprobe: inverted lists to scan (default: the index's; scaled up by ``1 / selectivity`` under a mask, so
                a narrow filter still finds its rows).
            exact_below: a mask selecting at most this many rows is searched exactly over the stored vectors.

        Returns:
            ``(scores (q, k), rows (q, k))``: cosine similarities (descending) and metadata rows; ``-1`` / NaN pad
            when fewer than ``k`` rows qualify.
        """
        faiss = _faiss()
        q = normalise(np.atleast_2d(queries))
        if q.shape[1] != int(self.state["dim"]):
            raise ValueError(f"query vectors have {q.shape[1]} values, the index {self.state['dim']}")
        n = self.size
        nprobe = int(nprobe or self.state["nprobe"])
        nlist = int(self.state["trained"]["nlist"])
        if mask is not None:
            selected = np.flatnonzero(mask)
            if len(selected) <= exact_below:
                return self._exact(q, k, selected)
            nprobe = min(nlist, math.ceil(nprobe * n / len(selected)))
            bits = np.zeros(int(self.state["next_id"]), dtype=bool)
            bits[self.ids[selected]] = True
            packed = np.packbits(bits, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(packed))
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
            scores, labels = self.index.search(q, k, params=params)
        else:
            params = faiss.SearchParametersIVF(nprobe=min(nprobe, nlist))
            scores, labels = self.index.search(q, k, params=params)
        return self._rows(scores, labels)

    def _rows(self, scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """FAISS ids -> metadata rows (ids are contiguous per shard)."""
        starts = np.array([s["start"] for s in self.shards], dtype=np.int64)
        offsets = np.cumsum([0] + [s["rows"] for s in self.shards])[:-1]
        ok = labels >= 0
        k = np.searchsorted(starts, np.where(ok, labels, 0), side="right") - 1
        rows = np.where(ok, offsets[np.clip(k, 0, None)] + labels - starts[np.clip(k, 0, None)], -1)
        scores = np.clip(scores, -1.0, 1.0)  # float16 codes can put a vector's similarity to itself at 1 + 1e-6
        return np.where(ok, scores, np.nan).astype(np.float32), rows.astype(np.int64)

    def _exact(self, q: np.ndarray, k: int, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine top-k over the stored vectors of ``selected`` rows."""
        scores = np.full((len(q), k), np.nan, np.float32)
        rows = np.full((len(q), k), -1, np.int64)
        if len(selected) == 0:
            return scores, rows
        sims = q @ normalise(self.vectors(selected)).T  # (q, m)
        kk = min(k, len(selected))
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        order = np.take_along_axis(sims, top, 1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, 1)
        scores[:, :kk] = np.take_along_axis(sims, top, 1)
        rows[:, :kk] = selected[top]
        return scores, rows
