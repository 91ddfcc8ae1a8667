"""Approximate nearest-neighbour index over an archive's patch vectors (FAISS inverted file, float16 codes).

Layout (inside the archive folder)::

    index/index.json            the commit record: format, library and factory string, metric (cosine = inner
                                product of L2-normalised vectors), dim, the archive provenance the vectors came from,
                                the training record (rows, sample, nlist), default nprobe, next_id, and the shards in
                                order: {mosaic, path (the patch file), rows, fingerprint (the mosaic's sources
                                fingerprint), start (first id), file}
    index/trained.faiss         the trained, empty index (the coarse centroids)
    index/shards/<mosaic>/part-00000.faiss   one shard per patch file: its vectors under ids start .. start+rows-1
    index/shards/<mosaic>/part-00000.q.npy, .scale.npy   the same rows' int8 vectors and scales as plain arrays
                                (memory-mapped: point lookups and exact search under narrow filters read a few rows
                                in microseconds, where decoding the Parquet list column takes seconds per million)

Why this library and these settings: measured in ``benchmarks/bench_archive.py`` (results in
``benchmarks/RESULTS.md``, "Archive search (issue 13)"). In short, on real 128-d per-pixel embeddings: an IVF index
with float16 codes (``IVF<nlist>,SQfp16``, about sqrt(n) lists, 16 of them probed) reaches the recall of float32
lists (recall@10 0.997-0.998) at half their size and 200-300 times the speed of exact search; 8-bit codes (``SQ8``)
stop at recall@10 ~0.91 however many lists are probed (neighbouring pixels' embeddings are nearly equal, and 8-bit
noise reorders them); graph indexes (HNSW in hnswlib, usearch, FAISS) are as fast to query but take many times
longer to build on two cores and cannot be split into per-file shards. IVF appends cheaply: a new patch file is
encoded against the existing centroids into a new shard file, nothing else is rewritten. FAISS is also the one
candidate with per-query ID filters (``IDSelectorBitmap``) inside the inverted lists, which the bounding-box, time
and mosaic prefilters use.

Updates are incremental and resumable: :func:`update_index` trains once (on a seeded sample of every patch file),
then encodes the patch files the index does not hold yet, one shard at a time, rewriting ``index.json`` after each;
a killed build leaves at most one unfinished shard file, which the next update overwrites. When the archive has grown
``retrain_growth`` times past the rows the centroids were trained on (and would get at least twice as many lists),
the index is retrained and every shard re-encoded (still resumable). The index records the archive's provenance and
refuses rows of another checkpoint or preprocessing (:class:`~pipeline.mosaic.archive.ProvenanceError`).

Searching: :class:`pipeline.mosaic.patch_index.PatchIndex`. An index is *stale* when the archive lists patch files
it does not hold (an append whose index update was killed, or an archive written by an older version):
:func:`index_status` says what is missing and ``PatchIndex.open`` brings the index up to date first (under the
archive's lease) unless told not to, so a search never silently misses rows.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.mosaic.patches import file_vectors, read_file
from pipeline.storage import exists, read_bytes, read_json, remove, write_bytes, write_json
from pipeline.storage import join as join_url

log = logging.getLogger(__name__)

INDEX_DIR = "index"
INDEX_FORMAT = "skypipe-patch-index"
INDEX_VERSION = 2
KILL_AFTER_ENV = "SKYPIPE_FAULT_INDEX_KILL_AFTER"  # tests: SIGKILL this process after it committed N shards
META_COLUMNS = ["prow", "pcol", "lon", "lat"]
_IDENTITY = ("checkpoint_sha256", "preprocessing")


class StaleIndexError(LookupError):
    """The archive holds patches its index does not (and the index may not be updated here)."""


@dataclass(frozen=True)
class IndexSettings:
    """How the index is built; the defaults are the benchmark's choice (``benchmarks/RESULTS.md``)."""

    codes: str = "SQfp16"  # FAISS encoding of the vectors in the inverted lists (SQ8 caps recall@10 at ~0.91)
    nlist: int | None = None  # inverted lists; None: :func:`auto_nlist`
    train_per_list: int = 64  # training vectors per list (sample = min(rows, train_per_list * nlist))
    recall_nprobe_share: float = 1 / 64  # default nprobe = nlist * this (at least 16; all lists when nlist <= 16)
    retrain_growth: float = 4.0
    seed: int = 0


def auto_nlist(rows: int) -> int:
    """Inverted lists for ``rows`` vectors: about sqrt(rows), a power of two, 1 for small archives.

    (Measured on real embeddings: sqrt(rows) lists probed 16 at a time already give recall@10 >= 0.99; twice as many
    lists query a little faster but train k-means four times longer.)

    An archive of fewer than 2,048 patches gets one list: the index is then an exact search over float16 codes.
    """
    if rows < 2048:
        return 1
    nlist = int(2 ** round(math.log2(math.sqrt(rows))))
    while nlist > 1 and 39 * nlist > rows:  # FAISS's k-means wants at least 39 points per centroid
        nlist //= 2
    return nlist


