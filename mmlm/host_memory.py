"""Host allocator settings for XLA's CPU runtime (glibc Linux).

XLA's CPU client allocates each execution's temporary buffer (all of a
train step's activations, one block: 281 MB for the demo's step) with
`posix_memalign` on a worker thread and frees it when the step ends.
glibc serves a block that large from a per-thread arena by `mmap` and
returns it with `munmap`, so every step faults the whole block in again as
fresh zeroed pages: measured on the demo, 68,600 page faults and 0.25 s of
kernel time per 0.65 s step on a 2-core CPU.

`keep_freed_memory()` tells glibc to keep freed memory for reuse: one
arena (thread arenas fall back to `mmap` for blocks larger than their
heaps), no `mmap` for large blocks, and no trimming below 1 GiB. The
second step onward then reuses the same pages (no faults). Process-wide,
so it must run before the XLA backend starts its threads; `mmlm`'s
commands that run compiled steps call it first. A no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD_BYTES = 1 << 30
# Set to 0 to leave glibc's defaults (e.g. to compare).
DISABLE_ENV = "MMLM_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Applies the settings above; True when they took effect."""
    if os.environ.get(DISABLE_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                                             (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)))
    if not ok:
        log.debug("mallopt refused a setting; glibc allocator defaults stay in place")
    return ok
