"""Disk a command may fill, and refusing a run whose output would not fit before it starts.

A command writes its output into a temporary sibling of ``--out`` and renames it into place
(:mod:`orthoopt.utils.paths`), so a full disk never leaves a half-written output, but it can cost
hours: a streamed OptRot+ of an 8B model writes its Hessian-weighted blocks (twice the bf16
checkpoint) before the solver's first step. :func:`check_disk` compares an estimated number of bytes
(:mod:`orthoopt.models.footprint`) with the free space of the file system that will hold ``--out``
(``shutil.disk_usage`` of its nearest existing folder), or with ``ORTHOOPT_DISK_LIMIT`` (bytes, or
``512M``, ``8G``: a budget below what the disk has, for a shared disk or a test), and raises
:class:`DiskSpaceError` (a ``ValueError``: the command line exits 2 with one line) naming both figures
and their parts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from orthoopt.errors import OrthooptError
from orthoopt.utils.memory import gib, parse_size
from orthoopt.utils.paths import check_parent_writable

DISK_LIMIT_ENV = "ORTHOOPT_DISK_LIMIT"


class DiskSpaceError(OrthooptError, ValueError):
    """The estimated bytes a run writes exceed the free space where it writes them (:func:`check_disk`)."""


def free_disk(path: str | os.PathLike) -> tuple[int, str]:
    """``(free bytes, where the figure comes from)`` for a file or folder to be created at ``path``:
    the smaller of the free space of its nearest existing folder's file system and ``ORTHOOPT_DISK_LIMIT``."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    found = [(shutil.disk_usage(folder).free, f"free space of {folder}")]
    limit = os.environ.get(DISK_LIMIT_ENV, "").strip()
    if limit:
        found.append((parse_size(limit, DISK_LIMIT_ENV), f"{DISK_LIMIT_ENV}={limit}"))
    return min(found)


def check_disk(parts: dict[str, int], out: str | os.PathLike, command: str, force: bool = False) -> int:
    """Raise :class:`DiskSpaceError` when the sum of ``parts`` (named byte counts) exceeds
    :func:`free_disk` of ``out``, unless ``force`` (or raise the ValueError of
    :func:`~orthoopt.utils.paths.check_parent_writable` when the folder cannot be written at all);
    returns the free bytes."""
    free, source = free_disk(out)
    total = int(sum(parts.values()))
    if force or total <= free:
        return free
    check_parent_writable(out)  # a folder that cannot be written at all is named as such, not as full
    detail = ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if v)
    raise DiskSpaceError(f"{command} would write about {gib(total)} ({detail}) but only {gib(free)} is free "
                         f"({source}): free space, pass an --out on a larger disk, or --force to run anyway")


__all__ = ["DISK_LIMIT_ENV", "DiskSpaceError", "check_disk", "free_disk"]
