"""The commands' memory check: the estimated peak (:mod:`orthoopt.models.footprint`) against the
available memory (:mod:`orthoopt.utils.memory`), before the model is loaded; ``--force`` skips it."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from orthoopt.utils.memory import LIMIT_ENV, Estimate, check_fits


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="run even when the estimated peak memory exceeds the available memory (MemAvailable, the "
                        f"cgroup limit or {LIMIT_ENV}; docs/performance.md)")


def check_memory(command: str, source, estimate: Callable[..., Estimate], force: bool) -> None:
    """Raise :class:`~orthoopt.utils.memory.MemoryBudgetError` (exit 2) when ``estimate(checkpoint)``
    for the Hugging Face folder of ``source`` (a :class:`~orthoopt.models.sources.ModelSource`)
    does not fit; other sources are not checked."""
    if force or getattr(source, "folder", None) is None:
        return
    from orthoopt.models.footprint import Checkpoint

    check_fits(estimate(Checkpoint.read(source.folder)), command, force)
