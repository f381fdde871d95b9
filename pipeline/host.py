"""The host process, set up for kdpipe: its memory allocator (for the large, short-lived
tensors of CPU training) and its DataLoader workers' signals.

A training step or a teacher pass allocates its activations and frees them again, over
and over. glibc serves blocks above its mmap threshold (up to 32 MB) with fresh
mappings, and gives freed memory at the top of its heap back to the kernel past a trim
threshold; either way the next step page-faults every page in again. On 2 cores a
ResNet-50 teacher took 7,700 minor faults per 224 px view and ran 22.9 views/s; with
freed memory kept, it took 8 and ran 26.4 views/s, and a MobileNetV3-Small training
step went from 67-73 to 87 views/s (docs/performance.md). The price is that the process
keeps its peak memory, as PyTorch's CUDA allocator does on a GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import signal

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

# Variables that tune the same settings by hand; when one is set kdpipe leaves them alone.
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse: no blocks mapped on their own
    and no trimming of the heap. Returns whether it did: not on other C libraries, nor
    when the environment tunes these settings itself (USER_SETTINGS or
    glibc.malloc tunables in GLIBC_TUNABLES)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def quiet_worker(worker_id: int = 0) -> None:
    """A DataLoader worker's start: leave Ctrl-C to the main process, and end quietly on
    SIGTERM or SIGHUP.

    A scheduler or a terminal signals the whole process group. The main process turns the
    signal into one line and shuts its workers down; a worker killed by the signal would
    make the main process report a dead worker with a traceback instead. A worker that
    ends with status 0 is not reported, and multiprocessing's own SIGTERM at exit still
    ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _end_worker)


def _end_worker(signum: int, frame) -> None:
    os._exit(0)
