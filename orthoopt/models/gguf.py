"""GGUF checkpoints (llama.cpp's format) as plain float models, and their conversion to a portable folder.

Transformers reads a GGUF file directly (``from_pretrained(folder, gguf_file=name)``, which needs the
``gguf`` package) and dequantizes every tensor to float32. The model it returns still carries the
GGUF ``quantization_config`` (and an ``hf_quantizer``), which would make ``save_pretrained`` write a
config that asks for the GGUF file again; :func:`load_gguf_model` removes both, so the model is an
ordinary float model that saves as a plain safetensors checkpoint.

:func:`convert_gguf` writes such a checkpoint (config, ``model.safetensors``, tokenizer) with two
portability edits to what transformers 5 writes:

* ``config.json`` also gets a plain ``rope_theta`` (transformers 5 keeps it inside
  ``rope_parameters``; older readers look for the top-level key);
* ``tokenizer_config.json`` names ``PreTrainedTokenizerFast`` as the tokenizer class (transformers 5
  writes ``TokenizersBackend``, which older versions do not know; the files are the same).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from orthoopt.errors import InvalidInputError
from orthoopt.utils.atomic import atomic_dir

GGUF_SUFFIX = ".gguf"
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def gguf_file(path: str | os.PathLike) -> Path | None:
    """``path`` itself if it is a ``.gguf`` file, or the single ``.gguf`` inside folder ``path``; None
    when there is none. Raises ValueError when a folder holds several (pass one file)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == GGUF_SUFFIX else None
    if not path.is_dir():
        return None
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == GGUF_SUFFIX)
    if len(found) > 1:
        raise InvalidInputError(f"{path} holds several GGUF files: {[p.name for p in found]}; pass one file")
    return found[0] if found else None


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover - a dependency in pyproject.toml
        raise InvalidInputError("reading a .gguf file needs the 'gguf' package: pip install gguf") from e


def strip_gguf_quantization(model: PreTrainedModel) -> PreTrainedModel:
    """Make a model loaded from GGUF an ordinary float model: drop ``config.quantization_config``,
    ``hf_quantizer`` and ``is_quantized`` (the weights are already dequantized floats)."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model


def load_gguf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A float ``*ForCausalLM`` (eval mode, on CPU) from a ``.gguf`` file, dequantized to ``dtype``."""
    path = Path(path)
    _require_gguf_package()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return strip_gguf_quantization(model).eval()


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer stored inside a ``.gguf`` file (a fast tokenizer)."""
    path = Path(path)
    _require_gguf_package()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def make_portable(folder: str | os.PathLike) -> None:
    """Apply the two portability edits (module docstring) to a saved checkpoint folder in place."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file() and (folder / "tokenizer.json").is_file():
        tok = json.loads(tok_path.read_text(encoding="utf-8"))
        tok["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
        tok_path.write_text(json.dumps(tok, indent=2) + "\n", encoding="utf-8")


def save_portable(model: PreTrainedModel, tokenizer, folder: str | os.PathLike) -> None:
    """``save_pretrained`` the model (safetensors) and tokenizer into an existing folder, then
    :func:`make_portable`."""
    folder = Path(folder)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    make_portable(folder)


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a ``.gguf`` file into a float Hugging Face folder ``out_dir`` (written atomically):
    ``config.json`` + ``model.safetensors`` + the tokenizer, with the portability edits."""
    model = load_gguf_model(path, dtype)
    tokenizer = load_gguf_tokenizer(path)
    with atomic_dir(out_dir) as tmp:
        save_portable(model, tokenizer, tmp)
    return Path(out_dir)
