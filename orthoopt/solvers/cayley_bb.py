"""``cayley-bb``: Riemannian gradient descent with Barzilai-Borwein steps and the exact Cayley retraction.

The directions, the line search and the precision are described in :mod:`orthoopt.solvers.line_search`.
"""

from __future__ import annotations

import torch

from .line_search import CayleyLineSearch, inner


class CayleyBB(CayleyLineSearch):
    """Riemannian gradient descent with Barzilai-Borwein steps (Wen & Yin 2013); :mod:`orthoopt.solvers.line_search`.

    rho:   sufficient-decrease constant (Wen & Yin: 1e-4).
    eta:   Zhang-Hager averaging weight in [0, 1) (0: monotone Armijo; Wen & Yin: 0.85).
    angle: the first trial turns the rotations by about this many radians (``tau ||g||_F``).
    max_backtracks: trials per step before the step gives up (iterate unchanged, :attr:`stalled`).
    ortho_tol: see :class:`~orthoopt.solvers.base.Solver`; never reached (float64 exact Cayley).
    """

    name = "cayley-bb"

    def __init__(self, rho: float = 1e-4, eta: float = 0.85, angle: float = 0.1, max_backtracks: int = 20,
                 ortho_tol: float | None = None) -> None:
        super().__init__(rho, eta, angle, max_backtracks, ortho_tol)

    def _reset_memory(self) -> None:
        self._s: dict[str, torch.Tensor] = {}
        self._y: dict[str, torch.Tensor] = {}

    def _memory_state(self):
        return {**{f"s.{k}": v for k, v in self._s.items()}, **{f"y.{k}": v for k, v in self._y.items()}}, {}

    def _load_memory(self, tensors, scalars) -> None:
        self._s = {k[2:]: v for k, v in tensors.items() if k.startswith("s.")}
        self._y = {k[2:]: v for k, v in tensors.items() if k.startswith("y.")}

    def _remember(self, s, y) -> None:
        self._s, self._y = s, y

    def _direction(self, g):
        if not self._s:
            return {}, None
        sy = abs(inner(self._s, self._y))
        if not sy > 0:
            return {}, None
        tau = inner(self._s, self._s) / sy if self.iteration % 2 == 1 else sy / inner(self._y, self._y)
        return {k: -v for k, v in g.items()}, tau
