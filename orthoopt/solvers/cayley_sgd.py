"""Cayley SGD with momentum on O(n) (Li, Fuxin & Todorovic, ICLR 2020, Algorithm 1), as used by SpinQuant.

For each rotation ``R`` ([n, n], ``x -> x @ R``) with Euclidean gradient ``G`` and momentum ``M``
(an ambient tangent vector, zero after ``init``):

    M     <- beta * M - G
    W_hat  = M @ R.T - 1/2 * R @ (R.T @ M @ R.T)
    W      = W_hat - W_hat.T                       # skew-symmetric generator
    M     <- W @ R                                 # momentum projected onto the tangent space at R
    alpha  = min(lr, 2 q / (||W||_1 + epsilon))
    R     <- Cayley(alpha W) @ R                   # left multiplication, see manifold.retractions

``Cayley(alpha W) @ R`` is the exact ``(I - alpha/2 W)^{-1} (I + alpha/2 W) @ R`` (``iterative=False``)
or the paper's ``n_iters``-step fixed point (``iterative=True``). For square ``R`` the generator is
``W = (M R^T - R M^T) / 2 = skew(M @ R.T)``. The clipping of ``alpha`` keeps the fixed-point map a
contraction with factor at most ``q``. The momentum is not transported: it is re-projected at the
new point on the next step (the paper's implicit vector transport).
"""

from __future__ import annotations

import torch

from orthoopt.errors import InvalidInputError

from ..objectives.base import Objective
from .base import Solver


class CayleySGD(Solver):
    """Cayley SGD with momentum; see the module docstring for the update.

    lr:        step-size cap ``l`` (the step is ``min(lr, 2q / (||W||_1 + epsilon))``).
    momentum:  ``beta`` in ``M <- beta M - G``; 0 gives plain Riemannian SGD with the Cayley retraction.
    iterative: fixed-point Cayley (``n_iters`` matrix-product iterations) instead of the exact solve.
    n_iters:   fixed-point iterations ``s`` (paper default 2).
    q:         contraction bound of the step-size clipping (paper default 0.5).
    epsilon:   guard in the clipping denominator (paper default 1e-8).
    ortho_tol: re-projection threshold (see :class:`~orthoopt.solvers.base.Solver`). The fixed point
               is orthogonal only to ``O(alpha ||W||)^(n_iters + 2)``, so with large steps the
               iterative variant is re-projected often; the exact variant only drifts by rounding.
    """

    name = "cayley-sgd"

    def __init__(
        self,
        lr: float = 0.5,
        momentum: float = 0.9,
        iterative: bool = True,
        n_iters: int = 2,
        q: float = 0.5,
        epsilon: float = 1e-8,
        ortho_tol: float | None = None,
    ) -> None:
        super().__init__(ortho_tol)
        if not lr > 0:
            raise InvalidInputError(f"lr must be positive, got {lr!r}")
        if not 0 <= momentum < 1:
            raise InvalidInputError(f"momentum must be in [0, 1), got {momentum!r}")
        if not isinstance(n_iters, int) or n_iters < 1:
            raise InvalidInputError(f"n_iters must be a positive int, got {n_iters!r}")
        if not 0 < q < 1:
            raise InvalidInputError(f"q must be in (0, 1) for the fixed point to converge, got {q!r}")
        if not epsilon > 0:
            raise InvalidInputError(f"epsilon must be positive, got {epsilon!r}")
        self.lr, self.momentum, self.iterative = float(lr), float(momentum), bool(iterative)
        self.n_iters, self.q, self.epsilon = n_iters, float(q), float(epsilon)
        self._M: dict[str, torch.Tensor] = {}
        self.last_step_sizes: dict[str, float] = {}

    def _reset_state(self) -> None:
        self._M = {k: torch.zeros_like(R) for k, R in self._current().items()}
        self.last_step_sizes = {}

    def _update(self, objective: Objective) -> tuple[float, list[str]]:
        loss, grads = self._value_and_grad(objective)
        for k, G in grads.items():
            R = self._current()[k]
            M = self.momentum * self._M[k] - G
            # The paper's W_hat = M R^T - R (R^T M R^T) / 2 is M R^T / 2 for square orthogonal R
            # (R R^T = I), so W = W_hat - W_hat^T takes one product instead of four.
            W = self.group.skew(M @ R.T)
            self._M[k] = W @ R
            alpha = min(self.lr, 2.0 * self.q / (float(torch.linalg.matrix_norm(W, ord=1)) + self.epsilon))
            if self.iterative:
                R_new = self.group.cayley_fixed_point(R, W, alpha, self.n_iters)
            else:  # in float64, so that float32 rotations do not drift (no re-projection needed)
                R_new = self.group.cayley(R.double(), W.double(), alpha).to(R.dtype)
            self._set(k, R_new)
            self.last_step_sizes[k] = alpha
        return loss, list(grads)

    def config(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "iterative": self.iterative, "n_iters": self.n_iters,
                "q": self.q, "epsilon": self.epsilon, "ortho_tol": self.ortho_tol}

    def _state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {f"M.{k}": M for k, M in self._M.items()}, {"last_step_sizes": dict(self.last_step_sizes)}

    def _load_state(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        for k in self._M:
            M = tensors[f"M.{k}"]
            self._M[k] = M.to(dtype=self._M[k].dtype, device=self._M[k].device).clone()
        self.last_step_sizes = dict(scalars.get("last_step_sizes", {}))

    def _describe(self) -> str:
        mode = f"iterative, n_iters={self.n_iters}" if self.iterative else "exact"
        return f"lr={self.lr}, momentum={self.momentum}, {mode}, q={self.q}"
