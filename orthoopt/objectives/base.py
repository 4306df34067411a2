"""The objective interface: the :class:`Objective` ABC, :class:`Sum`, and the Procrustes capability.

An objective maps a dict of named rotations (``{"R1": [n, n], "R2.3": [d, d], ...}``) to a scalar
loss tensor. Objectives compose: ``a + b`` and ``0.5 * a`` are objectives. Shapes and the meaning of
``side`` follow ``docs/conventions.md``: side ``"in"`` rotates a block as ``W @ R``, side ``"out"``
as ``R.T @ W``. The shared types (``WeightBlock``, ``Rotations``, ``Side``) live in
:mod:`orthoopt.core.blocks` (``orthoopt.objectives`` exports them too).

An objective that supports DFRot's closed-form alternation also satisfies :class:`SupportsProcrustes`
(a ``runtime_checkable`` Protocol): ``procrustes_targets(rotations) -> {name: (A, B)}``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Mapping, Protocol, runtime_checkable

import torch

from orthoopt.core.blocks import Rotations
from orthoopt.errors import InvalidInputError

@runtime_checkable
class SupportsProcrustes(Protocol):
    """An objective with DFRot's closed-form step: ``procrustes_targets(rotations) -> {name: (A, B)}``
    (``A``, ``B``: ``[m, n]``); the next rotation minimizes ``||A @ R - B||_F`` over orthogonal ``R``.
    :class:`~orthoopt.solvers.ProcrustesAlternation` checks ``isinstance(objective, SupportsProcrustes)``."""

    def procrustes_targets(self, rotations: Rotations) -> dict[str, tuple[torch.Tensor, torch.Tensor]]: ...


class Objective(abc.ABC):
    """Abstract base class: a scalar loss of named rotations.

    Subclasses implement the abstract :meth:`loss` (differentiable with autograd) and :attr:`dims`.
    :meth:`value_and_grad` returns the loss and its Euclidean gradient per rotation; the default uses
    autograd, subclasses may override it with a closed form. Solvers turn the Euclidean gradient
    into a Riemannian one themselves.
    """

    @abc.abstractmethod
    def loss(self, rotations: Rotations) -> torch.Tensor:
        """The scalar loss at ``rotations`` (``{name: [n, n]}``), differentiable by autograd."""

    @property
    @abc.abstractmethod
    def dims(self) -> dict[str, int]:
        """``{rotation name: n}`` of every rotation this objective depends on."""

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

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What changes between calls (a sampler's generator, a batch stream's position), as tensors.

        Returns
        -------
        dict of str to Tensor
            Empty for an objective whose value at a point never changes (the default). A resumed run
            loads it into a new objective built from the same inputs (:meth:`load_state_dict`), which
            then continues bit for bit as the saved one would (``tests/test_objective_conformance.py``).
        """
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s output.

        Parameters
        ----------
        state : mapping of str to Tensor
            A :meth:`state_dict` of an objective built from the same inputs.

        Raises
        ------
        ValueError
            When ``state`` names other keys than this objective keeps (the default keeps none).
        """
        if state:
            raise InvalidInputError(f"objective state has {sorted(state)}, this objective ({type(self).__name__}) "
                             "keeps none")

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
                    raise InvalidInputError(f"rotation {k!r} has size {n} in one term and {out[k]} in another")
        return out

    def loss(self, rotations: Rotations) -> torch.Tensor:
        return sum(s * t.loss(rotations) for t, s in zip(self.terms, self.scales))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every term's state, its keys prefixed ``"<i>."`` (``i`` the term's index)."""
        return {f"{i}.{k}": v for i, t in enumerate(self.terms) for k, v in t.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`; ValueError when a key names no term."""
        parts: list[dict[str, torch.Tensor]] = [{} for _ in self.terms]
        for key, v in state.items():
            i, _, rest = key.partition(".")
            if not i.isdigit() or int(i) >= len(self.terms):
                raise InvalidInputError(f"objective state key {key!r} names no term of this sum of {len(self.terms)}")
            parts[int(i)][rest] = v
        for t, part in zip(self.terms, parts):
            t.load_state_dict(part)

    def value_and_grad(self, rotations: Rotations) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, grads = None, {}
        for t, s in zip(self.terms, self.scales):
            v, g = t.value_and_grad(rotations)
            total = s * v if total is None else total + s * v
            for k, gk in g.items():
                grads[k] = s * gk if k not in grads else grads[k] + s * gk
        return total, grads
