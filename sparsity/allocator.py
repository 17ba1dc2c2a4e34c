"""Keep freed memory for reuse on CPU instead of handing it back to the system.

PyTorch allocates CPU tensors with the C library's malloc. glibc serves every block above
its mmap threshold (128 KiB to start with) with a fresh ``mmap`` and unmaps it on free, so the
next tensor of that size page-faults on every 4 KiB page it touches, and the kernel zeroes
each page first. A pruning mask step at d_model 128 allocates and frees its ~4 MB
activations again and again: ~5,300 page faults a step, a fifth of its time on one core
(docs/pruning-speed.md). Raising the mmap threshold to its ceiling (32 MiB) and the trim
threshold well above a step's needs keeps those blocks in the heap, where the next step
finds them already mapped. Numbers do not change; a process keeps the memory of its largest
step, which it needed anyway.

Only glibc has these knobs (``mallopt``); elsewhere (macOS, musl) :func:`keep_freed_memory`
does nothing. ``CSP_MALLOC=system`` leaves the C library's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process (see the module docstring); True if it took effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("CSP_MALLOC", "").lower() == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                                (_M_TOP_PAD, TOP_PAD)))
    return _done
