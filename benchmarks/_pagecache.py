"""The page cache's share of a checkpoint: how much of its files is in memory, and putting it there or not.

A layer-by-layer command reads the whole checkpoint once; whether those reads come from the page cache
or from the disk changes its wall time more than anything it computes (the 8B-shaped eval: 62.5 s with
the 16 GB checkpoint cached, 99.5 s with it evicted, on this machine). ``benchmarks/model_size.py``
therefore sets the cache's state before each command (:func:`warm` or :func:`evict`) and records
:func:`resident_fraction`, and ``benchmarks/cost_model.py`` reads the cached share at the cached rate and
the rest at the disk's. Linux only (``mincore``, ``posix_fadvise``); elsewhere :func:`resident_fraction`
is ``None`` and :func:`evict` does nothing.

:func:`evict` drops this kernel's cached pages only: under a virtual machine the host may still hold
the file, so an evicted file can read faster than the disk (here 1.4-1.6 GB/s after eviction for a file
read or written minutes before, 0.35-0.45 GB/s for one untouched since the machine started).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

_CHUNK = 16 << 20


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        return libc
    except (OSError, AttributeError):
        return None


def _resident_bytes(path: Path, libc) -> int | None:
    size = path.stat().st_size
    if size == 0:
        return 0
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            resident = sum(b & 1 for b in bytes(vec))
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return min(size, resident * page)


def checkpoint_files(folder: Path) -> list[Path]:
    """The ``*.safetensors`` files of a checkpoint folder (what its commands read)."""
    return sorted(Path(folder).glob("*.safetensors"))


def resident_fraction(paths) -> float | None:
    """The fraction of the bytes of ``paths`` that the page cache holds (``mincore``); ``None`` where it
    cannot be asked (not Linux, or a call failed)."""
    libc = _libc()
    paths = [Path(p) for p in paths]
    total = sum(p.stat().st_size for p in paths)
    if libc is None or not hasattr(libc, "mincore") or total == 0:
        return None
    resident = 0
    for p in paths:
        n = _resident_bytes(p, libc)
        if n is None:
            return None
        resident += n
    return resident / total


def evict(paths) -> None:
    """Ask the kernel to drop the cached pages of ``paths`` (``POSIX_FADV_DONTNEED``; clean pages only, so
    a file is synced first); a no-op where ``posix_fadvise`` is missing."""
    if not hasattr(os, "posix_fadvise"):
        return
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths) -> None:
    """Read every byte of ``paths`` once (discarded), so that the page cache holds them as far as it can."""
    buf = bytearray(_CHUNK)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
