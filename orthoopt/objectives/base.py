"""Weight blocks and the objective protocol.

An objective maps a dict of named rotations (``{"R1": [n, n], "R2.3": [d, d], ...}``) to a scalar
loss tensor. Objectives compose: ``a + b`` and ``0.5 * a`` are objectives. Shapes and the meaning of
``side`` follow ``docs/conventions.md``: side ``"in"`` rotates a block as ``W @ R``, side ``"out"``
as ``R.T @ W``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch

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
            raise ValueError(f"WeightBlock {self.name!r}: side must be 'in' or 'out', got {self.side!r}")
        if self.weight.ndim != 2:
            raise ValueError(f"WeightBlock {self.name!r}: weight must be 2-D [out, in], got shape {tuple(self.weight.shape)}")

    @property
    def dim(self) -> int:
        """Size ``n`` of the rotation this block meets."""
        return self.weight.shape[1] if self.side == "in" else self.weight.shape[0]

    def rotated(self, R: torch.Tensor) -> torch.Tensor:
        """The block's weight after rotation: ``W @ R`` (side "in") or ``R.T @ W`` (side "out")."""
        W = self.weight.to(R.dtype)
        return W @ R if self.side == "in" else R.T @ W

    def unrotated(self, R: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rotated` applied to ``self.weight``: ``W @ R.T`` or ``R @ W``."""
        W = self.weight.to(R.dtype)
        return W @ R.T if self.side == "in" else R @ W

    def as_rows(self) -> torch.Tensor:
        """The block as ``[m, n]`` rows that the rotation multiplies from the right.

        Side "in": ``W`` itself (``W @ R``). Side "out": ``W.T`` (``(R.T @ W).T = W.T @ R``).
        Entry-wise functions of the rotated weight (fourth power, max) are the same on either view.
        """
        return self.weight if self.side == "in" else self.weight.T


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise ValueError naming ``what`` if ``t`` holds NaN or inf, or is on the meta device (no data)."""
    if t.is_meta:
        raise ValueError(f"{what} is on the meta device: it holds no data; load the real weights first")
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


def rotation_dims(blocks: list[WeightBlock]) -> dict[str, int]:
    """``{rotation name: n}`` for a list of blocks; raises if two blocks disagree on ``n``."""
    dims: dict[str, int] = {}
    for b in blocks:
        n = dims.setdefault(b.rotation, b.dim)
        if n != b.dim:
            raise ValueError(f"rotation {b.rotation!r}: block {b.name!r} has size {b.dim}, others {n}")
    return dims


class Objective:
    """Base class: a scalar loss of named rotations.

    Subclasses implement :meth:`loss` (differentiable with autograd) and :attr:`dims`.
    :meth:`value_and_grad` returns the loss and its Euclidean gradient per rotation; the default uses
    autograd, subclasses may override it with a closed form. Solvers turn the Euclidean gradient
    into a Riemannian one themselves.
    """

    def loss(self, rotations: Rotations) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def dims(self) -> dict[str, int]:  # pragma: no cover - abstract
        """``{rotation name: n}`` of every rotation this objective depends on."""
        raise NotImplementedError

    def __call__(self, rotations: Rotations) -> torch.Tensor:
        return self.loss(rotations)

    def value_and_grad(self, rotations: Rotations) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, {name: dL/dR})`` with the loss detached. Names outside :attr:`dims` are ignored."""
        names = [k for k in self.dims if k in rotations]
        leaves = {k: rotations[k].detach().requires_grad_(True) for k in names}
        with torch.enable_grad():
            value = self.loss({**rotations, **leaves})
            grads = torch.autograd.grad(value, [leaves[k] for k in names], allow_unused=True)
        out = {k: (torch.zeros_like(leaves[k]) if g is None else g) for k, g in zip(names, grads)}
        return value.detach(), out

    def __add__(self, other: "Objective") -> "Objective":
        if not isinstance(other, Objective):
            return NotImplemented
        return Sum([self, other])

    def __mul__(self, scale: float) -> "Objective":
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return Sum([self], [float(scale)])

    __rmul__ = __mul__


@dataclass
class Sum(Objective):
    """``sum_i scales[i] * terms[i]``."""

    terms: list[Objective]
    scales: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.scales:
            self.scales = [1.0] * len(self.terms)
        flat_t, flat_s = [], []
        for t, s in zip(self.terms, self.scales):  # flatten nested sums
            if isinstance(t, Sum):
                flat_t += t.terms
                flat_s += [s * u for u in t.scales]
            else:
                flat_t.append(t)
                flat_s.append(s)
        self.terms, self.scales = flat_t, flat_s

    @property
    def dims(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.terms:
            for k, n in t.dims.items():
                if out.setdefault(k, n) != n:
                    raise ValueError(f"rotation {k!r} has size {n} in one term and {out[k]} in another")
        return out

    def loss(self, rotations: Rotations) -> torch.Tensor:
        return sum(s * t.loss(rotations) for t, s in zip(self.terms, self.scales))

    def value_and_grad(self, rotations: Rotations) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, grads = None, {}
        for t, s in zip(self.terms, self.scales):
            v, g = t.value_and_grad(rotations)
            total = s * v if total is None else total + s * v
            for k, gk in g.items():
                grads[k] = s * gk if k not in grads else grads[k] + s * gk
        return total, grads
