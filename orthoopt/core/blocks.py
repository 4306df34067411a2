"""Core types shared by every layer: weight blocks and named rotations.

Adapters produce :class:`WeightBlock` lists, objectives consume them, solvers update the rotations;
none of them imports another for these types. (``block_dims`` is over a list of blocks; an adapter's
``rotation_dims()`` is over a model.) Conventions (``docs/conventions.md``): side ``"in"``
rotates a block as ``W @ R``, side ``"out"`` as ``R.T @ W``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import torch

from orthoopt.errors import InvalidInputError

Rotations = Mapping[str, torch.Tensor]
Side = Literal["in", "out"]


@dataclass
class WeightBlock:
    """A weight matrix next to a rotated space.

    weight:   ``[out, in]`` tensor, usually a view of a model parameter (never copied here).
    rotation: name of the rotation it meets, e.g. ``"R1"`` or ``"R2.3"``.
    side:     ``"in"`` (reads the rotated space: ``W @ R``, needs ``in == n``) or
              ``"out"`` (writes into it: ``R.T @ W``, needs ``out == n``).
    name:     free-form label for reports and plots (e.g. ``"layers.3.mlp.down_proj"``).
    """

    weight: torch.Tensor
    rotation: str
    side: Side
    name: str = ""

    def __post_init__(self) -> None:
        if self.side not in ("in", "out"):
            raise InvalidInputError(f"WeightBlock {self.name!r}: side must be 'in' or 'out', got {self.side!r}")
        if self.weight.ndim != 2:
            raise InvalidInputError(f"WeightBlock {self.name!r}: weight must be 2-D [out, in], got shape {tuple(self.weight.shape)}")

    @property
    def dim(self) -> int:
        """Size ``n`` of the rotation this block meets."""
        return self.weight.shape[1] if self.side == "in" else self.weight.shape[0]

    def rotated(self, R: torch.Tensor) -> torch.Tensor:
        """The block's weight after rotation: ``W @ R`` (side "in") or ``R.T @ W`` (side "out")."""
        W = self.weight.to(R.dtype)
        return W @ R if self.side == "in" else R.T @ W

    def as_rows(self) -> torch.Tensor:
        """The block as ``[m, n]`` rows that the rotation multiplies from the right.

        Side "in": ``W`` itself (``W @ R``). Side "out": ``W.T`` (``(R.T @ W).T = W.T @ R``).
        Entry-wise functions of the rotated weight (fourth power, max) are the same on either view.
        """
        return self.weight if self.side == "in" else self.weight.T


def get_rotation(rotations: Mapping[str, torch.Tensor], name: str, n: int) -> torch.Tensor:
    """``rotations[name]`` after checking it is a floating ``[n, n]`` tensor (ValueError otherwise)."""
    if name not in rotations:
        raise InvalidInputError(f"rotation {name!r} ([{n}, {n}]) is missing; got {sorted(rotations)}")
    R = rotations[name]
    if not isinstance(R, torch.Tensor) or R.shape != (n, n):
        shape = tuple(R.shape) if isinstance(R, torch.Tensor) else type(R).__name__
        raise InvalidInputError(f"rotation {name!r} must be a [{n}, {n}] tensor, got {shape}")
    if not R.is_floating_point():
        raise InvalidInputError(f"rotation {name!r} must be floating point, got {R.dtype}")
    return R


def block_dims(blocks: list[WeightBlock]) -> dict[str, int]:
    """``{rotation name: n}`` for a list of blocks; raises if two blocks disagree on ``n``."""
    dims: dict[str, int] = {}
    for b in blocks:
        n = dims.setdefault(b.rotation, b.dim)
        if n != b.dim:
            raise InvalidInputError(f"rotation {b.rotation!r}: block {b.name!r} has size {b.dim}, others {n}")
    return dims
