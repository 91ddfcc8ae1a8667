"""The driver's actor pool: a work queue of tile batches, per-tile attempts, dead-actor recovery, the wait loop.

Each actor gets its next batch together with the batch after it (``reserved``), which it starts reading in its
prefetch thread; an idle actor steals a batch another actor has only reserved. A batch whose actor died is requeued
tile by tile, so one poisonous tile cannot use up the attempts of its neighbours; tiles whose manifest record says
finished are never requeued. Ray restarts a dead actor up to ``max_restarts`` times (the pool waits for it to
answer a liveness probe); after that the pool replaces it with a fresh actor. An actor that hangs (a batch running
longer than ``batch_timeout`` seconds: a stuck GPU, a storage call that never returns) is killed and handled like
a dead one, its tiles charged with a "timed out" attempt.

Fail fast instead of looping: when actors die ``max_deaths_in_a_row`` times without any batch finishing in between
(the usual cause is memory: the kernel's OOM killer or Ray's memory monitor kills an actor whose tiles are too big,
Ray restarts it, it dies again), the run stops with :class:`ActorCrashLoopError` naming what to change; when no
actor has started after ``start_timeout`` seconds (no node can host the requested CPUs/GPUs), it stops with
:class:`ActorStartTimeoutError`.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from pipeline.errors import RunFailedError
from pipeline.infer.store import TileManifest

log = logging.getLogger(__name__)


class ActorCrashLoopError(RunFailedError):
    """Actors keep dying before they finish any batch (most often: out of memory)."""


class ActorStartError(RunFailedError):
    """An inference actor failed in its constructor (e.g. it cannot read the cube or the checkpoint on its node)."""


class ActorStartTimeoutError(RunFailedError):
    """No inference actor could start in time (the cluster has no node with the requested resources)."""


@dataclass
class _Slot:
    """One actor of the pool and the work the driver has given it."""

    handle: Any
    work: list[tuple[int, int]] | None = None
    reserved: list[tuple[int, int]] | None = None
    ready: bool = False
    deaths: int = 0
    init_failures: int = 0
    started: float = 0.0  # monotonic time the current batch was sent
    hung: str | None = None  # why the pool killed this actor, if it did


class ActorPool:
    """Actor pool: work queue, per-tile attempt accounting, dead-actor recovery, the ``ray.wait`` loop."""

    def __init__(
        self, make_actor: Any, n: int, *, manifest: TileManifest, base: dict[int, int], max_restarts: int,
        max_attempts: int, bar: tqdm, batch_timeout: float | None = None, start_timeout: float | None = 600.0,
        max_deaths_in_a_row: int | None = None,
    ) -> None:  # fmt: skip
        self.make_actor, self.manifest, self.base, self.bar = make_actor, manifest, base, bar
        self.batch_timeout, self.start_timeout = batch_timeout, start_timeout
        self.max_deaths_in_a_row = max_deaths_in_a_row or 2 * n + max_restarts + 1
        self.deaths_in_a_row = 0
        self.last_death = ""
        self.started_at = time.monotonic()
        self.any_ready = False
        self.max_restarts, self.max_attempts = max_restarts, max_attempts
        self.queue: deque[list[int]] = deque()
        self.tries: dict[int, int] = {}
        self.failed: dict[int, str] = {}
        self.nodes: set[str] = set()
        self.calls: dict[Any, _Slot] = {}
        self.probes: dict[Any, _Slot] = {}
        self.slots = [_Slot(make_actor()) for _ in range(n)]
        for slot in self.slots:
            self._probe(slot)

    def _probe(self, slot: _Slot) -> None:
        slot.ready = False
        self.probes[slot.handle.ready.remote()] = slot

    def _work(self, ids: list[int]) -> list[tuple[int, int]]:
        return [(t, self.base.get(t, 0) + self.tries.get(t, 0) + 1) for t in ids]

    def _next(self, steal: bool = False) -> list[tuple[int, int]] | None:
        if self.queue:
            return self._work(self.queue.popleft())
        for other in self.slots if steal else ():  # steal a batch another actor has only been prefetching
            if other.reserved:
                stolen, other.reserved = other.reserved, None
                return stolen
        return None

    def _dispatch(self, slot: _Slot) -> None:
        """Send ``slot`` its reserved batch (or the next one) plus the batch after it to prefetch."""
        work, slot.reserved = slot.reserved, None
        work = work or self._next(steal=True)
        if work is None:
            return
        slot.work, slot.reserved = work, self._next()
        slot.started = time.monotonic()
        self.calls[slot.handle.process.remote(work, slot.reserved)] = slot

    def _fail(self, tile_id: int, error: str) -> None:
        self.failed[tile_id] = error
        self.bar.update(1)

    def _retry(self, tile_id: int, error: str, front: bool = False) -> None:
        self.tries[tile_id] = self.tries.get(tile_id, 0) + 1
        if self.tries[tile_id] >= self.max_attempts:
            self._fail(tile_id, error)
        elif front:
            self.queue.appendleft([tile_id])
        else:
            self.queue.append([tile_id])

    def _on_death(self, slot: _Slot, err: BaseException) -> None:
        """The actor died holding ``slot.work``: charge one attempt per unfinished tile, retry them one by one."""
        reason = slot.hung or f"worker died while running this tile: {type(err).__name__}: {first_line(err)}"
        if slot.hung is None:  # a hang is the batch's fault, not a crash loop of the actor
            self.deaths_in_a_row += 1
            self.last_death = reason
            if self.deaths_in_a_row >= self.max_deaths_in_a_row:
                raise ActorCrashLoopError(
                    f"inference actors died {self.deaths_in_a_row} times in a row without finishing a batch; the usual "
                    "cause is memory (the OOM killer or Ray's memory monitor): lower tiles.size or batch_size, or "
                    f"give the actors more memory. Last: {reason}"
                )
        slot.hung = None
        log.warning("actor lost while running tiles %s: %s", [t for t, _ in slot.work or []], reason)
        if slot.reserved:
            self.queue.appendleft([t for t, _ in slot.reserved])
        for tile_id, _ in reversed(slot.work or []):
            rec = self.manifest.read(tile_id)
            if rec is not None and rec.get("status") in ("done", "skipped"):
                self.bar.update(1)  # finished before the actor died: never recomputed
                continue
            self._retry(tile_id, reason, front=True)
        slot.work = slot.reserved = None
        slot.deaths += 1
        if slot.deaths > self.max_restarts:
            self._replace(slot)
        else:
            self._probe(slot)  # Ray restarts it (max_restarts); use it again once it answers

    def _on_result(self, slot: _Slot, records: list[dict[str, Any]]) -> None:
        slot.work = None
        self.deaths_in_a_row = 0
        for rec in records:
            if rec["status"] == "error":
                self._retry(int(rec["tile_id"]), str(rec.get("error")))
            else:
                self.nodes.add(str((rec.get("worker") or {}).get("node_id", "")))
                self.bar.update(1)
        self.bar.set_postfix(failed=len(self.failed), refresh=False)

    def _on_probe(self, slot: _Slot, ref: Any) -> None:
        import ray

        try:
            info = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # restarting: ask again shortly
            time.sleep(0.5)
            self._probe(slot)
            return
        except ray.exceptions.RayActorError as err:
            slot.init_failures += 1
            if slot.init_failures >= 2:
                raise ActorStartError(f"an inference actor could not start twice in a row: {cause_line(err)}") from None
            log.warning("actor is dead or could not start (%s); replacing it", first_line(err))
            self._replace(slot)
            return
        slot.ready, slot.init_failures = True, 0
        self.any_ready = True
        log.debug("actor ready: %s", info)

    def _replace(self, slot: _Slot) -> None:
        import ray

        ray.kill(slot.handle, no_restart=True)
        slot.handle, slot.deaths = self.make_actor(), 0
        self._probe(slot)

    def run(self) -> None:
        """Until every queued tile is finished or failed."""
        import ray

        while self.queue or self.calls or self.probes or any(s.reserved for s in self.slots):
            wait = 5.0 if self.batch_timeout is None else min(5.0, max(self.batch_timeout / 4, 0.1))
            ready, _ = ray.wait([*self.calls, *self.probes], num_returns=1, timeout=wait)
            for ref in ready:
                if ref in self.probes:
                    self._on_probe(self.probes.pop(ref), ref)
                    continue
                slot = self.calls.pop(ref)
                try:
                    self._on_result(slot, ray.get(ref))
                except ray.exceptions.RayActorError as err:
                    self._on_death(slot, err)
                except ray.exceptions.RayTaskError as err:  # a bug outside the per-tile error handling
                    self._on_result(slot, [{"tile_id": t, "status": "error", "error": first_line(err)}
                                           for t, _ in slot.work or []])  # fmt: skip
            self._kill_hung()
            self._check_started()
            for slot in self.slots:
                if slot.ready and slot.work is None:
                    self._dispatch(slot)

    def _check_started(self) -> None:
        """Give up when no actor at all has started within ``start_timeout`` seconds."""
        if self.any_ready or self.start_timeout is None:
            return
        if time.monotonic() - self.started_at > self.start_timeout:
            raise ActorStartTimeoutError(
                f"no inference actor started within {self.start_timeout:g} s: the cluster has no node with the "
                "CPUs/GPUs an actor asks for (gpus_per_actor, actors); lower them or add nodes"
            )

    def _kill_hung(self) -> None:
        """Kill (for Ray to restart) every actor whose batch has run longer than ``batch_timeout``.

        Its pending call then fails with ``RayActorError`` and goes through :meth:`_on_death`.
        """
        import ray

        if self.batch_timeout is None:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.work is not None and slot.hung is None and now - slot.started > self.batch_timeout:
                slot.hung = f"timed out: the batch ran longer than {self.batch_timeout:g} s (actor killed)"
                log.warning("actor hung on tiles %s; killing it", [t for t, _ in slot.work])
                ray.kill(slot.handle, no_restart=False)

    def worker_stats(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Each live actor's :meth:`InferenceWorker.stats` (actors that do not answer are left out)."""
        import ray

        refs = [slot.handle.stats.remote() for slot in self.slots]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        out = []
        for ref in ready:
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayError:
                continue
        return out

    def shutdown(self) -> None:
        """Kill every actor."""
        import ray

        for slot in self.slots:
            ray.kill(slot.handle, no_restart=True)


def cause_line(err: BaseException) -> str:
    """The line naming the exception inside a Ray error's text (its traceback ends with it), for display only."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
    return (named[-1] if named else first_line(err))[:300]


def first_line(err: BaseException) -> str:
    """First line of an error message, at most 300 characters."""
    return (str(err).strip().splitlines() or [""])[0][:300]
