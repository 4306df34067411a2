"""The commands' memory and disk check: the estimated peak (:mod:`orthoopt.models.footprint`) against
the available memory (:mod:`orthoopt.utils.memory`), and the bytes the output needs against the free
space where it goes (:mod:`orthoopt.utils.disk`), before the model is loaded; ``--force`` skips both."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from orthoopt.utils.disk import DISK_LIMIT_ENV, check_disk
from orthoopt.utils.memory import LIMIT_ENV, Estimate, check_fits


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="run even when the estimated peak memory exceeds the available memory (MemAvailable, the "
                        f"cgroup limit or {LIMIT_ENV}) or the output the free disk space of --out ({DISK_LIMIT_ENV}; "
                        "docs/performance.md)")


def check_memory(command: str, source, estimate: Callable[..., Estimate], force: bool,
                 disk: Callable[..., dict[str, int]] | None = None, out=None) -> None:
    """Raise :class:`~orthoopt.utils.memory.MemoryBudgetError` (exit 2) when ``estimate(checkpoint)``
    for the Hugging Face folder of ``source`` (a :class:`~orthoopt.models.sources.ModelSource`)
    does not fit, and :class:`~orthoopt.utils.disk.DiskSpaceError` when the bytes ``disk(checkpoint)``
    (named parts) exceed the free space where ``out`` is written; other sources are not checked."""
    if force or getattr(source, "folder", None) is None:
        return
    from orthoopt.models.footprint import Checkpoint

    ck = Checkpoint.read(source.folder)
    check_fits(estimate(ck), command, force)
    if disk is not None and out is not None:
        check_disk(disk(ck), out, command, force)