def default_nprobe(nlist: int, settings: IndexSettings) -> int:
    """Lists probed per query unless the caller says otherwise."""
    return nlist if nlist <= 16 else max(16, round(nlist * settings.recall_nprobe_share))


def _faiss():
    import faiss

    return faiss


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32 C-contiguous."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norm > 0, norm, 1.0), dtype=np.float32)


def committed_files(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The patch files ``archive.json`` lists, in mosaic order: ``{mosaic, path, rows, fingerprint}``."""
    out = []
    for name in meta["mosaics"]:
        src = (meta.get("sources") or {}).get(name) or {}
        for f in (src.get("patches") or {}).get("files", []):
            out.append(
                {"mosaic": name, "path": f["path"], "rows": int(f["rows"]), "fingerprint": src.get("fingerprint")}
            )
    return out


def _identity(prov: dict[str, Any]) -> str:
    return json.dumps({k: prov.get(k) for k in _IDENTITY}, sort_keys=True, default=str)


def index_url(archive_url: str, *parts: str) -> str:
    """A path inside the archive's index folder."""
    return join_url(archive_url, INDEX_DIR, *parts)


def read_state(archive_url: str) -> dict[str, Any] | None:
    """The index's ``index.json`` (``None`` when there is none)."""
    state = read_json(index_url(archive_url, "index.json"), default=None)
    return state if isinstance(state, dict) and state.get("format") == INDEX_FORMAT else None


@dataclass
class IndexStatus:
    """How an index relates to its archive."""

    missing: list[dict[str, Any]] = field(default_factory=list)  # patch files not indexed
    extra: list[dict[str, Any]] = field(default_factory=list)  # shards of files the archive no longer lists
    reason: str | None = None  # why it must be rebuilt from scratch (no index, other provenance, ...)

    @property
    def fresh(self) -> bool:
        """Nothing to do."""
        return not (self.missing or self.extra or self.reason)

    def describe(self) -> str:
        """One phrase for messages."""
        if self.reason:
            return self.reason
        parts = []
        if self.missing:
            mosaics = sorted({f["mosaic"] for f in self.missing})
            parts.append(f"{len(self.missing)} patch file(s) of mosaic(s) {mosaics} are not indexed")
        if self.extra:
            parts.append(f"{len(self.extra)} shard(s) of files no longer in the archive")
        return "; ".join(parts)


def _key(f: dict[str, Any]) -> tuple:
    return (f["mosaic"], f["path"], int(f["rows"]), f.get("fingerprint"))


def index_status(archive_url: str, meta: dict[str, Any], state: dict[str, Any] | None = None) -> IndexStatus:
    """Compare the archive's patch files (``archive.json``) with what its index holds."""
    state = read_state(archive_url) if state is None else state
    files = committed_files(meta)
    if state is None:
        return IndexStatus(missing=files, reason="the archive has no patch index" if files else None)
    if state.get("version") != INDEX_VERSION:
        return IndexStatus(
            missing=files, reason=f"the index has format version {state.get('version')}, not {INDEX_VERSION}"
        )
    if _identity(state["provenance"]) != _identity(meta["provenance"]):
        return IndexStatus(missing=files, reason="the index was built from another model's or preprocessing's vectors")
    have = {_key(s) for s in state["shards"]}
    want = {_key(f) for f in files}
    return IndexStatus(missing=[f for f in files if _key(f) not in have],
                       extra=[s for s in state["shards"] if _key(s) not in want])  # fmt: skip


def _train(archive_url: str, files: list[dict[str, Any]], dim: int, settings: IndexSettings) -> tuple[Any, dict]:
    """Train an empty index on a seeded sample of every patch file's vectors."""
    faiss = _faiss()
    rows = sum(f["rows"] for f in files)
    nlist = settings.nlist or auto_nlist(rows)
    want = min(rows, max(nlist * settings.train_per_list, 1))
    rng = np.random.default_rng(settings.seed)
    parts = []
    for f in files:  # the same share of every file, so no region dominates the centroids
        take = min(f["rows"], max(1, round(want * f["rows"] / max(rows, 1))))
        x = file_vectors(read_file(archive_url, f["path"], ["vector", "scale"]))
        parts.append(x[np.sort(rng.choice(len(x), size=take, replace=False))])
    sample = normalise(np.concatenate(parts)) if parts else np.zeros((0, dim), np.float32)
    nlist = max(1, min(nlist, len(sample) // 4 or 1))
    factory = f"IVF{nlist},{settings.codes}"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    start = time.perf_counter()
    index.train(sample)
    log.info("trained %s on %d of %d patch vectors in %.1f s", factory, len(sample), rows, time.perf_counter() - start)
    return index, {"rows": rows, "sample": len(sample), "nlist": nlist, "factory": factory}


def _needs_retrain(state: dict[str, Any], rows: int, settings: IndexSettings) -> bool:
    trained = state["trained"]
    grown = rows > settings.retrain_growth * max(trained["rows"], 1)
    return grown and (settings.nlist or auto_nlist(rows)) >= 2 * trained["nlist"]


def _check_rows(table: Any, state: dict[str, Any], what: str) -> None:
    from pipeline.mosaic.archive import check_provenance

    pairs = {(a, b) for a, b in zip(table["checkpoint_sha256"].to_pylist(), table["preprocessing"].to_pylist())}
    for sha, pre in pairs:
        row = {"checkpoint_sha256": sha, "preprocessing": json.loads(pre), "model": None}
        check_provenance(state["provenance"], row,
                         what=what, against="the patch index")  # fmt: skip


def update_index(
    archive_url: str, meta: dict[str, Any], *, settings: IndexSettings | None = None, rebuild: bool = False
) -> dict[str, Any]:
    """Bring the archive's index up to date with its patch files (train if needed, encode missing files).

    The caller holds the archive's lease. Returns the new ``index.json`` content.

    Raises:
        ProvenanceError: a patch file holds vectors of another checkpoint or preprocessing than the index.
    """
    faiss = _faiss()
    settings = settings or IndexSettings()
    files = committed_files(meta)
    state = None if rebuild else read_state(archive_url)
    status = index_status(archive_url, meta, state)
    if status.fresh and state is not None:
        return state
    rows = sum(f["rows"] for f in files)
    if state is not None and (status.reason or _needs_retrain(state, rows, settings)):
        log.info(
            "%s: retraining the patch index (%s)", archive_url, status.reason or f"the archive grew to {rows} rows"
        )
        state = None
    if state is None:
        remove(index_url(archive_url))
        dim = _dimension(archive_url, files)
        if dim is None:
            return {}
        trained, record = _train(archive_url, files, dim, settings)
        write_bytes(index_url(archive_url, "trained.faiss"), faiss.serialize_index(trained).tobytes())
        state = {
            "format": INDEX_FORMAT, "version": INDEX_VERSION, "library": f"faiss-cpu {faiss.__version__}",
            "factory": record["factory"], "metric": "cosine (inner product of L2-normalised vectors)", "dim": dim,
            "provenance": meta["provenance"], "trained": record,
            "nprobe": default_nprobe(record["nlist"], settings), "next_id": 0, "shards": [],
        }  # fmt: skip
        write_json(index_url(archive_url, "index.json"), state, indent=1)
    want = {_key(f) for f in files}
    dropped = [s for s in state["shards"] if _key(s) not in want]
    for s in dropped:
        stem = s["file"].rsplit(".", 1)[0]
        for name in (s["file"], f"{stem}.q.npy", f"{stem}.scale.npy"):
            remove(index_url(archive_url, name))
    state["shards"] = [s for s in state["shards"] if _key(s) in want]
    have = {_key(s) for s in state["shards"]}
    trained_bytes, written = None, 0
    for f in files:
        if _key(f) in have:
            continue
        if trained_bytes is None:
            trained_bytes = read_bytes(index_url(archive_url, "trained.faiss"))
        table = read_file(archive_url, f["path"], ["vector", "scale", "checkpoint_sha256", "preprocessing"])
        _check_rows(table, state, f"{archive_url}/{f['path']}")
        vec = table["vector"].combine_chunks()
        q = vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), vec.type.list_size).astype(np.int8)
        scale = table["scale"].to_numpy().astype(np.float32)
        x = normalise(q.astype(np.float32) * scale[:, None])
        index = faiss.deserialize_index(np.frombuffer(trained_bytes, dtype=np.uint8))
        start = int(state["next_id"])
        index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
        shard_file = "shards/" + f["path"].split("/", 1)[-1].rsplit(".", 1)[0] + ".faiss"
        stem = shard_file.rsplit(".", 1)[0]
        write_bytes(index_url(archive_url, f"{stem}.q.npy"), _npy(q))
        write_bytes(index_url(archive_url, f"{stem}.scale.npy"), _npy(scale))
        write_bytes(index_url(archive_url, shard_file), faiss.serialize_index(index).tobytes())
        state["shards"].append({**f, "start": start, "file": shard_file})
        state["next_id"] = start + len(x)
        write_json(index_url(archive_url, "index.json"), state, indent=1)  # this shard is committed
        written += 1
        _fault(written)
    log.info("%s: patch index holds %d vectors in %d shard(s)", archive_url, state["next_id"], len(state["shards"]))
    return state


def _npy(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr))
    return buf.getvalue()


def _fault(shards: int) -> None:
    """Kill this process (SIGKILL, no cleanup) once it committed ``$SKYPIPE_FAULT_INDEX_KILL_AFTER`` shards."""
    import os

    after = os.environ.get(KILL_AFTER_ENV)
    if after and shards >= int(after):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _dimension(archive_url: str, files: list[dict[str, Any]]) -> int | None:
    for f in files:
        if f["rows"]:
            vec = read_file(archive_url, f["path"], ["vector"]).schema.field("vector").type
            return int(vec.list_size)
    return None


def index_exists(archive_url: str) -> bool:
    """Whether the archive has an ``index/index.json``."""
    return exists(index_url(archive_url, "index.json"))
