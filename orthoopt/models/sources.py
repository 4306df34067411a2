"""Where a model comes from: what ``load_model`` and every command accept as MODEL.

``resolve_source(spec)`` decides, in this order:

==================  ===================================================================================
kind                ``spec`` is...
==================  ===================================================================================
``folder``          an existing folder with ``config.json`` (a Hugging Face checkpoint)
``gguf``            an existing ``.gguf`` file, or a folder without ``config.json`` holding exactly one
``llama2c``         an existing llama2.c ``.bin`` file, or a folder without ``config.json`` holding one
``planted``         the name ``planted``: the planted-outlier toy Llama (:data:`PLANTED_CONFIG`)
``registry``        a registered name (``orthoopt fetch --list``, e.g. ``smollm2-135m``): its verified
                    cache folder (:mod:`orthoopt.models.registry`), fetched on first use
``hub``             anything else shaped like a Hub id (``name`` or ``owner/name``): the Hugging Face
                    cache first (``local_files_only``), then the Hub; when the Hub is unreachable or
                    ``HF_HUB_OFFLINE`` is set this fails at once with FileNotFoundError saying so
==================  ===================================================================================

Existing local paths always win over names. A spec that looks like a path (absolute, ``./``, ``~``,
more than one ``/``, a file suffix) but does not exist raises FileNotFoundError.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from orthoopt.errors import InvalidInputError

PLANTED = "planted"
PLANTED_CONFIG = {"arch": "llama", "hidden_size": 512, "num_layers": 8, "seed": 0}
"""The planted-outlier Llama that ``planted`` names (:func:`orthoopt.adapters.planted_outlier_model`)."""

HUB_PROBE_TIMEOUT = 5.0
"""Seconds the Hub reachability check may take before the Hub counts as unreachable."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class ModelSource:
    """A resolved MODEL argument.

    kind: ``folder | gguf | llama2c | planted | registry | hub`` (module docstring).
    spec: what the caller passed.
    path: the local file or folder to read (the cache folder for ``registry``; None for ``planted``
          and ``hub``).
    """

    kind: str
    spec: str
    path: Path | None = None

    @property
    def folder(self) -> Path | None:
        """The Hugging Face folder to read (``folder`` and ``registry`` kinds), else None."""
        return self.path if self.kind in ("folder", "registry") else None

    def describe(self) -> str:
        return self.spec if self.path is None or str(self.path) == self.spec else f"{self.spec} ({self.path})"


def _looks_like_path(spec: str) -> bool:
    return (os.path.isabs(spec) or spec.startswith((".", "~")) or "\\" in spec or spec.count("/") > 1
            or Path(spec).suffix.lower() in (".gguf", ".bin", ".safetensors", ".json") or not _HUB_ID.match(spec))


def local_source(path: Path, spec: str | None = None) -> ModelSource:
    """The kind of an existing local ``path``; FileNotFoundError when it holds no model."""
    from orthoopt.models.gguf import gguf_file
    from orthoopt.models.llama2c import llama2c_file

    spec = str(path) if spec is None else spec
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource("folder", spec, path)
    g = gguf_file(path)
    if g is not None:
        return ModelSource("gguf", spec, g)
    b = llama2c_file(path)
    if b is not None:
        return ModelSource("llama2c", spec, b)
    raise FileNotFoundError(f"{path}: no config.json (Hugging Face folder), no .gguf file and no llama2.c "
                            f".bin checkpoint")


def _known_names() -> str:
    from orthoopt.models.registry import REGISTRY

    return ", ".join([*REGISTRY, PLANTED])


def resolve_source(spec: str | os.PathLike, fetch: bool = True, progress: bool = True) -> ModelSource:
    """Resolve a MODEL argument (module docstring). ``fetch=False`` raises FileNotFoundError for a
    registered name that is not cached instead of fetching it; Hub ids are not contacted here."""
    from orthoopt.models import registry

    spec = os.fspath(spec)
    if not spec:
        raise InvalidInputError("empty model name")
    path = Path(spec).expanduser()
    if path.exists():
        return local_source(path, spec)
    if spec == PLANTED:
        return ModelSource("planted", spec)
    if spec in registry.REGISTRY:
        if fetch:
            return ModelSource("registry", spec, registry.ensure_model(spec, progress=progress))
        cached = registry.cached_model(spec)
        if cached is None:
            raise FileNotFoundError(f"{spec} is not fetched yet: run `orthoopt fetch {spec}`")
        return ModelSource("registry", spec, cached)
    if _looks_like_path(spec):
        raise FileNotFoundError(f"model not found: {spec} (no such file or folder; registered names: "
                                f"{_known_names()})")
    return ModelSource("hub", spec)


def input_location(spec: str | os.PathLike | None) -> Path | None:
    """Where model source ``spec`` lives on disk, without fetching or contacting anything: the path
    itself when it exists, a registered name's cache folder (:func:`orthoopt.models.registry.entry_path`,
    fetched or not), else None (``planted``, Hub ids). For the output-path checks of the commands."""
    from orthoopt.models import registry

    if spec is None:
        return None
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec in registry.REGISTRY:
        return registry.entry_path(spec)
    return None


def hub_offline_reason(repo_id: str) -> str | None:
    """Why the Hub cannot serve ``repo_id`` now (offline variable set, or no answer within
    :data:`HUB_PROBE_TIMEOUT` seconds), or None when it answered. FileNotFoundError when the Hub
    answers that there is no such model."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var} is set"
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        huggingface_hub.model_info(repo_id, timeout=HUB_PROBE_TIMEOUT)
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"model not found: {repo_id} is neither a local path, a registered name "
                                f"({_known_names()}) nor a model on the Hugging Face Hub") from None
    except Exception as e:  # connection refused, DNS failure, timeout, proxy error ...
        return f"the Hugging Face Hub is unreachable ({type(e).__name__}: {e})"
    return None


def offline_message(repo_id: str, reason: str) -> str:
    return (f"model {repo_id!r} is not a local path or a registered name, so it would come from the Hugging "
            f"Face Hub, but {reason} and it is not in the local Hugging Face cache. Pass a local model folder "
            f"(config.json + weights), a .gguf file, or a registered name ({_known_names()}; "
            f"`orthoopt fetch --list`).")


def load_hub(repo_id: str, loader, **kw):
    """``loader(repo_id, local_files_only=True, **kw)`` (the local Hugging Face cache), else, when the
    Hub answers, ``loader(repo_id, **kw)``; FileNotFoundError at once when it is unreachable."""
    try:
        return loader(repo_id, local_files_only=True, **kw)
    except (OSError, ValueError):
        pass
    reason = hub_offline_reason(repo_id)
    if reason is not None:
        raise FileNotFoundError(offline_message(repo_id, reason))
    return loader(repo_id, **kw)
