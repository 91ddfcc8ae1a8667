"""Keep a driver's resident memory from growing with the number of blocks it has streamed ([ours]).

glibc gives threads that allocate concurrently their own malloc arenas (up to 8 per core). The mosaic, COG and
archive stages stream blocks of a few MB through a thread pool (Dask's, Zarr's I/O threads); buffers freed in one
arena and needed again in another leave holes that are never returned, so the process's resident size kept rising
with the area even though the live data stayed bounded: stitching 4x and 16x the demo area took +213 and +302 MiB
of RSS for a flat ~130 MiB of live (traced) allocations. One arena removes the drift (+142 and +156 MiB) at no
measured cost in time; a fixed ``M_MMAP_THRESHOLD`` (1-8 MiB) did too, but made stitching 40-70 % slower
(page faults on every large buffer). Numbers: benchmarks/RESULTS.md, "Memory and scale".

No library sets this for a process; ``mallopt`` is glibc's own knob and a no-op elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc malloc.h


def single_arena() -> bool:
    """Limit glibc malloc to one arena for the threads created from now on; True when applied (Linux/glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (driver, cube task or inference actor alike)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
