"""A Hugging Face model folder read tensor by tensor from its safetensors files.

Files are memory-mapped with ``safetensors.safe_open`` and closed after each read, so the pages of a
tensor stay resident only while the returned tensor is alive: reading a model layer by layer keeps
the resident memory at about one layer (an open ``safe_open`` handle would keep every page it touched
resident, ``docs/performance.md``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from orthoopt.core.checks import check_finite_tensor
from orthoopt.errors import InvalidInputError
from orthoopt.utils.tensorfile import check_safetensors, read_json_object

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsCheckpoint:
    """The tensors of a model folder (``config.json`` plus ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``), read on demand.

    ``config`` is ``config.json`` as a dict; :meth:`keys`, :meth:`shape` and :meth:`dtype` come from the
    file headers without reading data. Raises FileNotFoundError for a missing folder, config or weight
    file, and ValueError for a folder whose weights are not safetensors.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"model folder not found: {self.path}")
        config = self.path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{self.path} has no config.json (streamed mode reads Hugging Face folders)")
        self.config: dict = read_json_object(config)
        self.files: dict[str, Path] = {}  # tensor name -> file
        if (self.path / INDEX_FILE).is_file():
            weight_map = read_json_object(self.path / INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise InvalidInputError(f"{self.path / INDEX_FILE} has no weight_map")
            self.files = {name: self.path / file for name, file in weight_map.items()}
        elif (self.path / SINGLE_FILE).is_file():
            self.files = {}
        else:
            others = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt*"))
            raise InvalidInputError(
                f"{self.path} has no {SINGLE_FILE} or {INDEX_FILE}"
                + (f" (found {others}; streamed mode reads safetensors only: re-save the model with "
                   "save_pretrained(..., safe_serialization=True))" if others else "")
            )
        self._meta: dict[str, tuple[str, list[int]]] = {}
        for file in sorted(set(self.files.values())) or [self.path / SINGLE_FILE]:
            if not file.is_file():
                raise FileNotFoundError(f"weight file {file} named by {INDEX_FILE} is missing")
            check_safetensors(file, "weight file")
            with safe_open(str(file), framework="pt") as f:
                names = f.keys()
                for name in names:
                    sl = f.get_slice(name)
                    self._meta[name] = (sl.get_dtype(), list(sl.get_shape()))
                    self.files.setdefault(name, file)
        missing = [n for n in self.files if n not in self._meta]
        if missing:
            raise InvalidInputError(f"{INDEX_FILE} names tensors its files lack: {missing[:5]}")

    def keys(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def __iter__(self):
        return iter(self.keys())

    def _check(self, name: str) -> None:
        if name not in self._meta:
            raise InvalidInputError(f"tensor {name!r} is not in the checkpoint {self.path}")

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return tuple(self._meta[name][1])

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor ``name``."""
        self._check(name)
        return _DTYPES.get(self._meta[name][0], torch.uint8)

    def numel(self, name: str) -> int:
        out = 1
        for s in self.shape(name):
            out *= s
        return out

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` with floating tensors cast to ``dtype`` (None: as stored). Each file is
        opened once and closed before returning. Do not modify the tensors in place: those already in
        ``dtype`` view the memory-mapped file."""
        names = list(names)
        for n in names:
            self._check(n)
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for file, group in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for n in group:
                    t = f.get_tensor(n)
                    check_finite_tensor(t, f"{file}: tensor {n!r}")
                    out[n] = _cast(t, dtype)
        return {n: out[n] for n in names}

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of 2-D tensor ``name`` (only those bytes are read)."""
        shape = self.shape(name)
        if len(shape) != 2 or not 0 <= start <= stop <= shape[0]:
            raise InvalidInputError(f"rows {start}:{stop} of {name!r} with shape {shape}")
        with safe_open(str(self.files[name]), framework="pt") as f:
            t = f.get_slice(name)[start:stop]
        check_finite_tensor(t, f"{self.files[name]}: tensor {name!r} rows {start}:{stop}")
        return _cast(t, dtype)

    def nbytes(self) -> int:
        """Total size of the stored tensors in bytes."""
        return sum(self.numel(n) * torch.empty((), dtype=self.dtype(n)).element_size() for n in self._meta)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t
