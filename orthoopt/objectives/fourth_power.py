"""OptRot's data-free objective: the element-wise fourth power of the rotated weights.

Gadhikar, Grazzi & Hensman, "OptRot: Mitigating Weight Outliers via Data-Free Rotations for
Post-Training Quantization" (2025, arXiv:2512.24124). For every weight block next to a rotation
(``docs/conventions.md``: side "in" -> ``W @ R``, side "out" -> ``R.T @ W``)::

    L(R) = sum_blocks c_b * sum_ij (rotated W_b)_ij ** 4

with ``c_b = 1`` (the paper's plain sum, the default) or, with ``normalize=True``,
``c_b = numel(W_b) / ||W_b||_F ** 4`` so that each block's term is the entry kurtosis
``E[w^4] / E[w^2]^2`` of its rotated weight: at least 1 (equal magnitudes), 3 for Gaussian entries,
unchanged by ``W -> c * W``. The Frobenius norm is rotation invariant, so ``c_b`` is a constant.
See docs/objectives.md.

This module also holds the small input checks shared by the objectives package.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import Objective, Rotations, WeightBlock, rotation_dims


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise ValueError naming ``what`` if ``t`` holds NaN or inf."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or inf")


def get_rotation(rotations: Mapping[str, torch.Tensor], name: str, n: int) -> torch.Tensor:
    """``rotations[name]`` after checking it is a floating ``[n, n]`` tensor (ValueError otherwise)."""
    if name not in rotations:
        raise ValueError(f"rotation {name!r} ([{n}, {n}]) is missing; got {sorted(rotations)}")
    R = rotations[name]
    if not isinstance(R, torch.Tensor) or R.shape != (n, n):
        shape = tuple(R.shape) if isinstance(R, torch.Tensor) else type(R).__name__
        raise ValueError(f"rotation {name!r} must be a [{n}, {n}] tensor, got {shape}")
    if not R.is_floating_point():
        raise ValueError(f"rotation {name!r} must be floating point, got {R.dtype}")
    return R


class FourthPower(Objective):
    """OptRot: ``sum_b c_b * sum((rotated W_b) ** 4)`` over weight blocks.

    blocks:    weight blocks (views of model weights, never copied); any number of rotations.
    normalize: ``False`` (default, the paper's plain sum, ``c_b = 1``) or ``True``
               (``c_b = numel / ||W_b||_F^4``: each block counts as its entry kurtosis, scale free).

    Both :meth:`loss` (autograd) and :meth:`value_and_grad` (closed form, no graph) compute in each
    rotation's dtype and device and accumulate the loss in float64. With a block's rows
    ``A = block.as_rows()`` (``[m, n]``, rotated as ``A @ R``) the gradient is
    ``dL/dR = 4 c_b A.T @ (A @ R) ** 3``: for side "in" ``4 W.T (W R)^3``, for side "out"
    ``4 W ((R.T W)^3).T``.
    """

    def __init__(self, blocks: list[WeightBlock], normalize: bool = False) -> None:
        blocks = list(blocks)
        if not blocks:
            raise ValueError("FourthPower needs at least one weight block")
        for b in blocks:
            if not isinstance(b, WeightBlock):
                raise ValueError(f"FourthPower expects WeightBlock items, got {type(b).__name__}")
            if not b.weight.is_floating_point():
                raise ValueError(f"block {b.name!r}: weight must be floating point, got {b.weight.dtype}")
            check_finite(b.weight, f"block {b.name!r} ({b.rotation}, side {b.side!r})")
        self.blocks = blocks
        self.normalize = bool(normalize)
        self._dims = rotation_dims(blocks)
        # {rotation name: [(rows [m, n], coefficient c_b), ...]}
        self._groups: dict[str, list[tuple[torch.Tensor, float]]] = {}
        for b in blocks:
            self._groups.setdefault(b.rotation, []).append((b.as_rows(), self._coefficient(b)))

    def _coefficient(self, block: WeightBlock) -> float:
        if not self.normalize:
            return 1.0
        frob2 = float(block.weight.detach().to(torch.float64).square().sum())
        if frob2 == 0.0:
            raise ValueError(f"block {block.name!r} is all zeros; normalize=True needs a nonzero weight")
        return block.weight.numel() / frob2**2

    @property
    def dims(self) -> dict[str, int]:
        return dict(self._dims)

    def loss(self, rotations: Rotations) -> torch.Tensor:
        total = None
        for name, members in self._groups.items():
            R = get_rotation(rotations, name, self._dims[name])
            for rows, coef in members:
                Y = rows.to(device=R.device, dtype=R.dtype) @ R
                term = coef * Y.square().square().sum(dim=-1).sum(dtype=torch.float64)
                total = term if total is None else total + term
        return total

    def value_and_grad(self, rotations: Rotations) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Closed form: ``(loss in float64, {name: sum_b 4 c_b A_b.T @ (A_b @ R)^3})``, no autograd graph."""
        total = None
        grads: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, members in self._groups.items():
                R = get_rotation(rotations, name, self._dims[name]).detach()
                G = torch.zeros_like(R)
                for rows, coef in members:
                    A = rows.to(device=R.device, dtype=R.dtype)
                    Y = A @ R
                    Y2 = Y * Y
                    term = coef * Y2.square().sum(dim=-1).sum(dtype=torch.float64)
                    total = term if total is None else total + term
                    G.addmm_(A.T, Y2.mul_(Y), alpha=4.0 * coef)  # Y2 becomes Y^3 in place
                grads[name] = G
        return total, grads

    def __repr__(self) -> str:
        return f"FourthPower({len(self.blocks)} blocks, dims={self._dims}, normalize={self.normalize})"
