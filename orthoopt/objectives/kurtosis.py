"""KurTail-style objective: drive the kurtosis of rotated vectors toward a target.

Akhondzadeh, Bojchevski, Eleftheriou & Dazzi, "KurTail: Kurtosis-based LLM Quantization"
(Findings of EMNLP 2025, arXiv:2503.01483) learns rotations that make rotated activations less
tailed, measuring tailedness by the kurtosis, with the uniform distribution (kurtosis 1.8, the
best case for a uniform quantization grid) as the target. Here, for every sample row ``x_t``
(a token's activations, or a weight row) rotated as ``y_t = x_t @ R`` (``docs/conventions.md``)::

    kappa(y) = mean_j (y_j - c)^4 / (mean_j (y_j - c)^2)^2      c = 0 (default) or mean_j y_j
    L(R)     = sum_rotations  mean_t |kappa(y_t) - target|

The mean is **not** subtracted by default (``center=False``): the per-token quantizers this library
models have grids anchored at 0, so spread about 0 is what costs precision; the ratio is defined for
every nonzero vector (a constant vector, e.g. a one-hot token after a Sylvester Hadamard, gets the
minimum 1 instead of 0/0); and since ``||x R||_2 = ||x||_2``, it equals ``n ||x R||_4^4 / ||x||_2^4``,
OptRot's fourth power per token. For rotated activations the channel mean is near 0 and both
definitions agree (Gaussian 3, uniform on [-a, a] 1.8). ``center=True`` gives the textbook central
kurtosis. The definition (and the Pearson vs excess convention) is :mod:`orthoopt.core.moments`.
Rotations are summed (not averaged) so each rotation's gradient does not depend on how many others
the objective holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from orthoopt.core.blocks import Rotations, WeightBlock, block_dims, get_rotation
from orthoopt.core.checks import check_finite_tensor
from orthoopt.core.moments import kurtosis
from orthoopt.errors import InvalidInputError

from .base import Objective

UNIFORM_KURTOSIS = 1.8


def row_kurtosis(y: torch.Tensor, center: bool = False) -> torch.Tensor:
    """Kurtosis of each row of ``y`` (``[..., n]``) over its last dimension: ``[...]``.

    :func:`orthoopt.core.moments.kurtosis` (Pearson, ``m4 / m2^2``) about 0 by default, about the row
    mean with ``center=True``. A row with zero spread gives 0 (its fourth moment is 0 as well).
    """
    return kurtosis(y, dim=-1, center=center)


class Kurtosis(Objective):
    """``sum_rotations mean_t |kurtosis(x_t @ R) - target|``.

    activations: ``{rotation name: [T, n] tensor}``: the rows that rotation multiplies (e.g. the inputs
                 of the layers reading ``R1``, gathered over tokens and layers). All-zero rows are
                 ignored (their kurtosis is undefined and no rotation changes them).
    target:      kurtosis to aim for; 1.8 (uniform) by default.
    on:          ``"activations"`` or ``"weights"``: what the rows are (for messages only);
                 :meth:`from_blocks` sets ``"weights"``.
    center:      subtract each row's mean first (Pearson's kurtosis); default False, see the module doc.

    Gradient by autograd. Computation runs in each rotation's dtype; the loss is float64.
    """

    def __init__(
        self,
        activations: Mapping[str, torch.Tensor],
        target: float = UNIFORM_KURTOSIS,
        on: Literal["activations", "weights"] = "activations",
        center: bool = False,
    ) -> None:
        if on not in ("activations", "weights"):
            raise InvalidInputError(f"on must be 'activations' or 'weights', got {on!r}")
        if not isinstance(activations, Mapping) or not activations:
            raise InvalidInputError("Kurtosis needs a non-empty {rotation name: [T, n] tensor} mapping")
        self.on = on
        self._samples = {name: [x] for name, x in activations.items()}
        self._setup(target, center, {name: [f"activations for rotation {name!r}"] for name in activations})

    @classmethod
    def from_blocks(
        cls, blocks: list[WeightBlock], target: float = UNIFORM_KURTOSIS, center: bool = False
    ) -> "Kurtosis":
        """Kurtosis of the rows of the rotated weights (``block.as_rows() @ R``), never copied.

        A side-"in" block contributes its rows ``W[i, :]`` (one per output), a side-"out" block the
        columns ``W[:, j]`` (one per input); each is a vector over the ``n`` rotated coordinates.
        """
        blocks = list(blocks)
        if not blocks:
            raise InvalidInputError("Kurtosis.from_blocks needs at least one weight block")
        block_dims(blocks)  # raises if blocks disagree on a rotation's size
        self = cls.__new__(cls)
        self.on = "weights"
        self._samples, labels = {}, {}
        for b in blocks:
            self._samples.setdefault(b.rotation, []).append(b.as_rows())
            labels.setdefault(b.rotation, []).append(f"block {b.name!r} ({b.rotation}, side {b.side!r})")
        self._setup(target, center, labels)
        return self

    def _setup(self, target: float, center: bool, labels: dict[str, list[str]]) -> None:
        target = float(target)
        if not target >= 1.0 or target == float("inf"):
            raise InvalidInputError(f"target kurtosis must be a finite number >= 1 (the minimum possible), got {target}")
        self.target = target
        self.center = bool(center)
        self._dims: dict[str, int] = {}
        self._count: dict[str, int] = {}
        for name, parts in self._samples.items():
            kept = []
            for x, what in zip(parts, labels[name]):
                if not isinstance(x, torch.Tensor) or x.ndim != 2:
                    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                    raise InvalidInputError(f"{what} must be a 2-D [T, n] tensor, got {shape}")
                if not x.is_floating_point():
                    raise InvalidInputError(f"{what} must be floating point, got {x.dtype}")
                n = self._dims.setdefault(name, x.shape[1])
                if x.shape[1] != n:
                    raise InvalidInputError(f"{what} has {x.shape[1]} columns, expected {n}")
                if n < 2:
                    raise InvalidInputError(f"{what}: kurtosis needs at least 2 channels, got {n}")
                check_finite_tensor(x, what)
                nonzero = x.detach().abs().amax(dim=1) > 0
                if not bool(nonzero.all()):
                    x = x[nonzero]
                if x.shape[0]:
                    kept.append(x)
            if not kept:
                raise InvalidInputError(f"{self.on} for rotation {name!r} has no nonzero row")
            self._samples[name] = kept
            self._count[name] = sum(x.shape[0] for x in kept)

    @property
    def dims(self) -> dict[str, int]:
        return dict(self._dims)

    def kurtosis(self, rotations: Rotations) -> dict[str, torch.Tensor]:
        """``{rotation name: [T] kurtosis of every (nonzero) row after rotation}``."""
        out = {}
        for name, parts in self._samples.items():
            R = get_rotation(rotations, name, self._dims[name])
            out[name] = torch.cat([row_kurtosis(x.to(device=R.device, dtype=R.dtype) @ R, self.center) for x in parts])
        return out

    def loss(self, rotations: Rotations) -> torch.Tensor:
        total = None
        for name, parts in self._samples.items():
            R = get_rotation(rotations, name, self._dims[name])
            dev = sum(
                (row_kurtosis(x.to(device=R.device, dtype=R.dtype) @ R, self.center) - self.target)
                .abs()
                .sum(dtype=torch.float64)
                for x in parts
            )
            term = dev / self._count[name]
            total = term if total is None else total + term
        return total

    def __repr__(self) -> str:
        return (
            f"Kurtosis(on={self.on!r}, dims={self._dims}, rows={self._count}, "
            f"target={self.target}, center={self.center})"
        )
