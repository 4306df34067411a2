"""``cayley-lbfgs``: Riemannian L-BFGS with the exact Cayley retraction.

The directions, the line search and the precision are described in :mod:`orthoopt.solvers.line_search`.
"""

from __future__ import annotations

import math

import torch

from orthoopt.errors import InvalidInputError

from .line_search import CayleyLineSearch, inner


class CayleyLBFGS(CayleyLineSearch):
    """Riemannian L-BFGS with the exact Cayley retraction; :mod:`orthoopt.solvers.line_search`.

    memory: number of ``(s, y)`` pairs kept (each pair costs two ``[n, n]`` float64 matrices per
            rotation: 2 * 8 * 8 n^2 bytes, 17 MiB at n = 576, 2 GiB at n = 4096 with the default 8).
    rho, eta, angle, max_backtracks, ortho_tol: as for :class:`~orthoopt.solvers.cayley_bb.CayleyBB`
            (default ``eta = 0``: monotone, L-BFGS's unit step rarely needs the nonmonotone slack).
    """

    name = "cayley-lbfgs"

    def __init__(self, memory: int = 8, rho: float = 1e-4, eta: float = 0.0, angle: float = 0.1,
                 max_backtracks: int = 20, ortho_tol: float | None = None) -> None:
        super().__init__(rho, eta, angle, max_backtracks, ortho_tol)
        if not isinstance(memory, int) or memory < 1:
            raise InvalidInputError(f"memory must be a positive int, got {memory!r}")
        self.memory = memory

    def config(self) -> dict:
        return {"memory": self.memory, **super().config()}

    def _reset_memory(self) -> None:
        self._pairs: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]] = []

    def _memory_state(self):
        tensors = {}
        for i, (s, y, _) in enumerate(self._pairs):
            tensors.update({f"s{i}.{k}": v for k, v in s.items()})
            tensors.update({f"y{i}.{k}": v for k, v in y.items()})
        return tensors, {"pairs": len(self._pairs), "sy": [sy for _, _, sy in self._pairs]}

    def _load_memory(self, tensors, scalars) -> None:
        self._pairs = []
        for i, sy in zip(range(scalars["pairs"]), scalars["sy"]):
            s = {k[len(f"s{i}."):]: v for k, v in tensors.items() if k.startswith(f"s{i}.")}
            y = {k[len(f"y{i}."):]: v for k, v in tensors.items() if k.startswith(f"y{i}.")}
            self._pairs.append((s, y, sy))

    def _remember(self, s, y) -> None:
        sy = inner(s, y)
        if sy > 1e-10 * math.sqrt(inner(s, s) * inner(y, y)):
            self._pairs.append((s, y, sy))
            del self._pairs[:-self.memory]

    def _direction(self, g):
        if not self._pairs:
            return {}, None
        q = {k: v.clone() for k, v in g.items()}
        alphas = []
        for s, y, sy in reversed(self._pairs):
            a = inner(s, q) / sy
            alphas.append(a)
            for k in q:
                q[k] -= a * y[k]
        s, y, sy = self._pairs[-1]
        gamma = sy / inner(y, y)
        r = {k: gamma * v for k, v in q.items()}
        for (s, y, sy), a in zip(self._pairs, reversed(alphas)):
            b = inner(y, r) / sy
            for k in r:
                r[k] += (a - b) * s[k]
        return {k: -v for k, v in r.items()}, 1.0
