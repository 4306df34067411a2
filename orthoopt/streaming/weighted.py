"""Weight blocks kept on disk between solver steps: the Hessian-weighted blocks of a streamed OptRot+.

OptRot+'s objective is OptRot's fourth power on ``W~ = W H^(1/2)`` (:mod:`orthoopt.objectives.hessian`).
The streamed store forms each layer's ``W~`` once, while the layer's input Hessians are at hand
(:meth:`orthoopt.streaming.rotate.SafetensorsStore.prepare`), and writes them here, one safetensors file
per unit; :class:`WeightedRows` then serves them to
:class:`~orthoopt.streaming.objective.StreamedFourthPower` as a :class:`~orthoopt.streaming.fused.FusedReader`
serves the weights, one unit at a time, and :func:`load_blocks` gives one layer's ``R2.i`` blocks back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from orthoopt.core.blocks import WeightBlock
from orthoopt.streaming.fused import FusedReader, Unit


def save_blocks(path: str | Path, blocks: list[WeightBlock]) -> None:
    """Write ``blocks`` (weights, rotation, side, name) to one safetensors file at ``path``."""
    tensors = {f"{j:05d}": b.weight.contiguous() for j, b in enumerate(blocks)}
    meta = json.dumps([[b.rotation, b.side, b.name] for b in blocks])
    save_file(tensors, str(path), metadata={"orthoopt.blocks": meta})


def load_blocks(path: str | Path) -> list[WeightBlock]:
    """The blocks :func:`save_blocks` wrote, in their order."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["orthoopt.blocks"])
    tensors = load_file(str(path))
    return [WeightBlock(tensors[f"{j:05d}"], r, side, name) for j, (r, side, name) in enumerate(meta)]


class WeightedRows:
    """The R1 row stream of a checkpoint with each block replaced by its file's (weighted) block.

    Parameters
    ----------
    reader : FusedReader
        The checkpoint; units without a file (the embedding: no input Hessian) come from it unchanged.
    folder : path
        ``{unit}.safetensors`` per weighted unit (:func:`save_blocks`).
    dtype : torch.dtype
        The weighted blocks' dtype (the model's, at least float32).

    Notes
    -----
    The interface :class:`~orthoopt.streaming.objective.StreamedFourthPower` reads: ``units()``,
    ``r1_pieces(units)``, ``layout``, ``dtype`` and ``ckpt``.
    """

    def __init__(self, reader: FusedReader, folder: str | Path, dtype: torch.dtype) -> None:
        self.reader, self.folder, self.dtype = reader, Path(folder), dtype
        self.layout, self.ckpt = reader.layout, reader.ckpt

    def path(self, unit: Unit) -> Path:
        """The file of ``unit``'s weighted blocks."""
        return self.folder / f"{unit}.safetensors"

    def units(self) -> list[Unit]:
        return self.reader.units()

    def r1_pieces(self, units: Iterable[Unit] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(block name, rows)`` as :meth:`FusedReader.r1_pieces`, weighted where a unit has a file."""
        for unit in self.units() if units is None else units:
            if not self.path(unit).is_file():
                yield from self.reader.r1_pieces([unit])
                continue
            for block in load_blocks(self.path(unit)):
                yield block.name, block.as_rows()


__all__ = ["WeightedRows", "load_blocks", "save_blocks"]
