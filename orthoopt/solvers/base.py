"""The solver interface of ``docs/architecture.md`` and what every solver shares.

A solver owns a dict of named ``[n, n]`` rotations (``x -> x @ R``, ``docs/conventions.md``):

* ``init(rotations)`` copies them (float32 or float64, kept in their dtype and device) and resets
  any optimizer state (momentum, Adam moments);
* ``step(objective) -> float`` makes one update and returns the loss *before* it;
* ``rotations`` is a fresh dict of copies of the current iterate.

Orthogonality is maintained, not assumed: after each update a rotation whose
``orthogonality_error`` exceeds ``ortho_tol`` is replaced by its polar factor
(:func:`orthoopt.manifold.reorthogonalize`, computed in float64). The default ``ortho_tol=None``
uses :func:`orthoopt.manifold.default_tolerance`: ``1e-10`` in float64, ``1e-5`` in float32 (the
tolerances of ``docs/conventions.md``), raised to ``8 eps sqrt(n)`` for float32 rotations larger
than about 110.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ..manifold import check_square, default_tolerance, orthogonality_error, reorthogonalize
from ..objectives.base import Objective


class NonFiniteLossError(ValueError):
    """The objective returned a NaN/inf loss or gradient; the rotations were left unchanged."""


class Solver:
    """Base class: bookkeeping of the rotations, finiteness checks, orthogonality maintenance.

    Subclasses set :attr:`name` and implement :meth:`_reset_state` and :meth:`_update`.
    """

    name = "solver"

    def __init__(self, ortho_tol: float | None = None) -> None:
        if ortho_tol is not None and not ortho_tol > 0:
            raise ValueError(f"ortho_tol must be positive or None, got {ortho_tol!r}")
        self.ortho_tol = ortho_tol
        self._R: dict[str, torch.Tensor] | None = None
        self.num_steps = 0
        self.num_reorthogonalizations = 0

    # -- interface ---------------------------------------------------------------------------
    def init(self, rotations: Mapping[str, torch.Tensor]) -> None:
        """Take copies of ``rotations`` ({name: [n, n]}, float32/float64) and reset the state."""
        if not isinstance(rotations, Mapping) or not rotations:
            raise ValueError("rotations must be a non-empty dict {name: [n, n] tensor}")
        copies: dict[str, torch.Tensor] = {}
        for k, R in rotations.items():
            check_square(R, f"rotation {k!r}")
            default_tolerance(R.dtype)  # raises for dtypes other than float32/float64
            copies[k] = R.detach().clone()
        self._R = copies
        self.num_steps = 0
        self.num_reorthogonalizations = 0
        self._reset_state()

    @property
    def rotations(self) -> dict[str, torch.Tensor]:
        """Copies of the current iterate, ``{name: [n, n]}``."""
        return {k: R.detach().clone() for k, R in self._current().items()}

    @property
    def initialized(self) -> bool:
        return self._R is not None

    def step(self, objective: Objective) -> float:
        """One update; returns the loss before it. Raises :class:`NonFiniteLossError` on NaN/inf."""
        if self._R is None:
            raise ValueError(f"{self.name}: call init(rotations) before step()")
        loss, updated = self._update(objective)
        self.num_steps += 1
        self._maintain_orthogonality(updated)
        return loss

    # -- for subclasses ----------------------------------------------------------------------
    def _current(self) -> dict[str, torch.Tensor]:
        """The live iterate (subclasses that keep it elsewhere override this)."""
        if self._R is None:
            raise ValueError(f"{self.name}: call init(rotations) first")
        return self._R

    def _set(self, name: str, R: torch.Tensor) -> None:
        """Overwrite rotation ``name`` of the live iterate in place."""
        self._current()[name].copy_(R)

    def _reset_state(self) -> None:
        """Clear optimizer state after :meth:`init`."""

    def _update(self, objective: Objective) -> tuple[float, list[str]]:  # pragma: no cover - abstract
        """Update the live iterate; return the loss before the update and the names it changed."""
        raise NotImplementedError

    def _value_and_grad(self, objective: Objective) -> tuple[float, dict[str, torch.Tensor]]:
        """Loss and Euclidean gradients at the current iterate, checked finite and cast to each
        rotation's dtype. Rotations the objective does not depend on get no entry."""
        current = self._current()
        missing = [k for k in objective.dims if k not in current]
        if missing:
            raise ValueError(f"{self.name}: objective needs rotations {missing} that were not given to init()")
        value, grads = objective.value_and_grad({k: R.detach() for k, R in current.items()})
        loss = self._checked_loss(value)
        out = {}
        for k, g in grads.items():
            if k not in current:
                continue
            if g.shape != current[k].shape:
                raise ValueError(
                    f"{self.name}: gradient for {k!r} has shape {tuple(g.shape)}, "
                    f"the rotation {tuple(current[k].shape)}"
                )
            if not torch.isfinite(g).all():
                raise NonFiniteLossError(
                    f"{self.name}: non-finite gradient for rotation {k!r} at step {self.num_steps} "
                    f"(loss {loss:.6g}); rotations left unchanged"
                )
            out[k] = g.detach().to(current[k].dtype)
        return loss, out

    def _checked_loss(self, value: torch.Tensor | float) -> float:
        loss = float(value)
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"{self.name}: loss is {loss} at step {self.num_steps}; rotations left unchanged")
        return loss

    def _maintain_orthogonality(self, names: list[str]) -> None:
        for k in names:
            R = self._current()[k]
            tol = self.ortho_tol if self.ortho_tol is not None else default_tolerance(R.dtype, R.shape[0])
            if orthogonality_error(R) > tol:
                self._set(k, reorthogonalize(R))
                self.num_reorthogonalizations += 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"

    def _describe(self) -> str:
        return ""
