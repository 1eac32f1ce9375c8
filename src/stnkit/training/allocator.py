"""Keep freed memory in the process: large tensors stop costing page faults on every step.

glibc's ``malloc`` serves blocks above a threshold (128 KiB to 32 MiB, adapted
at run time) with ``mmap`` and returns them to the kernel on ``free``. A CPU
training step allocates and frees tensors of tens of MB (the first
convolution's output for a batch of 42x42 digits is 19 MB), so every step
maps fresh pages and the kernel zero-fills them on first touch. On the 2-core
machine of ``benchmarks/RESULTS.md`` that cost the 9x9 convolution of the ST
paper's classifier 28 ms instead of 8 ms, and a whole RTS ST-CNN step about 30%.
Raising the mmap and trim thresholds keeps those pages in the heap for reuse,
as ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` would.

The ``stnkit`` command calls :func:`tune_cpu_allocator` once at start-up. A
program that trains through the API can call it too. It changes nothing where
the C library is not glibc, or where the user set either variable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_cpu_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Freed blocks up to this size stay in the process; above it, malloc maps and unmaps as before.
KEEP_BYTES = 1 << 30
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_cpu_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds to :data:`KEEP_BYTES` for this process.

    Returns
    -------
    bool
        True if both thresholds were set; False where this is not Linux with
        glibc, or where ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``
        is set in the environment (the user's choice wins).

    Examples
    --------
    >>> tune_cpu_allocator() in (True, False)
    True
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _ENVIRONMENT):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success. Setting the mmap threshold also stops glibc adapting it.
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
