"""Per-batch inference: read tiles (prefetched in a thread), run the task model, write tiles and manifest records.

:class:`TileProcessor` is the whole per-batch logic as a plain class (benchmarks and tests use it without Ray);
:class:`InferenceWorker` is the thin Ray actor around it. One processor holds one task model, on the GPU when one
is assigned and available (bf16 autocast), else on the CPU, always under ``torch.inference_mode``.

Determinism: on the CPU every tile is run as its own forward pass (``micro_batch=1``), so a tile's output does not
depend on which other tiles shared its batch, and a resumed job writes bit-identical tiles. On the GPU whole
batches go through the model at once for throughput; outputs then vary with the batch composition at round-off
level.

Fault injection (tests, drills): ``faults={tile_id: mode}`` with mode ``exit`` (the worker process dies with
``os._exit(1)`` whenever it is about to run that tile), ``exit-once`` (dies the first time only; a marker under
``manifest/faults/`` remembers it across restarts), ``raise`` (the tile raises an error) or ``hang`` (the worker
sleeps forever on that tile, for the pool's batch timeout). The runner fills it from
the ``SKYPIPE_FAULT_TILES`` environment variable, e.g. ``SKYPIPE_FAULT_TILES="3:exit-once,7:exit"``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from pipeline import storage
from pipeline.infer.params import InferenceParams
from pipeline.infer.reader import CubeReader, TileInputs
from pipeline.infer.store import TileManifest, open_for_writing, tiles_url, write_detections, write_tile
from pipeline.infer.task import resolve_task
from pipeline.infer.tiling import Tile
from pipeline.model.skysense import ModalityInput

log = logging.getLogger(__name__)

FAULT_ENV = "SKYPIPE_FAULT_TILES"
FAULT_MODES = ("exit", "exit-once", "raise", "hang")
Work = Sequence[tuple[int, int]]  # (tile id, attempt number)


def parse_faults(text: str | None) -> dict[int, str]:
    """``"3:exit-once,7:exit,9:raise"`` -> ``{3: "exit-once", 7: "exit", 9: "raise"}``."""
    faults: dict[int, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        tile, _, mode = part.partition(":")
        mode = mode or "exit"
        if not tile.strip().isdigit() or mode not in FAULT_MODES:
            raise ValueError(f"{FAULT_ENV}: bad entry {part!r}; expected TILE_ID:{'|'.join(FAULT_MODES)}")
        faults[int(tile)] = mode
    return faults


def pick_device(gpus: float) -> torch.device:
    """CUDA when a GPU share was requested and CUDA works, else CPU."""
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def _stack(items: Sequence[TileInputs], period: int, device: torch.device) -> dict[str, ModalityInput]:
    """Batch one period of several tiles: x (B, T, C, H, W), doy (B, T), valid (B, T, H, W)."""
    out = {}
    for name, first in items[0].periods[period].items():
        arrs = [t.periods[period][name] for t in items]
        x = torch.from_numpy(np.stack([a.x for a in arrs])).to(device, non_blocking=True)
        valid = torch.from_numpy(np.stack([a.valid for a in arrs])).to(device, non_blocking=True)
        doy = torch.from_numpy(np.stack([a.doy for a in arrs])).to(device)
        out[name] = ModalityInput(x, doy=doy, valid=valid, gsd=first.gsd)
    return out


class TileProcessor:
    """Reads, runs and writes batches of tiles of one job; usable without Ray.

    Args:
        params: the job's inference settings (the tile store must exist: the runner creates it).
        device: ``cpu``, ``cuda`` or a torch device.
        micro_batch: tiles per forward pass (default: 1 on CPU, the whole batch on GPU).
        faults: fault injection, see the module docstring.
        worker: identity recorded in manifest records (host, pid, Ray node id).
        cache_bytes: decoded-chunk cache of the reader.

    """

    def __init__(
        self,
        params: InferenceParams,
        *,
        device: str | torch.device = "cpu",
        micro_batch: int | None = None,
        faults: Mapping[int, str] | None = None,
        worker: Mapping[str, Any] | None = None,
        cache_bytes: int = 1 << 30,
    ) -> None:
        self.params = params
        self.output_url = params.output_url
        self.device = torch.device(device)
        self.group = open_for_writing(tiles_url(params.output_url))
        attrs = self.group.attrs.asdict()
        # Output lengths (tile size, origins, grid) are in output pixels: ``ratio`` per 10 m cell for kinds that map
        # at the finest input resolution (HR segmentation), 1 otherwise.
        self.ratio = int(attrs.get("output_ratio", 1))
        self.tile_size = int(attrs["tile_size"])
        self.origins = np.asarray(self.group["origin"][:])
        resolved = resolve_task(params.checkpoint, params.kind, params.num_classes, params.class_names)
        self.kind = resolved.kind
        self.task = resolved.build(context_radius=attrs.get("context_radius")).to(self.device)  # as the store says
        specs = {m: resolved.config.modality(m) for m in params.modalities}
        grid = (int(attrs["grid"]["height"]) // self.ratio, int(attrs["grid"]["width"]) // self.ratio)
        self.reader = CubeReader(params.cube_url, specs, params.periods, cache_bytes=cache_bytes, grid_shape=grid)
        self.manifest = TileManifest(params.output_url)
        self.micro_batch = micro_batch or (1 if self.device.type == "cpu" else 1 << 30)
        self.faults = dict(faults or {})
        self.worker = dict(worker or {"host": socket.gethostname(), "pid": os.getpid()})
        self.stats = {"read_s": 0.0, "wait_s": 0.0, "compute_s": 0.0, "write_s": 0.0, "tiles": 0}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="skypipe-prefetch")
        self._pending: tuple[tuple[int, ...], Future] | None = None

    def tile(self, tile_id: int) -> Tile:
        """The tile with store row ``tile_id``, on the 10 m grid."""
        row, col = (int(v) // self.ratio for v in self.origins[tile_id])
        return Tile(tile_id, row, col, self.tile_size // self.ratio)

    def _read(self, ids: tuple[int, ...]) -> list[TileInputs | BaseException]:
        start = time.perf_counter()
        out: list[TileInputs | BaseException] = []
        for i in ids:
            try:
                out.append(self.reader.read(self.tile(i)))
            except Exception as err:  # recorded per tile; the batch goes on
                out.append(err)
        self.stats["read_s"] += time.perf_counter() - start
        return out

    def prefetch(self, tile_ids: Sequence[int]) -> None:
        """Start reading ``tile_ids`` in the prefetch thread (the next :meth:`process` call picks them up)."""
        ids = tuple(int(i) for i in tile_ids)
        if ids and (self._pending is None or self._pending[0] != ids):
            self._pending = (ids, self._pool.submit(self._read, ids))

    def _inputs(self, ids: tuple[int, ...]) -> list[TileInputs | BaseException]:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == ids:
            start = time.perf_counter()
            result = pending[1].result()
            self.stats["wait_s"] += time.perf_counter() - start
            return result
        return self._read(ids)

    def forward(self, items: Sequence[TileInputs]) -> np.ndarray:
        """Stored values for tiles with data and one extent (h, w): ``(B, K, h*r, w*r)`` maps or ``(B, K)`` vectors.

        The kind's activation is applied (class probabilities, not logits, are stored and blended).
        """
        start = time.perf_counter()
        on_gpu = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            inputs = _stack(items, 0, self.device)
            after = _stack(items, 1, self.device) if len(items[0].periods) > 1 else None
            out = self.kind.activate(self.task(inputs, after))  # (B, K, H, W) or (B, K)
        expected = tuple(e * self.ratio for e in items[0].extent)
        if self.task.dense and tuple(out.shape[-2:]) != expected:
            raise RuntimeError(f"model output grid {tuple(out.shape[-2:])} is not the tile's {expected} pixels")
        result = out.float().cpu().numpy()
        self.stats["compute_s"] += time.perf_counter() - start
        return result

    def _inject(self, tile_id: int) -> None:
        mode = self.faults.get(tile_id)
        if mode == "raise":
            raise RuntimeError(f"injected fault on tile {tile_id} ({FAULT_ENV})")
        if mode == "hang":
            log.error("injected fault: worker %s hangs on tile %d", self.worker, tile_id)
            while True:
                time.sleep(3600)
        if mode == "exit-once":
            marker = storage.join(self.output_url, "manifest", "faults", f"{tile_id}.fired")
            if storage.exists(marker):
                return
            storage.write_bytes(marker, b"1")
        if mode in ("exit", "exit-once"):
            log.error("injected fault: worker %s exits on tile %d", self.worker, tile_id)
            os._exit(1)

    def _record(self, tile_id: int, attempt: int, status: str, seconds: float, **extra: Any) -> dict[str, Any]:
        return {
            "tile_id": tile_id, "index": tile_id, "origin": [int(v) for v in self.origins[tile_id]],
            "status": status, "error": None, "attempts": attempt, "seconds": round(seconds, 4),
            "worker": self.worker, "finished_at": datetime.now(timezone.utc).isoformat(), **extra,
        }  # fmt: skip

    def _write(self, item: TileInputs, out: np.ndarray, attempt: int, seconds: float) -> dict[str, Any]:
        """Write one tile: a map ``(K, h, w)`` (cut to the grid) into data/valid/pooled, or a vector ``(K,)``.

        A box-predicting task's raw ``(N, C)`` outputs are decoded and written by :meth:`_write_boxes`.
        """
        start = time.perf_counter()
        r = self.ratio
        valid = item.valid.repeat(r, axis=0).repeat(r, axis=1) if r > 1 else item.valid  # (S, S) output pixels
        extra: dict[str, Any] = {}
        if getattr(self.task, "boxes", False):
            extra["detections"] = self._write_boxes(item, out, valid)
        elif out.ndim == 1:  # one vector per tile (scene classification): no map to store
            write_tile(self.group, item.tile.id, None, valid.astype(np.uint8), out.astype(np.float32))
        else:
            (h, w), S = (e * r for e in item.extent), self.tile_size
            out_KSS = np.full((out.shape[0], S, S), np.nan, dtype=np.float32)
            out_KSS[:, :h, :w] = out  # outside the grid: NaN, and not valid
            data = np.where(valid[None], out_KSS, np.nan).astype(np.float32)
            pooled = out_KSS[:, valid].mean(axis=1).astype(np.float32)
            write_tile(self.group, item.tile.id, data, valid.astype(np.uint8), pooled)
        rec = self._record(item.tile.id, attempt, "done", seconds, valid_fraction=round(float(valid.mean()), 6),
                           **extra)  # fmt: skip
        self.manifest.write(rec)  # after the arrays: "done" means complete
        self.stats["write_s"] += time.perf_counter() - start
        return rec

    def _write_boxes(self, item: TileInputs, raw: np.ndarray, valid: np.ndarray) -> int:
        """Decode one tile's boxes and write them with its arrays; returns how many.

        Decoding uses the head's score threshold and NMS; the boxes centred on valid pixels of the tile's part of the
        grid are kept and moved onto the output grid. ``pooled`` gets the tile's objects per class.
        """
        task: Any = self.task
        det = task.decode(torch.from_numpy(raw)[None])[0]
        boxes, scores, classes = det["boxes"], det["scores"], det["classes"]
        h, w = (e * self.ratio for e in item.extent)
        col, row = np.floor(boxes[:, 0]).astype(np.int64), np.floor(boxes[:, 1]).astype(np.int64)
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        inside[inside] &= valid[row[inside], col[inside]].astype(bool)
        boxes, scores, classes = boxes[inside], scores[inside], classes[inside]
        r0, c0 = (int(v) for v in self.origins[item.tile.id])  # the tile's origin on the output grid
        table = {
            "tile_id": np.full(len(scores), item.tile.id), "det": np.arange(len(scores)), "class_id": classes,
            "score": scores, "cx": boxes[:, 0] + c0, "cy": boxes[:, 1] + r0, "w": boxes[:, 2], "h": boxes[:, 3],
            "angle": boxes[:, 4],
        }  # fmt: skip
        meta = {"score_threshold": task.score_threshold, "nms_iou": task.nms_iou, "oriented": task.oriented}
        pooled = np.bincount(classes, minlength=task.out_channels)[: task.out_channels].astype(np.float32)
        write_tile(self.group, item.tile.id, None, valid.astype(np.uint8), pooled)
        write_detections(self.output_url, item.tile.id, table, meta)
        return len(scores)

    def process(self, work: Work) -> list[dict[str, Any]]:
        """Run a batch of ``(tile_id, attempt)``; returns one record per tile (``done``, ``skipped`` or ``error``).

        ``done`` and ``skipped`` (no valid input pixel at all) are written to the manifest here; an ``error`` is
        returned to the caller, which decides between a retry and recording the tile as failed.
        """
        start = time.perf_counter()
        attempts = {int(t): int(a) for t, a in work}
        ids = tuple(attempts)
        results: dict[int, dict[str, Any]] = {}
        todo: list[TileInputs] = []
        for tile_id, item in zip(ids, self._inputs(ids)):
            if isinstance(item, BaseException):
                results[tile_id] = self._error(tile_id, attempts[tile_id], item, "read")
            elif item.all_nodata:
                rec = self._record(tile_id, attempts[tile_id], "skipped", 0.0, reason="all-nodata", valid_fraction=0)
                self.manifest.write(rec)
                results[tile_id] = rec
            else:
                todo.append(item)
        by_extent: dict[tuple[int, int], list[TileInputs]] = {}
        for item in todo:  # tiles cut at the grid's edge run apart from whole ones (one shape per forward)
            by_extent.setdefault(item.extent, []).append(item)
        for same in by_extent.values():
            for i in range(0, len(same), self.micro_batch):
                self._run_group(same[i : i + self.micro_batch], attempts, results)
        self.stats["tiles"] += len(ids)
        log.debug("batch of %d tiles in %.2f s", len(ids), time.perf_counter() - start)
        return [results[i] for i in ids]

    def _run_group(self, group: list[TileInputs], attempts: dict[int, int], results: dict[int, dict]) -> None:
        start = time.perf_counter()
        try:
            for item in group:
                self._inject(item.tile.id)
            out = self.forward(group)
        except Exception as err:
            if len(group) == 1:
                results[group[0].tile.id] = self._error(group[0].tile.id, attempts[group[0].tile.id], err, "model")
                return
            for item in group:  # isolate the failing tile(s)
                self._run_group([item], attempts, results)
            return
        share = (time.perf_counter() - start) / len(group)
        for item, out_KSS in zip(group, out):
            try:
                results[item.tile.id] = self._write(item, out_KSS, attempts[item.tile.id], share)
            except Exception as err:  # storage trouble: the driver retries the tile
                results[item.tile.id] = self._error(item.tile.id, attempts[item.tile.id], err, "write")

    def _error(self, tile_id: int, attempt: int, err: BaseException, stage: str) -> dict[str, Any]:
        log.warning("tile %d: %s failed: %s: %s", tile_id, stage, type(err).__name__, err)
        rec = self._record(tile_id, attempt, "error", 0.0)
        rec["error"] = f"{stage}: {type(err).__name__}: {err}"
        return rec

    def run(self, batches: Iterable[Sequence[int]], attempt: int = 1) -> Iterator[list[dict[str, Any]]]:
        """Process ``batches`` of tile ids in order, reading batch k+1 while batch k runs."""
        it = iter(batches)
        current = next(it, None)
        while current is not None:
            following = next(it, None)
            if following is not None:
                self.prefetch(following)
            yield self.process([(t, attempt) for t in current])
            current = following

    def close(self) -> None:
        """Stop the prefetch thread."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class InferenceWorker:
    """Ray actor (wrapped with ``ray.remote`` by the runner) holding one :class:`TileProcessor`.

    Args:
        params: the job's inference settings.
        threads: torch intra-op threads (the actor's CPU share).
        faults: fault injection (see the module docstring).

    """

    def __init__(self, params: InferenceParams, *, threads: int | None = None, faults: Mapping[int, str] | None = None):
        import ray

        if threads:
            torch.set_num_threads(int(threads))
        worker = {"host": socket.gethostname(), "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}
        device = pick_device(params.gpus_per_actor)
        self.processor = TileProcessor(params, device=device, worker=worker, faults=faults)

    def ready(self) -> dict[str, Any]:
        """Identity of this worker (also a liveness probe)."""
        return {**self.processor.worker, "device": str(self.processor.device)}

    def process(self, work: Work, next_work: Work | None = None) -> list[dict[str, Any]]:
        """Process ``work``; start prefetching ``next_work`` (the batch the driver will send next) first."""
        if next_work:
            self.processor.prefetch([t for t, _ in next_work])
        return self.processor.process(work)

    def stats(self) -> dict[str, Any]:
        """Cumulative read / wait / compute / write seconds, the process's CPU seconds and peak memory, its device."""
        from pipeline.memory import peak_rss

        return {**self.processor.stats, "cpu_s": time.process_time(), "peak_rss": peak_rss(),
                "device": self.processor.device.type, **self.processor.worker}  # fmt: skip
