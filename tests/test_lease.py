"""One writer per output: real processes race for a lease, a SIGKILLed owner's lease is broken, stale heartbeats
are broken, and the same on a real S3 API (moto's server on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from s3_server import moto_s3

from pipeline.lease import (
    LeaseHeldError,
    LeaseInfo,
    LeaseLostError,
    OutputLease,
    lease_url,
    read_lease,
)
from pipeline.storage import exists, write_bytes

# A run that takes the lease at a given moment: prints "won <pid>" and holds it until the release file appears,
# or prints "held" and the error when another run has it.
CHILD = r"""
import os, sys, time
from pipeline.lease import LeaseHeldError, OutputLease
url, start_at, release_file = sys.argv[1], float(sys.argv[2]), sys.argv[3]
time.sleep(max(0.0, start_at - time.time()))
try:
    lease = OutputLease(url, what="test outputs").acquire()
except LeaseHeldError as err:
    print("held", str(err).replace("\n", " | "), flush=True)
    sys.exit(0)
print("won", os.getpid(), flush=True)
while not os.path.exists(release_file):
    time.sleep(0.05)
lease.release()
print("released", flush=True)
"""


def _race(url: str, tmp_path, n: int = 3, delay: float = 3.0) -> list[str]:
    """``n`` processes try to take the lease at the same moment; returns their first output lines."""
    release = tmp_path / f"release-{time.monotonic_ns()}"
    start_at = time.time() + delay  # after every interpreter has started and imported
    cmd = [sys.executable, "-c", CHILD, url, str(start_at), str(release)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    lines = [p.stdout.readline().strip() for p in procs if p.stdout is not None]  # the winner holds meanwhile
    release.touch()
    for p in procs:
        assert p.wait(timeout=60) == 0
    return lines


def test_two_processes_racing_exactly_one_wins(tmp_path):
    out = str(tmp_path / "job")
    lines = _race(out, tmp_path)
    assert sum(line.startswith("won") for line in lines) == 1, lines
    losers = [line for line in lines if line.startswith("held")]
    assert len(losers) == 2 and all(
        "another run holds its lease" in line and "--break-lease" in line for line in losers
    )
    assert not exists(lease_url(out))  # the winner released it
    with OutputLease(out) as lease:  # and it can be taken again
        assert lease.held and read_lease(out).token == lease.info.token


def _hold_forever(url: str) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-c", CHILD, url, "0", "/nonexistent/never"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line[0] == "won", line
    return proc, int(line[1])


def test_a_sigkilled_owners_lease_is_broken_by_the_next_run(tmp_path, caplog):
    out = str(tmp_path / "job")
    proc, pid = _hold_forever(out)
    try:
        with pytest.raises(LeaseHeldError) as info:
            OutputLease(out, what="job outputs").acquire()
        msg = str(info.value)
        assert len(msg.splitlines()) == 2
        for part in (out, "job outputs", socket.gethostname(), f"pid {pid}", "since", "--break-lease"):
            assert part in msg, (part, msg)
        proc.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _state(pid) not in ("Z", None) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _state(pid) in ("Z", None)  # not reaped yet: a zombie counts as dead too
        with OutputLease(out) as lease:
            assert read_lease(out).token == lease.info.token
        assert f"process {pid} no longer runs" in caplog.text
    finally:
        proc.kill()
        proc.wait()
    assert not exists(lease_url(out))


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _foreign_lease(out: str, heartbeat_age: float, ttl_s: float = 120.0) -> LeaseInfo:
    now = time.time()
    info = LeaseInfo("f" * 32, "other-host", "other-host/boot/ns", 4242, now - 3600, now - heartbeat_age, ttl_s,
                     what="job outputs")  # fmt: skip
    write_bytes(lease_url(out), info.to_json())
    return info


def test_stale_heartbeat_is_broken_fresh_one_only_with_force(tmp_path, caplog):
    out = str(tmp_path / "job")
    _foreign_lease(out, heartbeat_age=5)
    with pytest.raises(LeaseHeldError, match=r"(?s)host other-host pid 4242 since .*last heartbeat 5 s ago"):
        OutputLease(out).acquire()
    with OutputLease(out, force=True) as lease:
        assert read_lease(out).token == lease.info.token
    assert "forced" in caplog.text

    _foreign_lease(out, heartbeat_age=121)
    with OutputLease(out) as lease:
        assert lease.held
    assert "last heartbeat is 121 s old (ttl 120 s)" in caplog.text


def test_heartbeat_refreshes_and_a_taken_over_lease_is_lost_not_deleted(tmp_path):
    out = str(tmp_path / "job")
    lease = OutputLease(out, ttl_s=0.4).acquire()
    try:
        first = read_lease(out).heartbeat
        time.sleep(0.5)
        assert read_lease(out).heartbeat > first
        with pytest.raises(LeaseHeldError):  # not re-entrant, even in the same process
            OutputLease(out).acquire()
        lease.check()
        other = _foreign_lease(out, heartbeat_age=0, ttl_s=3600)  # someone broke it (e.g. with force)
        time.sleep(0.3)
        assert lease.lost and not lease.held
        with pytest.raises(LeaseLostError, match="other-host"):
            lease.check()
    finally:
        lease.release()
    assert read_lease(out).token == other.token  # release never deletes someone else's lease


# --- the same on a real S3 API -----------------------------------------------------------------------------------

BUCKET = "lease-test"


@pytest.fixture(scope="module")
def s3() -> Iterator[object]:
    with moto_s3(BUCKET) as fs:
        yield fs


def test_s3_conditional_create_race_dead_owner_and_release(s3, tmp_path, caplog):
    url = f"s3://{BUCKET}/race/job"
    lines = _race(url, tmp_path)
    assert sum(line.startswith("won") for line in lines) == 1, lines
    assert not s3.exists(f"{BUCKET}/race/job/.lease.json")

    url = f"s3://{BUCKET}/dead/job"
    proc, pid = _hold_forever(url)
    with pytest.raises(LeaseHeldError, match=f"pid {pid}"):
        OutputLease(url).acquire()
    proc.kill()
    proc.wait()
    t0 = time.monotonic()
    with OutputLease(url) as lease:
        assert time.monotonic() - t0 >= lease.settle_s == 1.0  # the read-back after the settle delay
        assert json.loads(s3.cat_file(f"{BUCKET}/dead/job/.lease.json"))["token"] == lease.info.token
    assert f"process {pid} no longer runs" in caplog.text
    assert not s3.exists(f"{BUCKET}/dead/job/.lease.json")


def test_s3_exclusive_create_is_a_conditional_put(s3):
    lease = OutputLease(f"s3://{BUCKET}/cond/job", settle_s=0)
    assert lease._create(_foreign_info()) is True
    assert lease._create(_foreign_info()) is False  # If-None-Match: * refused by the server
    s3.rm(f"{BUCKET}/cond/job/.lease.json")


def _foreign_info() -> LeaseInfo:
    now = time.time()
    return LeaseInfo(os.urandom(8).hex(), "h", "n", 1, now, now, 120.0)


class _IgnoresCreate(MemoryFileSystem):
    """An object store that ignores ``If-None-Match`` (as some S3-compatible servers do): create overwrites."""

    protocol = "nocond"

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        return super().pipe_file(path, value, mode="overwrite", **kwargs)


def test_read_back_catches_a_store_that_ignores_the_create_condition():
    fsspec.register_implementation("nocond", _IgnoresCreate, clobber=True)
    url = f"nocond://lease-{os.getpid()}/job"
    barrier, outcome = threading.Barrier(2), {}

    def take(who: str) -> None:
        lease = OutputLease(url, settle_s=0.5)
        barrier.wait()
        try:
            outcome[who] = lease.acquire()
        except LeaseHeldError as err:
            outcome[who] = err

    threads = [threading.Thread(target=take, args=(who,)) for who in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [v for v in outcome.values() if isinstance(v, OutputLease)]
    assert len(won) == 1 and sum(isinstance(v, LeaseHeldError) for v in outcome.values()) == 1, outcome
    assert read_lease(url).token == won[0].info.token
    won[0].release()
