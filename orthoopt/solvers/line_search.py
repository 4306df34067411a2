"""The line search shared by the Cayley solvers on O(n): Barzilai-Borwein gradient descent
(``cayley-bb``, :mod:`orthoopt.solvers.cayley_bb`) and Riemannian L-BFGS (``cayley-lbfgs``,
:mod:`orthoopt.solvers.cayley_lbfgs`).

Rotations ``R`` ([n, n], ``x -> x @ R``, ``docs/conventions.md``) with Euclidean gradients ``G``. A
tangent vector at ``R`` is written ``P @ R`` with a skew generator ``P`` (left trivialization); the
metric is the one O(n) inherits from ``R^{n x n}``, ``<P1 R, P2 R> = tr(P1^T P2)``. All rotations of
the objective move together along one curve parameter ``tau``:

    g      = skew(G @ R.T) = (G R^T - R G^T) / 2   # Riemannian gradient generator (grad = g @ R)
    R(tau) = (I - tau/2 P)^{-1} (I + tau/2 P) @ R  # exact Cayley curve (OrthogonalGroup.cayley)
    f'(0)  = <g, P>                                 # slope along the curve (R'(0) = P @ R)

Directions ``P``:

* ``cayley-bb`` (Wen & Yin, "A feasible method for optimization with orthogonality constraints",
  Math. Programming 142, 2013, Algorithm 1): ``P = -g`` with the Barzilai-Borwein step of the last
  two iterates (``s`` = last step's generator ``tau P``, ``y = g_k - g_{k-1}``; generators carried
  unchanged from one point to the next, the left-invariant transport), alternating
  ``<s,s>/|<s,y>|`` and ``|<s,y>|/<y,y>``.
* ``cayley-lbfgs`` (Riemannian L-BFGS in the same coordinates, e.g. Huang, Absil & Gallivan, SIAM J.
  Optim. 2018): ``P = -H g`` from the two-loop recursion over the last ``memory`` pairs ``(s, y)``
  with ``H_0 = <s,y>/<y,y> I``; a pair with ``<s,y> <= 1e-10 ||s|| ||y||`` is skipped (cautious
  update), and a direction that is not a descent direction restarts from ``-g``. Trial ``tau = 1``.

The first step has no memory: its trial is scale free, ``P = -g`` with ``tau = angle / ||g||_F`` (a
turn of about ``angle`` radians). A trial is accepted when the Zhang-Hager nonmonotone condition

    f(R(tau)) <= C_k + rho * tau * f'(0),   C_{k+1} = (eta Q_k C_k + f_{k+1}) / Q_{k+1},  Q_{k+1} = eta Q_k + 1

holds (``C_0 = f_0``, ``Q_0 = 1``; ``eta = 0`` is the monotone Armijo rule). A rejected ``tau`` is
replaced by the minimizer of the quadratic through ``f(0)``, ``f'(0)`` and ``f(tau)``, kept within
``[0.1 tau, 0.5 tau]``.

Each trial evaluates loss *and* gradient (``objective.value_and_grad``) at the trial point, so an
accepted first trial costs one evaluation and its gradient serves the next step. The cache belongs to
the objective object: :meth:`step` with another objective re-evaluates. Use exact objectives (no
``sample_fraction``): the line search compares loss values.

Precision: the iterate is kept in float64 (a master copy) and every Cayley step is computed in
float64; the solver's rotations (what the objective sees, what :attr:`rotations` returns) are that
master rounded to the dtype given to :meth:`init`. Orthogonality therefore never drifts with the
number of steps, and no re-projection is needed (``num_reorthogonalizations`` stays 0).
"""

from __future__ import annotations

import math

import torch

from orthoopt.errors import InvalidInputError

from ..objectives.base import Objective
from .base import Solver


