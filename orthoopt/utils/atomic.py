"""Atomic output: write to a temporary sibling, then rename into place.

An interrupted run leaves either the previous output or nothing, never a half-written file or folder.

Temporaries are named ``.{name}.{pid}@{host}.{random}.tmp`` beside the output ``name`` (the folder being
replaced is parked as ``.{name}.{pid}@{host}.old.tmp`` for the instant between the two renames). A
process killed while saving (``kill -9``, power loss) cannot remove its temporary; the next write of
the same output (or :func:`remove_stale`, which every command calls before its work) removes the
temporaries whose owning process is gone: same host, pid no longer running. A parked ``.old.tmp`` folder
whose output is missing is put back instead (the kill fell between the two renames). Temporaries of a
live process, or of another host, are never touched.

Written files get the permissions a plain ``open`` would give (``0o666 & ~umask``), folders
``0o777 & ~umask``, whatever the writer used (``safetensors`` writes ``0600`` files).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prefix(path: Path) -> str:
    """``.{name}.{pid}@{host}.``: the start of every temporary this process makes for ``path``."""
    return f".{path.name}.{os.getpid()}@{_HOST}."


def _stale_pattern(path: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(path.name)}\.(\d+)@([A-Za-z0-9-]+)\.(\w+)\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:
        return False
    return True


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporaries of output ``path`` left by dead processes of this host (see the module doc)."""
    path = Path(path)
    pattern = _stale_pattern(path)
    try:
        entries = list(path.parent.iterdir())
    except OSError:  # no parent yet, or unreadable: nothing to clean
        return []
    found = []
    for p in entries:
        m = pattern.match(p.name)
        if m and m.group(2) == _HOST and not _pid_alive(int(m.group(1))):
            found.append(p)
    return sorted(found)


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the stale temporaries of output ``path`` (:func:`stale_temporaries`); a parked
    ``.old.tmp`` folder is renamed back to ``path`` when ``path`` is missing. Returns what was removed
    or restored."""
    path = Path(path)
    done = []
    for p in stale_temporaries(path):
        with contextlib.suppress(OSError):
            if p.name.endswith(".old.tmp") and not os.path.lexists(path):
                os.replace(p, path)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            done.append(p)
    return done


def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and everything under it, for a folder) ordinary permissions: files
    ``0o666 & ~umask``, folders ``0o777 & ~umask``. Symbolic links are left alone."""
    path = Path(path)
    mask = _umask()
    if path.is_symlink():
        return
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                if not os.path.islink(os.path.join(root, d)):
                    os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                if not os.path.islink(os.path.join(root, f)):
                    os.chmod(os.path.join(root, f), 0o666 & ~mask)
    elif path.exists():
        os.chmod(path, 0o666 & ~mask)


def _mkstemp(path: Path) -> str:
    """A temporary file beside ``path`` with the permissions a plain ``open`` would give."""
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success replace ``path`` with it.

    On an exception the temporary folder is removed and ``path`` is left untouched. Stale
    temporaries of ``path`` (dead processes) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the result is an ordinary folder
    try:
        yield tmp
        follow_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(path):
        old = path.with_name(f"{_prefix(path)}old.tmp")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file beside ``path`` for writing; rename it to ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = _mkstemp(path)
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_path(path: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary path beside ``path`` for a writer that takes a file name (e.g. safetensors)."""
    return _atomic_path(Path(path))


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = _mkstemp(path)
    try:
        yield Path(tmp)
        follow_umask(tmp)  # the writer may have replaced the file with a 0600 one
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
