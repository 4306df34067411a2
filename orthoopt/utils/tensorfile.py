"""Reading ``.safetensors`` files with clear errors: the one place orthoopt opens them for reading.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``) and the
tensor data. :func:`check_safetensors` validates that layout from the header alone (a truncated
file, a damaged header, offsets past the end) and raises ValueError naming the file and the fault;
:func:`read_safetensors` checks, then loads, turning any remaining ``safetensors`` error into a
ValueError as well. Missing files raise FileNotFoundError. The CLI turns both into exit 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from orthoopt.errors import InvalidInputError

HEADER_LIMIT = 100 * 1024 * 1024
"""Largest header accepted (the ``safetensors`` library's own limit)."""

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}


def _damaged(path: Path, what: str, problem: str) -> InvalidInputError:
    return InvalidInputError(f"{what} {path} is damaged: {problem} (re-download or re-create it)")


def check_safetensors(path: str | os.PathLike, what: str = "safetensors file") -> dict:
    """The parsed header of ``path`` after checking the file's layout (module doc); ``what`` names
    the file's role in messages (``"model weights"``, ``"rotations"``, ``"resume file"``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(path, what, f"only {size} bytes, too short for a safetensors header (truncated or empty)")
        n = int.from_bytes(head, "little")
        if n > HEADER_LIMIT or n > size - 8:
            raise _damaged(path, what, f"its header claims {n} bytes but the file has {size - 8} after the length "
                                       "field (truncated, or not a safetensors file)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, what, f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _damaged(path, what, "its header is not a JSON object")
    data = size - 8 - n
    end_max = 0
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise _damaged(path, what, "its __metadata__ is not a map of strings")
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise _damaged(path, what, f"the header entry of tensor {name!r} is malformed: {entry!r:.200}")
        if dtype in DTYPE_BYTES:
            numel = 1
            for s in shape:
                numel *= s
            if numel * DTYPE_BYTES[dtype] != end - begin:
                raise _damaged(path, what, f"tensor {name!r} ({dtype} {shape}) needs {numel * DTYPE_BYTES[dtype]} "
                                           f"bytes but its offsets span {end - begin}")
        end_max = max(end_max, end)
    if end_max > data:
        raise _damaged(path, what, f"truncated: its tensors need {end_max} bytes of data, the file holds {data}")
    return header


def read_safetensors(path: str | os.PathLike, what: str = "safetensors file", device: str = "cpu",
                     finite: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` (``safetensors.torch.load_file``) after :func:`check_safetensors`;
    ``finite``: raise ValueError naming the tensor if a floating one holds NaN or inf."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from orthoopt.core.checks import check_finite_tensor

    check_safetensors(path, what)
    try:
        tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise _damaged(Path(path), what, str(e)) from None
    if finite:
        for name, t in tensors.items():
            check_finite_tensor(t, f"{what} {path}: tensor {name!r}")
    return tensors


def check_weight_files(folder: str | os.PathLike) -> list[Path]:
    """Check every ``*.safetensors`` file directly inside ``folder``; returns them."""
    files = sorted(Path(folder).glob("*.safetensors"))
    for f in files:
        check_safetensors(f, "weight file" if f.name.startswith("model") else "safetensors file")
    return files


__all__ = ["check_safetensors", "check_weight_files", "read_safetensors"]


def read_json_object(path: str | os.PathLike) -> dict:
    """A checkpoint's JSON side file (``config.json``, the weight index) as a dict.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        Naming the file, when it is not valid UTF-8 JSON or not a JSON object.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"{path} is damaged: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{path} is damaged: not a JSON object")
    return value
