"""Return the memory of large freed tensors to the operating system (glibc's ``mallopt``).

glibc serves an allocation above its mmap threshold with its own ``mmap`` and gives it back on free,
but it raises that threshold to the size of every such block freed (up to 32 MiB), after which the
large temporaries of a layer-by-layer run (a layer's float32 copies, GPTQ's Hessians, a cast chunk)
come from the heap. The heap cannot shrink past a live block above a hole, so each layer leaves holes
that the next layer's slightly different sizes do not fit: measured on a 1B-shaped bf16 checkpoint,
``quantize --streamed`` grew by about 60 MB per layer (peak 2.5 GB) and stayed at 1.46 GB with a fixed
threshold (``docs/performance.md``). Setting the threshold explicitly turns the adjustment off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD_BYTES = 1 << 20
ENV = "MALLOC_MMAP_THRESHOLD_"  # glibc's own tunable: when the user sets it, theirs stands


def release_large_blocks(threshold: int = THRESHOLD_BYTES) -> bool:
    """Serve allocations of at least ``threshold`` bytes by ``mmap`` from now on (glibc only).

    Parameters
    ----------
    threshold : int
        The fixed mmap threshold in bytes (default 1 MiB).

    Returns
    -------
    bool
        True when the threshold was set; False on a C library without ``mallopt`` (macOS, musl,
        Windows) or when the environment already sets ``MALLOC_MMAP_THRESHOLD_``.
    """
    if not sys.platform.startswith("linux") or ENV in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1


__all__ = ["release_large_blocks"]
