"""Orthogonal Procrustes and DFRot's alternation.

``orthogonal_procrustes(A, B)`` solves ``min_R ||A @ R - B||_F`` over orthogonal ``[n, n]`` ``R``
(``A``, ``B``: ``[m, n]`` rows, rotated from the right as ``x -> x @ R``, ``docs/conventions.md``):
with the SVD ``A.T @ B = U S Vh`` the minimizer is ``R = U @ Vh`` (Schonemann 1966).

:class:`ProcrustesAlternation` is DFRot's closed-form alternation (Xiang & Zhang, 2024): with ``R``
fixed the objective computes targets ``B`` (e.g. the quantized ``A @ R``) through
``objective.procrustes_targets(rotations) -> {name: (A, B)}``; then each ``R`` is replaced by the
Procrustes minimizer for its ``(A, B)``.
"""

from __future__ import annotations

import torch

from orthoopt.errors import InvalidInputError

from ..errors import OrthooptError
from ..manifold import O_N
from ..objectives.base import Objective, SupportsProcrustes
from .base import NonFiniteLossError, Solver


class ProcrustesUnsupportedError(OrthooptError, TypeError, ValueError):
    """The objective has no ``procrustes_targets`` (it does not satisfy
    :class:`~orthoopt.objectives.SupportsProcrustes`). A TypeError; also a ValueError, so that the
    command line reports it as a bad argument (exit 2)."""


def orthogonal_procrustes(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``R`` ([n, n]) minimizing ``||A @ R - B||_F`` for ``A``, ``B`` of shape ``[m, n]``.

    ``R = U @ Vh`` from the SVD ``A.T @ B = U S Vh``, computed in float64 and returned in the promoted
    dtype of ``A`` and ``B``. Same answer as ``scipy.linalg.orthogonal_procrustes(A, B)[0]``.
    When ``A.T @ B`` is singular the minimizer is not unique and any one of them is returned.
    """
    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
        raise InvalidInputError("A and B must be torch tensors")
    if A.ndim != 2 or A.shape != B.shape:
        raise InvalidInputError(f"A and B must be 2-D of the same shape [m, n], got {tuple(A.shape)} and {tuple(B.shape)}")
    dtype = torch.promote_types(A.dtype, B.dtype)
    if not dtype.is_floating_point:
        raise InvalidInputError(f"A and B must be floating point, got {A.dtype} and {B.dtype}")
    M = A.detach().to(torch.float64).T @ B.detach().to(torch.float64)
    return O_N.polar_factor(M).to(dtype)


class ProcrustesAlternation(Solver):
    """DFRot's alternation: ``R <- orthogonal_procrustes(A, B)`` for the objective's targets.

    Needs an objective satisfying :class:`~orthoopt.objectives.SupportsProcrustes`
    (``procrustes_targets(rotations) -> {name: (A, B)}``, ``A``, ``B``: ``[m, n]``); others raise
    :class:`ProcrustesUnsupportedError` (a TypeError) naming the objective. A step's loss is ``objective.loss`` at the rotations
    before the update. No learning rate and no state. Rotations without targets stay unchanged.
    """

    name = "procrustes"

    def __init__(self, ortho_tol: float | None = None) -> None:
        super().__init__(ortho_tol)

    def _update(self, objective: Objective) -> tuple[float, list[str]]:
        if not isinstance(objective, SupportsProcrustes):
            raise ProcrustesUnsupportedError(
                f"solver 'procrustes' needs an objective with procrustes_targets(rotations) "
                f"(orthoopt.objectives.SupportsProcrustes); {type(objective).__name__} has none "
                "(use a gradient solver such as 'cayley-lbfgs' or 'radam')"
            )
        targets_fn = objective.procrustes_targets
        current = self._current()
        frozen = {k: R.detach() for k, R in current.items()}
        with torch.no_grad():
            loss = self._checked_loss(objective.loss(frozen))
            targets = targets_fn(frozen)
        self.num_evaluations += 1
        new = {}
        for k, pair in targets.items():
            if k not in current:
                raise InvalidInputError(f"procrustes_targets returned rotation {k!r} that was not given to init()")
            A, B = pair
            n = current[k].shape[0]
            if A.ndim != 2 or A.shape[1] != n:
                raise InvalidInputError(f"procrustes target A for {k!r} must be [m, {n}], got {tuple(A.shape)}")
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise NonFiniteLossError(
                    f"{self.name}: non-finite procrustes targets for {k!r} at step {self.num_steps}; "
                    "rotations left unchanged"
                )
            new[k] = orthogonal_procrustes(A, B).to(dtype=current[k].dtype, device=current[k].device)
        for k, R in new.items():
            self._set(k, R)
        return loss, list(new)
