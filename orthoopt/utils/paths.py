"""Output paths checked before any work: an output may not destroy an input, and must be writable.

Every command calls :func:`prepare_output` for each path it writes (its ``--out`` folder, a side file)
with every path it reads, before it loads or computes anything::

    prepare_output(args.out, {"MODEL_DIR": args.model_dir, "--calib": args.calib}, marker="report.json")

It raises ValueError (the CLI's exit 2) when

* the output is an input, lies inside an input folder, or contains an input (replacing the output
  folder would delete it). Paths are compared after resolving symbolic links, and also by inode
  (``os.path.samefile``: bind mounts, hard links); an input folder's symlinked entries count as
  inputs where they point (a Hugging Face cache snapshot links its files into ``blobs/``);
* the output cannot be written: a parent is a file, the nearest existing parent folder refuses a
  new entry (read-only folder or file system; probed by creating and removing a folder there), or a
  folder output exists as a file (or a file output as a folder);
* ``marker`` is given and the output is an existing, non-empty folder without that file (so not a
  previous output of the same command: replacing it would delete someone else's files).

and then removes the output's stale temporaries (:func:`orthoopt.utils.atomic.remove_stale`).

:func:`output_lock` makes the commands that write ``--out`` exclusive per output on this host: a second
``orthoopt`` process writing the same output while the first runs exits 2 instead of racing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Iterator

from orthoopt.errors import InvalidInputError
from orthoopt.utils.atomic import remove_stale

PathLike = str | os.PathLike
Inputs = Mapping[str, PathLike | Iterable[PathLike] | None]


def resolve(path: PathLike) -> Path:
    """``path`` absolute, ``~`` expanded, symbolic links resolved (missing tails kept as given)."""
    return Path(os.path.expanduser(os.fspath(path))).resolve()


def input_paths(path: PathLike) -> list[Path]:
    """The resolved ``path`` and, for a folder, the resolved targets of its symlinked entries."""
    p = resolve(path)
    out = [p]
    raw = Path(os.path.expanduser(os.fspath(path)))
    if raw.is_dir():
        try:
            entries = list(raw.iterdir())
        except OSError:
            entries = []
        for e in entries:
            if e.is_symlink():
                t = e.resolve()
                if t not in out:
                    out.append(t)
    return out


def _samefile(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _existing_chain(p: Path) -> list[Path]:
    """``p`` and its ancestors that exist."""
    return [q for q in (p, *p.parents) if q.exists()]


def overlap(out: PathLike, inp: PathLike) -> str | None:
    """How output ``out`` would harm input ``inp``: ``"is"``, ``"contains"``, ``"is inside"``, or None."""
    o, i = resolve(out), resolve(inp)
    if o == i or (o.exists() and _samefile(o, i)):
        return "is"
    if o in i.parents or (o.exists() and any(_samefile(o, a) for a in _existing_chain(i)[1:])):
        return "contains"
    if i in o.parents or (i.exists() and any(_samefile(i, a) for a in _existing_chain(o)[1:])):
        return "is inside"
    return None


def _flatten(inputs: Inputs) -> list[tuple[str, PathLike]]:
    out = []
    for label, value in inputs.items():
        if value is None:
            continue
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        out.extend((label, v) for v in values if v is not None)
    return out


def check_not_input(out: PathLike, inputs: Inputs, what: str = "--out") -> None:
    """Raise ValueError if output ``out`` is, contains or lies inside any of ``inputs``
    (``{label: path or paths or None}``, e.g. ``{"MODEL_DIR": ..., "--calib": ...}``)."""
    for label, path in _flatten(inputs):
        for target in input_paths(path):
            how = overlap(out, target)
            if how is None:
                continue
            shown = str(path) if target == resolve(path) else f"{path} (its file {target})"
            consequence = {
                "is": "writing it would replace the input",
                "contains": "replacing it would delete the input",
                "is inside": "writing it would change the input folder",
            }[how]
            fix = f"choose another {what}" if what.startswith("--") else "choose another output path"
            raise InvalidInputError(f"{what} {out} {how} the input {label} {shown}: {consequence}; {fix}")


def check_writable(out: PathLike, kind: str = "folder", what: str = "--out", marker: str | None = None) -> None:
    """Raise ValueError unless ``out`` (a ``"folder"`` or a ``"file"``) can be written by renaming a
    temporary sibling into place; see the module doc for ``marker``."""
    if kind not in ("folder", "file"):
        raise InvalidInputError(f"kind must be 'folder' or 'file', got {kind!r}")
    p = Path(os.path.expanduser(os.fspath(out))).absolute()
    if p.exists():
        if kind == "folder" and not p.is_dir():
            raise InvalidInputError(f"{what} {out} exists and is not a folder")
        if kind == "file" and p.is_dir():
            raise InvalidInputError(f"{what} {out} exists and is a folder, not a file")
        if kind == "folder" and marker is not None and any(p.iterdir()) and not (p / marker).is_file():
            raise InvalidInputError(f"{what} {out} exists, is not empty and holds no {marker} (it is not a previous "
                             f"output of this command, and writing would delete its files); choose another {what}")
    parent = _nearest_existing(p.parent)
    if not parent.is_dir():
        raise InvalidInputError(f"cannot write {what} {out}: {parent} is {'a file' if parent.exists() else 'missing'}, "
                         "not a folder")
    check_parent_writable(out, what)


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and not folder.is_symlink():
        if folder == folder.parent:
            break
        folder = folder.parent
    return folder


def check_parent_writable(out: PathLike, what: str = "--out") -> None:
    """Raise ValueError when the nearest existing parent folder of ``out`` cannot hold a new entry
    (a temporary folder is tried, then removed: root passes ``os.access`` on read-only file systems);
    a parent that is not a folder is left to :func:`check_writable`."""
    parent = _nearest_existing(Path(os.path.expanduser(os.fspath(out))).absolute().parent)
    if not parent.is_dir():
        return
    try:
        probe = tempfile.mkdtemp(prefix=".orthoopt-write-test.", dir=parent)
    except OSError as e:
        raise InvalidInputError(f"cannot write {what} {out}: the folder {parent} is not writable ({e.strerror})") from None
    os.rmdir(probe)


def prepare_output(out: PathLike, inputs: Inputs, kind: str = "folder", what: str = "--out",
                   marker: str | None = None) -> Path:
    """Check output ``out`` against ``inputs`` and for writability (module doc), then remove its stale
    temporaries. Call before any work. Returns ``Path(out)``."""
    check_not_input(out, inputs, what)
    check_writable(out, kind, what, marker)
    remove_stale(Path(os.path.expanduser(os.fspath(out))).absolute())
    return Path(out)


def _lock_folder() -> Path:
    folder = Path(tempfile.gettempdir()) / f"orthoopt-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.is_symlink() or folder.stat().st_uid != os.getuid():
        raise InvalidInputError(f"the lock folder {folder} is not this user's own folder; remove it")
    return folder


@contextlib.contextmanager
def output_lock(out: PathLike, what: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on output ``out`` (after resolving symbolic links) for the ``with`` block,
    or raise ValueError at once when another process holds it. The lock is an ``flock`` on a file named
    by a hash of the path in ``$TMPDIR/orthoopt-locks-UID/`` (not beside the output: nothing is left
    there), removed on release; the kernel drops it when the holder dies (``kill -9`` included), which
    leaves the small unlocked file for the next writer of that output to take and remove.
    Processes of one host only (``flock`` is not shared over every network file system)."""
    import fcntl

    key = hashlib.sha256(str(resolve(out)).encode()).hexdigest()[:32]
    path = _lock_folder() / f"{key}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 100, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise InvalidInputError(f"{what} {out} is being written by another orthoopt process ({holder}); wait for it "
                             f"to finish or choose another {what}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the previous holder removed it between our open and flock
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


__all__ = ["check_not_input", "check_parent_writable", "check_writable", "input_paths", "output_lock", "overlap", "prepare_output", "resolve"]
