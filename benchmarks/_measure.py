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
    """This process's peak resident set size in bytes (``VmHWM`` of ``/proc/self/status``).

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries that across ``execve``, so a child started
    by a large process reports at least its parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak RSS is read from Linux's /proc)")
