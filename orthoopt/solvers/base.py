"""The solver interface of ``docs/architecture.md`` and what every solver shares.

A solver owns a dict of named ``[n, n]`` rotations (``x -> x @ R``, ``docs/conventions.md``):

* ``init(rotations)`` copies them (float32 or float64, kept in their dtype and device) and resets
  any optimizer state (momentum, Adam moments);
* ``step(objective) -> float`` makes one update and returns the loss *before* it;
* ``rotations`` is a fresh dict of copies of the current iterate.

Orthogonality is maintained, not assumed: after each update a rotation whose
``orthogonality_error`` exceeds ``ortho_tol`` is replaced by its polar factor
(:meth:`OrthogonalGroup.reorthogonalize <orthoopt.manifold.OrthogonalGroup.reorthogonalize>`,
computed in float64) and counted in ``num_reorthogonalizations``. The default ``ortho_tol=None`` is
the one tolerance policy, :func:`orthoopt.core.tolerance.orthogonality_tolerance`:
``max(1e-10, 8 eps sqrt(n))`` in float64, ``max(1e-5, 8 eps sqrt(n))`` in float32.

Every solver reaches the geometry of O(n) through :attr:`Solver.group`, the shared
:class:`orthoopt.manifold.OrthogonalGroup` (generators, Cayley retraction, polar factor, errors).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from orthoopt.errors import InvalidInputError

from ..core.tolerance import orthogonality_tolerance
from ..errors import OrthooptError
from ..manifold import O_N, OrthogonalGroup, check_square
from ..objectives.base import Objective


def riemannian_grad_norm(rotations: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> float:
    """``sqrt(sum_k ||skew(R_k^T G_k)||_F^2)``: the norm of the Riemannian gradient
    ``R skew(R^T G)`` (metric inherited from ``R^{n x n}``) over all rotations with a gradient."""
    return math.sqrt(sum(O_N.grad_norm(rotations[k], G) ** 2 for k, G in grads.items()))


def json_roundtrip(obj):
    """``obj`` as JSON would give it back (tuples become lists), for comparing saved settings."""
    import json

    return json.loads(json.dumps(obj))


class NonFiniteLossError(OrthooptError, ValueError):
    """The objective returned a NaN/inf loss or gradient; the rotations were left unchanged."""


class Solver:
    """Base class: bookkeeping of the rotations, finiteness checks, orthogonality maintenance.

    Subclasses set :attr:`name` and implement :meth:`_reset_state` and :meth:`_update`.

    Parameters
    ----------
    ortho_tol : float, optional
        Re-project an iterate onto O(n) when its ``||R^T R - I||_F`` exceeds this (counted in
        ``num_reorthogonalizations``); None: the size- and dtype-aware default of
        :func:`orthoopt.core.tolerance.orthogonality_tolerance`.
    """

    name = "solver"
    group: OrthogonalGroup = O_N  # the geometry of O(n) every solver calls

    def __init__(self, ortho_tol: float | None = None) -> None:
        if ortho_tol is not None and not ortho_tol > 0:
            raise InvalidInputError(f"ortho_tol must be positive or None, got {ortho_tol!r}")
        self.ortho_tol = ortho_tol
        self._R: dict[str, torch.Tensor] | None = None
        self.num_steps = 0
        self.num_reorthogonalizations = 0
        self.num_evaluations = 0
        self.grad_norm: float | None = None

    # -- interface ---------------------------------------------------------------------------
    def init(self, rotations: Mapping[str, torch.Tensor]) -> None:
        """Take copies of ``rotations`` ({name: [n, n]}, float32/float64) and reset the state."""
        if not isinstance(rotations, Mapping) or not rotations:
            raise InvalidInputError("rotations must be a non-empty dict {name: [n, n] tensor}")
        copies: dict[str, torch.Tensor] = {}
        for k, R in rotations.items():
            check_square(R, f"rotation {k!r}")
            orthogonality_tolerance(R.shape[0], R.dtype)  # raises for dtypes other than float32/float64
            # row-major copies: a restored state (read from a file) is row-major, and the iterate's
            # layout decides the BLAS path and so the rounding of every product (issue 25)
            copies[k] = R.detach().clone(memory_format=torch.contiguous_format)
        self._R = copies
        self.num_steps = 0
        self.num_reorthogonalizations = 0
        self.num_evaluations = 0
        self.grad_norm = None
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
            raise InvalidInputError(f"{self.name}: call init(rotations) before step()")
        loss, updated = self._update(objective)
        self.num_steps += 1
        if self._maintain_orthogonality(updated):
            self._reprojected()
        return loss

    def current_loss(self) -> float | None:
        """The loss at the current iterate when the solver already knows it (no evaluation), else None."""
        return None

    def config(self) -> dict:
        """The solver's settings (constructor arguments) as a JSON-able dict; a resume checks them."""
        return {"ortho_tol": self.ortho_tol}

    # -- exact resume ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The whole solver state: ``{"tensors": {str: Tensor}, "meta": JSON-able dict}``.

        ``tensors`` holds the iterate (``"R.<name>"``) and the optimizer state (``"s.<key>"``: momentum,
        Adam moments, BB memory, cached gradients) in their own dtype; ``meta`` the solver's name,
        :meth:`config`, step/evaluation/re-projection counters and scalar state. Floats are kept as
        Python floats, which JSON writes exactly (shortest round-trip repr), so
        :meth:`load_state_dict` of a saved state continues bit for bit.
        """
        current = self._current()
        tensors = {f"R.{k}": R.detach().clone() for k, R in current.items()}
        extra, scalars = self._state()
        tensors.update({f"s.{k}": v.detach().clone() for k, v in extra.items()})
        meta = {"solver": self.name, "config": self.config(), "num_steps": self.num_steps,
                "num_reorthogonalizations": self.num_reorthogonalizations,
                "num_evaluations": self.num_evaluations, "grad_norm": self.grad_norm, "state": scalars}
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`'s output. Raises ValueError naming the difference when it comes
        from another solver or other settings."""
        meta, tensors = state["meta"], state["tensors"]
        if meta.get("solver") != self.name:
            raise InvalidInputError(f"solver state is from solver {meta.get('solver')!r}, this solver is {self.name!r}")
        mine = json_roundtrip(self.config())
        theirs = meta.get("config", {})
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise InvalidInputError("solver state has other settings: " +
                             ", ".join(f"{k} {theirs.get(k)!r} (this solver: {mine.get(k)!r})" for k in diff))
        rotations = {k[2:]: v for k, v in tensors.items() if k.startswith("R.")}
        self.init(rotations)
        self.num_steps = int(meta["num_steps"])
        self.num_reorthogonalizations = int(meta["num_reorthogonalizations"])
        self.num_evaluations = int(meta["num_evaluations"])
        self.grad_norm = meta.get("grad_norm")
        self._load_state({k[2:]: v for k, v in tensors.items() if k.startswith("s.")}, meta.get("state", {}))

    def _state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Subclass state beyond the iterate: ``(tensors, JSON-able scalars)``."""
        return {}, {}

    def _load_state(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        """Restore :meth:`_state` after :meth:`init` (which reset it)."""

    def _reprojected(self) -> None:
        """Called after a re-projection changed the iterate (subclasses drop caches of it)."""

    # -- for subclasses ----------------------------------------------------------------------
    def _current(self) -> dict[str, torch.Tensor]:
        """The live iterate (subclasses that keep it elsewhere override this)."""
        if self._R is None:
            raise InvalidInputError(f"{self.name}: call init(rotations) first")
        return self._R

    def _set(self, name: str, R: torch.Tensor) -> None:
        """Overwrite rotation ``name`` of the live iterate in place."""
        self._current()[name].copy_(R)

    def _reset_state(self) -> None:
        """Clear optimizer state after :meth:`init`."""

    def _update(self, objective: Objective) -> tuple[float, list[str]]:  # pragma: no cover - abstract
        """Update the live iterate; return the loss before the update and the names it changed."""
        raise NotImplementedError

    def _value_and_grad(self, objective: Objective, rotations: Mapping[str, torch.Tensor] | None = None
                        ) -> tuple[float, dict[str, torch.Tensor]]:
        """Loss and Euclidean gradients at the current iterate (or at ``rotations``, a trial point),
        checked finite and cast to each rotation's dtype. Rotations the objective does not depend on
        get no entry. Counts one evaluation; at the current iterate it also sets :attr:`grad_norm`."""
        at_iterate = rotations is None
        current = self._current() if at_iterate else rotations
        missing = [k for k in objective.dims if k not in current]
        if missing:
            raise InvalidInputError(f"{self.name}: objective needs rotations {missing} that were not given to init()")
        value, grads = objective.value_and_grad({k: R.detach() for k, R in current.items()})
        loss = self._checked_loss(value)
        out = {}
        for k, g in grads.items():
            if k not in current:
                continue
            if g.shape != current[k].shape:
                raise InvalidInputError(
                    f"{self.name}: gradient for {k!r} has shape {tuple(g.shape)}, "
                    f"the rotation {tuple(current[k].shape)}"
                )
            if not torch.isfinite(g).all():
                raise NonFiniteLossError(
                    f"{self.name}: non-finite gradient for rotation {k!r} at step {self.num_steps} "
                    f"(loss {loss:.6g}); rotations left unchanged"
                )
            out[k] = g.detach().to(current[k].dtype)
        self.num_evaluations += 1
        if at_iterate:
            self.grad_norm = riemannian_grad_norm(current, out)
        return loss, out

    def _checked_loss(self, value: torch.Tensor | float) -> float:
        loss = float(value)
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"{self.name}: loss is {loss} at step {self.num_steps}; rotations left unchanged")
        return loss

    def _maintain_orthogonality(self, names: list[str]) -> int:
        count = 0
        for k in names:
            R = self._current()[k]
            tol = self.ortho_tol if self.ortho_tol is not None else orthogonality_tolerance(R.shape[0], R.dtype)
            if self.group.error(R) > tol:
                self._set(k, self.group.reorthogonalize(R))
                self.num_reorthogonalizations += 1
                count += 1
        return count

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"

    def _describe(self) -> str:
        return ""
