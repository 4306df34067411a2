"""Measuring helpers shared by the benchmarks: wall time (a function run a few times, one statistic
kept) and the peak resident memory of the process."""

from __future__ import annotations

import statistics
import time


def timed(fn, repeats: int = 3, warmup: int = 1, stat=min):
    """``(stat of the wall times of repeats calls of fn, the last call's result)`` after ``warmup`` calls.

    ``stat`` is ``min`` (the best time: least disturbed by the rest of the machine) or
    ``statistics.median``.
    """
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return stat(times), out


def best_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    """The shortest wall time of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    return timed(fn, repeats, warmup)[0]


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """The median wall time of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    return timed(fn, repeats, warmup, statistics.median)[0]


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (:func:`orthoopt.utils.memory.peak_rss_bytes`: ``VmHWM``;
    ``getrusage``'s ``ru_maxrss`` carries across ``execve``, so a child of a large process would report
    at least its parent's peak)."""
    from orthoopt.utils.memory import peak_rss_bytes as peak

    value = peak()
    if value is None:
        raise RuntimeError("the peak resident memory of this process cannot be read here")
    return value
