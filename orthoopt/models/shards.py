"""Write a checkpoint as numbered safetensors shards plus ``model.safetensors.index.json``.

The layout ``from_pretrained`` reads: ``model-00001-of-0000N.safetensors`` ... and an index
``{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}``. Each shard is written
as soon as its tensors are ready, so only one shard is held in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from orthoopt.errors import InvalidInputError
from orthoopt.models.safetensors_folder import INDEX_FILE


def shard_write_copies() -> int:
    """Copies of a shard's bytes ``save_file`` builds while writing it: 0 where the installed safetensors
    writes from the tensors' own memory (recent versions), 1 where it serializes the shard to bytes
    first (older ones); the memory estimates count it (``orthoopt.models.footprint``)."""
    import safetensors.torch

    return 0 if hasattr(safetensors.torch, "_flatten_as_ptr") else 1


class ShardedWriter:
    """Shards ``0 .. num_shards - 1`` of a checkpoint in ``folder`` (which must exist)."""

    def __init__(self, folder: str | Path, num_shards: int) -> None:
        if not isinstance(num_shards, int) or num_shards < 1:
            raise InvalidInputError(f"num_shards must be a positive int, got {num_shards!r}")
        self.folder, self.num_shards = Path(folder), num_shards
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._written: set[int] = set()

    def shard_name(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{self.num_shards:05d}.safetensors"

    def write(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write shard ``i`` with ``tensors`` (``{name: tensor}``, moved to the CPU, made contiguous)."""
        if not 0 <= i < self.num_shards or i in self._written:
            raise InvalidInputError(f"shard {i} is out of range or already written")
        clash = [n for n in tensors if n in self.weight_map]
        if clash:
            raise InvalidInputError(f"tensors {clash[:3]} are already in another shard")
        data = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        save_file(data, str(self.folder / self.shard_name(i)), metadata={"format": "pt"})
        self._written.add(i)
        for n, t in data.items():
            self.weight_map[n] = self.shard_name(i)
            self.total_size += t.numel() * t.element_size()

    def finish(self) -> Path:
        """Write the index once every shard is written; returns its path."""
        missing = sorted(set(range(self.num_shards)) - self._written)
        if missing:
            raise InvalidInputError(f"shards {missing} were never written")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        path = self.folder / INDEX_FILE
        path.write_text(json.dumps(index, indent=2) + "\n")
        return path
