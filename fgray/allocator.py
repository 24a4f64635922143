"""glibc malloc settings for training processes: keep the memory one step freed for the next.

A CPU step allocates and frees its activations every step (the CPU allocator is plain
malloc). glibc hands memory at the top of a heap back to the system once more than
`M_TRIM_THRESHOLD` is free, and serves blocks above `M_MMAP_THRESHOLD` from fresh mappings;
either way the next step faults the same pages in again, and the kernel zeroes each one.
A thread other than the main one is worse off: glibc gives it an arena of its own, made of
heaps of at most 64 MB that are shrunk and unmapped as they empty. Ray Train runs the training
function in such a thread (so does a Tune trial), so the same loop ran slower in a Ray worker
than in `fgray pretrain --workers 0`'s main thread.

Measured on 2 cores (tf_efficientnet_lite0, batch 64 at 96 px, 1 thread, `minflt` and system
time per step; `benchmarks/ray_overhead.py` has the loop's figures): glibc's defaults, main
thread 66k faults / 77 ms, another thread 100k / 110 ms; with the thresholds raised at run
time (`keep_freed_memory`), 40k / 46 ms and 113k / 133 ms (another thread keeps its own
arena); with one arena too (`ENV`, read only when a process starts), 8k / 13 ms and 17k /
16 ms, the two threads then equally fast.

What this costs: freed memory stays with the process up to 1 GB above what it uses (a
reused Tune trial gives it back after each job, `fgray.tune.actor_memory`), and every thread
allocates from one arena, behind one lock; the few threads of a training process (the loop,
the batch gatherer, torch's) allocate far less often than the loop computes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

TRIM_THRESHOLD = 1 << 30  # free memory at a heap's top kept up to 1 GB
MMAP_THRESHOLD = 1 << 25  # blocks up to 32 MB (glibc's largest) from the heap, not mmap
# For a process about to start (Ray workers, through their job's runtime_env).
ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
       "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


@functools.cache
def libc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is another (macOS, musl: nothing here applies)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(lib, "mallopt") or not hasattr(lib, "malloc_trim"):
        return None
    lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lib


def keep_freed_memory() -> bool:
    """Raise this process's trim and mmap thresholds (what `ENV` sets at a process's start,
    except the arena count, which only the environment can set). True where glibc took
    them."""
    lib = libc()
    if lib is None:
        return False
    return bool(lib.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                and lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