def inner(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.fsum(float(torch.sum(a[k] * b[k])) for k in a)


class CayleyLineSearch(Solver):
    """Shared machinery: float64 master iterate, cached loss/gradient, Zhang-Hager line search."""

    def __init__(self, rho: float, eta: float, angle: float, max_backtracks: int,
                 ortho_tol: float | None) -> None:
        super().__init__(ortho_tol)
        if not 0 < rho < 1:
            raise InvalidInputError(f"rho must be in (0, 1), got {rho!r}")
        if not 0 <= eta < 1:
            raise InvalidInputError(f"eta must be in [0, 1), got {eta!r}")
        if not angle > 0:
            raise InvalidInputError(f"angle must be positive, got {angle!r}")
        if not isinstance(max_backtracks, int) or max_backtracks < 1:
            raise InvalidInputError(f"max_backtracks must be a positive int, got {max_backtracks!r}")
        self.rho, self.eta, self.angle, self.max_backtracks = float(rho), float(eta), float(angle), max_backtracks

    def config(self) -> dict:
        return {"rho": self.rho, "eta": self.eta, "angle": self.angle, "max_backtracks": self.max_backtracks,
                "ortho_tol": self.ortho_tol}

    # -- state -------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self._master = {k: R.detach().to(torch.float64) for k, R in self._current().items()}
        self._f: float | None = None  # loss at the current iterate
        self._g: dict[str, torch.Tensor] = {}  # gradient generators there (float64)
        self._cache_key: object | None = None  # the objective the cache belongs to
        self._C = 0.0
        self._Q = 0.0
        self.iteration = 0  # accepted steps since init
        self.stalled = False
        self.last_step_size: float | None = None
        self.last_backtracks = 0
        self._reset_memory()

    def _reset_memory(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _memory_state(self) -> tuple[dict[str, torch.Tensor], dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load_memory(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:  # pragma: no cover
        raise NotImplementedError

    def _state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"master.{k}": v for k, v in self._master.items()}
        tensors.update({f"g.{k}": v for k, v in self._g.items()})
        mem_t, mem_s = self._memory_state()
        tensors.update({f"mem.{k}": v for k, v in mem_t.items()})
        scalars = {"f": self._f, "cached": self._cache_key is not None, "C": self._C, "Q": self._Q,
                   "iteration": self.iteration, "stalled": self.stalled, "last_step_size": self.last_step_size,
                   "last_backtracks": self.last_backtracks, "memory": mem_s}
        return tensors, scalars

    def _load_state(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v.to(torch.float64).clone() for k, v in tensors.items() if k.startswith(prefix)}

        self._master = part("master.")
        self._g = part("g.")
        self._f = scalars["f"]
        self._cache_key = _RESTORED if scalars["cached"] else None
        self._C, self._Q = scalars["C"], scalars["Q"]
        self.iteration, self.stalled = scalars["iteration"], scalars["stalled"]
        self.last_step_size, self.last_backtracks = scalars["last_step_size"], scalars["last_backtracks"]
        self._load_memory(part("mem."), scalars["memory"])

    def _set(self, name: str, R: torch.Tensor) -> None:
        """Set rotation ``name``: the float64 master and its rounding in the iterate's dtype."""
        self._master[name] = R.detach().to(torch.float64).clone(memory_format=torch.contiguous_format)
        super()._set(name, R)

    def _reprojected(self) -> None:
        self._cache_key = None  # the iterate moved: its loss and gradient must be recomputed
        self._reset_memory()

    def current_loss(self) -> float | None:
        return self._f if self._cache_key is not None else None

    # -- the step ----------------------------------------------------------------------------
    def _gradient_generators(self, G: dict[str, torch.Tensor], R64: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.group.generator(R64[k], G[k].to(torch.float64)) for k in G}

    def _direction(self, g: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float | None]:
        """``(P, trial tau)`` from the memory; ``tau=None`` asks for the scale-free first trial."""
        raise NotImplementedError  # pragma: no cover

    def _remember(self, s: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError  # pragma: no cover

    def _update(self, objective: Objective) -> tuple[float, list[str]]:
        if self._cache_key is None or (self._cache_key is not _RESTORED and self._cache_key is not objective):
            self._f, G = self._value_and_grad(objective)
            self._g = self._gradient_generators(G, self._master)
            self._cache_key = objective
            if self.iteration == 0 or self._Q == 0.0:
                self._C, self._Q = self._f, 1.0
        elif self._cache_key is _RESTORED:
            self._cache_key = objective  # a restored cache serves the objective it is resumed with
        f0, g = self._f, self._g
        gnorm = math.sqrt(inner(g, g))
        self.grad_norm = gnorm
        if gnorm == 0.0:  # a critical point: nothing to do
            self.stalled = True
            return f0, []
        P, tau = self._direction(g)
        slope = inner(g, P) if tau is not None else 0.0
        if tau is None or not math.isfinite(tau) or not slope < 0:
            P = {k: -v for k, v in g.items()}
            slope = -gnorm * gnorm
            tau = self.angle / gnorm
            self._reset_memory()
        names = list(g)
        R64 = {k: self._master[k] for k in names}
        for trial in range(self.max_backtracks):
            new = {k: self.group.cayley(R64[k], P[k], tau) for k in names}
            cast = {k: v.to(self._current()[k].dtype) for k, v in new.items()}
            f_new, G_new = self._value_and_grad(objective, {**self._current(), **cast})
            if f_new <= self._C + self.rho * tau * slope:
                break
            denom = 2.0 * (f_new - f0 - slope * tau)  # quadratic interpolation, safeguarded
            t_q = -slope * tau * tau / denom if denom > 0 else 0.5 * tau
            tau = min(max(t_q, 0.1 * tau), 0.5 * tau)
        else:
            self.stalled = True  # no acceptable step: keep the iterate and the cache, forget the memory
            self.last_backtracks = self.max_backtracks
            self._reset_memory()
            return f0, []
        g_new = self._gradient_generators(G_new, new)
        self._remember({k: tau * P[k] for k in names}, {k: g_new[k] - g[k] for k in names})
        for k in names:
            self._master[k] = new[k]
            self._current()[k].copy_(cast[k])
        self.stalled = False
        self.last_backtracks = trial
        self.last_step_size = tau
        Q_new = self.eta * self._Q + 1.0
        self._C = (self.eta * self._Q * self._C + f_new) / Q_new
        self._Q = Q_new
        self._f, self._g = f_new, g_new
        self.iteration += 1
        return f0, names


class _Restored:
    def __repr__(self) -> str:
        return "<restored cache>"


_RESTORED = _Restored()
