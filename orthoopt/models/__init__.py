"""Models in and out: every model source (a Hugging Face folder, a ``.gguf`` file, a llama2.c file, a
registered name fetched into the verified cache, ``planted``, a Hub id), loading, and saving rotated
checkpoints and their rotations atomically.

:mod:`orthoopt.models.sources` resolves what a MODEL argument names; :mod:`orthoopt.models.io` loads
and saves; :mod:`orthoopt.models.registry` holds the named, md5-verified downloads
(``orthoopt fetch``); :mod:`orthoopt.models.gguf` and :mod:`orthoopt.models.llama2c` read and write
those formats; :mod:`orthoopt.models.onload` reads a folder one decoder layer at a time
(:class:`LayeredModel`), :mod:`orthoopt.models.safetensors_folder` tensor by tensor, and
:mod:`orthoopt.models.shards` writes sharded checkpoints. See ``README.md`` ("Models") and ``docs/adapters.md``.
"""

from orthoopt.models.io import load_model, load_rotations, load_tokenizer, save_rotated
from orthoopt.models.llama2c import read_llama2c, write_llama2c
from orthoopt.models.onload import LayeredModel
from orthoopt.models.registry import REGISTRY, ModelFetchError, cached_model, fetch_model
from orthoopt.models.sources import ModelSource, resolve_source

__all__ = [
    "LayeredModel", "REGISTRY", "ModelFetchError", "ModelSource", "cached_model", "fetch_model", "load_model", "load_rotations",
    "load_tokenizer", "read_llama2c", "resolve_source", "save_rotated", "write_llama2c",
]
