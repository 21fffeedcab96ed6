"""The host process's memory allocator, tuned for CPU inference.

A 2K image's latent and the solver's temporaries are 50-100 MB tensors. glibc serves each with a
fresh mmap and unmaps it when freed, so every step pays the page faults of touching them anew: on
the demo checkpoint at 2048², about a quarter of the CPU time. Keeping freed memory in the heap for
reuse (what torch's caching allocator does on CUDA) removes most of that cost; the numbers are unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("hidream.engine")

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
_TUNED = False


def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from the heap and not to hand freed memory back to the OS.

    Once per process; a no-op (False) off glibc, or when the user set any MALLOC_* variable, which
    glibc reads itself. The process's resident memory then stays near its peak between requests
    (that memory is reused, not leaked).
    """
    global _TUNED
    if _TUNED or any(name.startswith("MALLOC_") for name in os.environ):
        return _TUNED
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    ok = all(mallopt(param, value) == 1 for param, value in
             ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 << 20)))
    _TUNED = ok
    if ok:
        log.debug("glibc malloc: large blocks from the heap, freed memory kept for reuse")
    return ok
