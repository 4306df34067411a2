"""The dtype a model is loaded in: its checkpoint's own unless the caller says otherwise.

``--dtype auto`` (the default of ``rotate``, ``quantize`` and ``eval``) loads a Hugging Face folder in
the floating dtype that holds most of its weight bytes (read from the safetensors headers, no data),
so a bfloat16 or float16 checkpoint stays bfloat16 / float16 in memory and on disk; an explicit
``--dtype`` overrides it. Sources without a stored dtype (``.gguf`` files, which are dequantized,
llama2.c files, ``planted``, Hub ids not in a local folder) load in float32 under ``auto``. The
numerics that need more precision run per tensor in float32 / float64 and are cast back
(``docs/conventions.md``, "Precision").
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from orthoopt.errors import InvalidInputError

MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}
"""The dtypes a model may be loaded in, by name."""

DTYPE_CHOICES = ("auto", *MODEL_DTYPES)
"""``--dtype`` values: ``auto`` (the checkpoint's) or a :data:`MODEL_DTYPES` name."""

_SAFETENSORS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def folder_dtype_bytes(folder: str | os.PathLike) -> dict[torch.dtype, int]:
    """``{floating dtype: bytes}`` of the weights in a folder's safetensors files (headers only)."""
    from orthoopt.utils.tensorfile import check_safetensors, check_weight_files

    out: dict[torch.dtype, int] = {}
    for f in check_weight_files(Path(folder)):
        for name, entry in check_safetensors(f).items():
            if name == "__metadata__" or entry.get("dtype") not in _SAFETENSORS:
                continue
            begin, end = entry["data_offsets"]
            dt = _SAFETENSORS[entry["dtype"]]
            out[dt] = out.get(dt, 0) + (end - begin)
    return out


def checkpoint_dtype(folder: str | os.PathLike) -> torch.dtype:
    """The floating dtype holding most weight bytes of a Hugging Face folder (float32 when it has no
    floating safetensors weights)."""
    sizes = folder_dtype_bytes(folder)
    return max(sizes, key=lambda dt: (sizes[dt], dt.itemsize)) if sizes else torch.float32


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a :data:`DTYPE_CHOICES` name or a torch dtype; None for ``"auto"`` / None.
    ValueError naming the choices otherwise."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in MODEL_DTYPES.values():
            raise InvalidInputError(f"model dtype must be one of {', '.join(MODEL_DTYPES)}, got {dtype}")
        return dtype
    if dtype not in MODEL_DTYPES:
        raise InvalidInputError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    return MODEL_DTYPES[dtype]


def resolve_model_dtype(source, dtype: str | torch.dtype | None = "auto") -> torch.dtype:
    """The dtype to load ``source`` (a :class:`~orthoopt.models.sources.ModelSource`) in: ``dtype``
    when given, else (``"auto"``) the checkpoint's (:func:`checkpoint_dtype`) for a Hugging Face
    folder and float32 for the other kinds (module doc)."""
    explicit = parse_dtype(dtype)
    if explicit is not None:
        return explicit
    folder = getattr(source, "folder", None)
    return checkpoint_dtype(folder) if folder is not None else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``."""
    return str(dtype).removeprefix("torch.")


__all__ = ["DTYPE_CHOICES", "MODEL_DTYPES", "checkpoint_dtype", "dtype_name", "folder_dtype_bytes", "parse_dtype",
           "resolve_model_dtype"]
