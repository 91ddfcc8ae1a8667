"""One writer per output: a lease file that a run holds while it writes a folder, refreshed by a heartbeat.

``{output}/.lease.json`` holds the owner's token, host, pid, start time and heartbeat. While a lease is held, a
daemon thread rewrites the heartbeat every ``ttl_s / 4``. Another run that tries to take the lease gets
:class:`LeaseHeldError` unless the owner is gone, which is decided by, in order:

* **dead process**: the lease was written on this machine (same hostname, boot and PID namespace) and its pid no
  longer runs (or is a zombie, or was reused by a process that started later);
* **stale heartbeat**: the heartbeat is older than the owner's ``ttl_s`` (the only test across machines: clocks
  must agree to well within ``ttl_s``, which NTP gives);
* **force**: the caller says the owner is dead (``force=True``, the CLI's ``--break-lease``).

Local paths (and anything mounted, NFS included): the check-and-take runs under ``flock`` on
``{output}/.lease.lock`` (released by the kernel when its holder dies, so it never goes stale), and a new lease is
created atomically with ``link()`` of a complete, fsynced temporary file, which fails if the lease exists (the
``O_CREAT | O_EXCL`` guarantee, without readers ever seeing a half-written lease). Heartbeats are atomic replaces.

Object stores (``s3://`` through s3fs, other fsspec URLs) have no lock, so the protocol is weaker:

* creating the lease is a conditional PUT (``If-None-Match: *``, s3fs ``mode="create"``; AWS S3, MinIO and moto
  honour it); file systems without ``mode="create"`` fall back to check-then-PUT;
* then, after ``settle_s`` (default 1 s), the lease is read back and must hold our token. This catches a server
  that ignored the condition and two runs that broke the same stale lease at the same moment (breaking is a plain
  overwrite): the last writer wins, every other run sees its token and gets :class:`LeaseHeldError`;
* the race window left: a run that pauses for longer than ``settle_s`` between reading a stale lease (or finding
  none, on the fallback path) and writing its own can overwrite a lease another run has already confirmed. Both
  then write; the overwritten owner notices at its next heartbeat (:attr:`OutputLease.lost`, :meth:`~OutputLease.
  check` raises :class:`LeaseLostError`) but not before. Heartbeats and the final delete are read-then-write too:
  they never touch a lease that is visibly someone else's, but are not conditional requests.

A lease is not re-entrant: taking it twice, even in one process, is refused like any other live owner.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.storage import join, read_bytes, remove, write_json

log = logging.getLogger(__name__)

LEASE_FILE = ".lease.json"
LOCK_FILE = ".lease.lock"
DEFAULT_TTL_S = 120.0
_REMOTE_SETTLE_S = 1.0
_LOCK_TIMEOUT_S = 60.0  # the flock is held for milliseconds; a minute means a hung file system


class LeaseHeldError(ValueError):
    """Another live run holds the lease on an output."""


class LeaseLostError(RuntimeError):
    """A lease this run held was broken and taken by another run."""


@dataclass(frozen=True)
class LeaseInfo:
    """The content of a lease file.

    Attributes:
        token: unique per acquisition; the lease is ours only while the file holds our token.
        host: hostname of the owner (for people).
        node: ``boot id / PID namespace`` of the owner: pids are comparable only when this matches ours.
        pid: owner process id; ``pid_start`` its start time in clock ticks since boot (catches pid reuse).
        started: when the lease was taken (Unix time); ``heartbeat`` its last refresh.
        ttl_s: after this many seconds without a heartbeat the owner counts as dead.
        what: what is being written, for messages.
    """

    token: str
    host: str
    node: str
    pid: int
    started: float
    heartbeat: float
    ttl_s: float
    pid_start: int | None = None
    what: str = ""

    def to_json(self) -> bytes:
        """The lease file's bytes."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseInfo:
        """Parse a lease file (unknown keys ignored)."""
        raw = json.loads(data)
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    def describe(self, now: float | None = None) -> str:
        """``host H pid P since <UTC time> (last heartbeat N s ago)``."""
        now = time.time() if now is None else now
        since = datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds")
        return f"host {self.host} pid {self.pid} since {since} (last heartbeat {now - self.heartbeat:.0f} s ago)"


def lease_url(output: str) -> str:
    """Where the lease of ``output`` lives."""
    return join(output, LEASE_FILE)


