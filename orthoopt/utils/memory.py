"""Memory a command may use, and refusing a run whose estimated peak does not fit before it starts.

:func:`available_memory` is the smallest of ``MemAvailable`` (``/proc/meminfo``), the free part of the
process's cgroup memory limit (cgroup v2 ``memory.max - memory.current``, v1 ``memory.limit_in_bytes -
memory.usage_in_bytes``) and the ``ORTHOOPT_MEMORY_LIMIT`` environment variable (bytes, or with a
``K``/``M``/``G``/``T`` suffix, binary units: ``ORTHOOPT_MEMORY_LIMIT=8G``), so a user (or a test) can
state a budget below what the machine has. :func:`check_fits` raises :class:`MemoryBudgetError` (a
``ValueError``: the command line exits 2 with one line) naming the estimate, what is available, where
that figure comes from, and the settings that would fit, unless ``force`` (``--force``). The estimates
themselves are :mod:`orthoopt.models.footprint`'s.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from orthoopt.errors import InvalidInputError, OrthooptError

LIMIT_ENV = "ORTHOOPT_MEMORY_LIMIT"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_NO_LIMIT = 1 << 60  # cgroup v1 writes a huge number for "no limit"


class MemoryBudgetError(OrthooptError, ValueError):
    """The estimated peak memory of a run exceeds the available memory (see :func:`check_fits`)."""


def parse_size(text: str, name: str = LIMIT_ENV) -> int:
    """Bytes from ``"8G"``, ``"512M"``, ``"1.5G"`` or ``"123456"`` (binary units); ValueError (naming
    the setting ``name``) otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.I)
    if not m:
        raise InvalidInputError(f"{name} must be a size such as 8G, 512M or a number of bytes, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_free(root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Free bytes under this process's cgroup memory limit (v2 or v1), None without a limit."""
    paths = []
    try:
        for line in self_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            rel = path.lstrip("/")
            if controllers == "":  # v2
                paths += [(root / rel / "memory.max", root / rel / "memory.current")]
            elif "memory" in controllers.split(","):  # v1
                paths += [(root / "memory" / rel / "memory.limit_in_bytes", root / "memory" / rel / "memory.usage_in_bytes")]
    except (OSError, ValueError):
        pass
    paths += [(root / "memory.max", root / "memory.current"),
              (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes")]
    for limit_file, usage_file in paths:
        limit = _read_int(limit_file)  # "max" (v2, no limit) reads as None
        if limit is None or limit >= _NO_LIMIT:
            continue
        usage = _read_int(usage_file) or 0
        return max(0, limit - usage)
    return None


def available_memory() -> tuple[int | None, str]:
    """``(bytes, where the figure comes from)``: the smallest of the sources in the module doc (None,
    ``"unknown"`` when none can be read)."""
    found: list[tuple[int, str]] = []
    if os.environ.get(LIMIT_ENV, "").strip():
        found.append((parse_size(os.environ[LIMIT_ENV]), f"{LIMIT_ENV}={os.environ[LIMIT_ENV].strip()}"))
    mem = _meminfo_available()
    if mem is not None:
        found.append((mem, "MemAvailable in /proc/meminfo"))
    cg = _cgroup_free()
    if cg is not None:
        found.append((cg, "the cgroup memory limit"))
    if not found:
        return None, "unknown"
    return min(found)


def memory_status(status: Path = Path("/proc/self/status")) -> dict[str, int]:
    """The memory lines of ``/proc/self/status`` in bytes: ``{"VmHWM": ..., "VmRSS": ..., "RssAnon": ...,
    "RssFile": ...}`` (every ``kB`` line it has); empty where the file is missing (not Linux)."""
    out: dict[str, int] = {}
    try:
        text = status.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields = value.split()
        if len(fields) == 2 and fields[1] == "kB":
            out[key] = int(fields[0]) * 1024
    return out


def peak_rss_bytes(status: Path = Path("/proc/self/status")) -> int | None:
    """This process's peak resident set size in bytes: ``VmHWM`` of ``/proc/self/status``.

    Where that is missing, ``getrusage(RUSAGE_SELF).ru_maxrss``; None where neither exists. Linux
    carries ``ru_maxrss`` across ``execve``, so a command started by a large process would report at
    least its parent's peak: ``VmHWM`` is the process's own.
    """
    peak = memory_status(status).get("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


@dataclass
class Estimate:
    """An estimated peak resident memory: ``total`` bytes, the ``parts`` it is the sum of, and what
    the run holds (``what``, for the message)."""

    parts: dict[str, int]
    what: str
    alternatives: list[tuple[str, int]] = field(default_factory=list)
    """``(flags to pass instead, their estimated peak)``, shown when this one does not fit."""

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def describe(self) -> str:
        return ", ".join(f"{k} {gib(v)}" for k, v in self.parts.items() if v >= 1 << 26)


def check_fits(estimate: Estimate | None, command: str, force: bool = False) -> tuple[int | None, int | None]:
    """Raise :class:`MemoryBudgetError` when ``estimate.total`` exceeds :func:`available_memory` and not
    ``force``; the message names both figures, the parts, and the alternatives that fit (or says that
    none of them does). Returns ``(estimate bytes, available bytes)`` (None where unknown)."""
    if estimate is None:
        return None, None
    available, source = available_memory()
    total = estimate.total
    if force or available is None or total <= available:
        return total, available
    fitting = [(flags, b) for flags, b in estimate.alternatives if b <= available]
    if fitting:
        instead = "pass " + " or ".join(f"{flags} (estimated {gib(b)})" for flags, b in fitting)
    elif estimate.alternatives:
        instead = ("nothing smaller fits either (" + "; ".join(f"{flags}: {gib(b)}" for flags, b in estimate.alternatives)
                   + "); free memory or use a larger machine")
    else:
        instead = "free memory or use a larger machine"
    raise MemoryBudgetError(
        f"estimated peak memory {gib(total)} exceeds the available {gib(available)} ({source}): {command} "
        f"{estimate.what} ({estimate.describe()}); {instead}, or --force to run anyway")


__all__ = ["Estimate", "LIMIT_ENV", "MemoryBudgetError", "available_memory", "check_fits", "parse_size"]