def read_lease(output: str) -> LeaseInfo | None:
    """The lease currently on ``output``, or ``None``.

    A lease file that cannot be parsed (no writer here produces one) counts as a lease of a dead owner.
    """
    try:
        data = read_bytes(lease_url(output))
    except FileNotFoundError:
        return None
    try:
        return LeaseInfo.from_json(data)
    except (ValueError, TypeError) as err:
        log.warning("%s: unreadable lease file (%s); treating its owner as dead", lease_url(output), err)
        return LeaseInfo("?", "?", "?", -1, 0.0, 0.0, 0.0, what="unreadable lease")


def this_node() -> str:
    """Identity of this kernel boot and PID namespace: pids are comparable only between equal nodes."""
    parts = []
    for path, read in (("/proc/sys/kernel/random/boot_id", _read_text), ("/proc/self/ns/pid", os.readlink)):
        try:
            parts.append(read(path).strip())
        except OSError:
            parts.append("?")
    return f"{socket.gethostname()}/{'/'.join(parts)}"


def node_tag() -> str:
    """:func:`this_node` as 8 hex digits, for file names that say which machine's pid they carry."""
    return hashlib.sha256(this_node().encode()).hexdigest()[:8]


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), ``None`` if unknown."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces and parentheses
        return fields[0].decode(), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` of this machine runs (zombies do not); with ``start``, whether it is that process."""
    if pid <= 0:
        return False
    if not os.path.isdir("/proc/self"):  # no procfs: signal 0 only tells whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    stat = _proc_stat(pid)
    if stat is None:
        return False
    state, started = stat
    return state not in ("Z", "X") and (start is None or started == start)


def owner_gone(info: LeaseInfo, *, now: float | None = None) -> str | None:
    """Why the owner of ``info`` is provably gone (dead process or stale heartbeat), or ``None`` if it may live."""
    now = time.time() if now is None else now
    if info.node == this_node() and not process_alive(info.pid, info.pid_start):
        return f"its process {info.pid} no longer runs on this machine"
    age = now - info.heartbeat
    if age > info.ttl_s:
        return f"its last heartbeat is {age:.0f} s old (ttl {info.ttl_s:.0f} s)"
    return None


class OutputLease:
    """Exclusive right to write ``output`` (a local folder or fsspec URL), held from :meth:`acquire` to :meth:`release`.

    Example::

        with OutputLease(archive_url, what="embedding archive"):
            ...  # write the archive

    Args:
        output: the folder the lease guards (created if missing).
        what: what is written there, for messages.
        ttl_s: heartbeat deadline; the heartbeat runs every ``ttl_s / 4``.
        force: break the lease even if its owner looks alive (the user says it is dead).
        settle_s: object stores only: wait before reading the lease back (default 1 s; 0 for ``memory://``).
    """

    def __init__(
        self,
        output: str,
        *,
        what: str = "outputs",
        ttl_s: float = DEFAULT_TTL_S,
        force: bool = False,
        settle_s: float | None = None,
    ) -> None:
        self.output, self.what, self.ttl_s, self.force = str(output), what, float(ttl_s), force
        self.url = lease_url(self.output)
        self._fs, self._path = fsspec.core.url_to_fs(self.url)
        self._local = isinstance(self._fs, LocalFileSystem)
        if settle_s is None:
            settle_s = 0.0 if self._local or isinstance(self._fs, MemoryFileSystem) else _REMOTE_SETTLE_S
        self.settle_s = settle_s
        self.info: LeaseInfo | None = None
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lease (as far as it knows: see :attr:`lost`)."""
        return self.info is not None and not self._lost

    @property
    def lost(self) -> bool:
        """Whether a heartbeat found the lease taken over by another run."""
        return self._lost

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> OutputLease:
        """Take the lease, breaking it if its owner is gone (or ``force``).

        Raises:
            LeaseHeldError: another live run holds it (the message names it and the fix).
        """
        if self.info is not None:
            raise RuntimeError(f"{self.url}: this lease object is already held")
        now = time.time()
        mine = LeaseInfo(uuid.uuid4().hex, socket.gethostname(), this_node(), os.getpid(), now, now, self.ttl_s,
                         pid_start=process_start(os.getpid()), what=self.what)  # fmt: skip
        if self._local:
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
        with self._locked():
            for _ in range(5):  # a lease that vanishes between our create and our read: try again
                if self._create(mine):
                    break
                other = read_lease(self.output)
                if other is None:
                    continue
                why = owner_gone(other) or ("forced" if self.force else None)
                if why is None:
                    raise self._held_error(other)
                log.warning("%s: breaking the lease of %s: %s", self.url, other.describe(), why)
                self._write(mine)
                break
            else:
                raise RuntimeError(f"{self.url}: the lease file keeps appearing and vanishing")
        if self.settle_s:
            time.sleep(self.settle_s)
        current = read_lease(self.output)
        if current is None:  # deleted right after we wrote it: someone is breaking it by hand
            raise LeaseHeldError(f"{self.url}: the lease vanished while this run was taking it; retry")
        if current.token != mine.token:  # another run won the race (object stores)
            raise self._held_error(current)
        self.info, self._lost = mine, False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat {self.output}", daemon=True)
        self._thread.start()
        log.debug("%s: lease taken (%s)", self.url, mine.describe())
        return self

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless the lease file still holds our token (call before committing)."""
        current = read_lease(self.output)
        if self.info is None or current is None or current.token != self.info.token:
            self._lost = True
            who = current.describe() if current is not None else "nobody"
            raise LeaseLostError(f"{self.url}: the lease on {self.what} was taken over; it is now held by {who}")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it is still ours (safe to call twice)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.info is None:
            return
        with self._locked():
            current = read_lease(self.output)
            if current is not None and current.token == self.info.token:
                remove(self.url)
            else:
                log.warning("%s: the lease was taken over by another run; leaving its lease in place", self.url)
        self.info = None

    def _held_error(self, other: LeaseInfo) -> LeaseHeldError:
        return LeaseHeldError(
            f"cannot write {self.what} to {self.output}: another run holds its lease ({other.describe()}).\n"
            "Wait for that run to finish; if it is dead, rerun with --break-lease (force=True)."
        )

    def _beat(self) -> None:
        interval = self.ttl_s / 4
        while not self._stop.wait(interval):
            try:
                with self._locked():
                    current = read_lease(self.output)
                    assert self.info is not None
                    if current is None or current.token != self.info.token:
                        self._lost = True
                        who = current.describe() if current is not None else "nobody (deleted)"
                        log.error("%s: lost the lease on %s; it is now held by %s", self.url, self.what, who)
                        return
                    self.info = replace(self.info, heartbeat=time.time())
                    self._write(self.info)
            except Exception as err:  # a transient store error must not end the heartbeat
                log.warning("%s: heartbeat failed (%s); retrying", self.url, err)

    def _create(self, info: LeaseInfo) -> bool:
        """Create the lease file only if there is none; ``False`` if one exists."""
        data = info.to_json()
        if self._local:
            tmp = f"{self._path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self._path)  # atomic, fails if the lease exists, and the file is complete
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            self._fs.pipe_file(self._path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except TypeError:  # this file system has no exclusive create: check, then write (see the module docstring)
            if self._fs.exists(self._path):
                return False
            self._fs.pipe_file(self._path, data)
            return True
        except OSError:  # e.g. a precondition failure s3fs does not map to FileExistsError
            if self._fs.exists(self._path):
                return False
            raise

    def _write(self, info: LeaseInfo) -> None:
        if self._local:
            write_json(self.url, asdict(info))
        else:
            self._fs.pipe_file(self._path, info.to_json())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """``flock`` on the sidecar lock file (local paths); nothing on object stores."""
        if not self._local or not os.path.isdir(os.path.dirname(self._path)):  # no folder: nothing to guard
            yield
            return
        fd = os.open(os.path.join(os.path.dirname(self._path), LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock(fd, self.url)
            yield
        finally:
            os.close(fd)  # releases the lock


def _flock(fd: int, what: str) -> None:
    deadline = time.monotonic() + _LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: could not lock the lease within {_LOCK_TIMEOUT_S:.0f} s") from None
            time.sleep(0.01)
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("%s: this file system has no flock; breaking stale leases is not race-free here", what)
            return


def lease_state(output: str) -> dict[str, Any] | None:
    """The lease on ``output`` for status displays: its fields plus ``gone`` (why the owner is gone, or None)."""
    info = read_lease(output)
    return None if info is None else {**asdict(info), "gone": owner_gone(info)}
