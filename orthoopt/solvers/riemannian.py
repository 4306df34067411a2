"""geoopt's Riemannian Adam and SGD behind the solver interface.

Each rotation ``R`` ([n, n], ``x -> x @ R``) becomes a ``geoopt.ManifoldParameter`` on a Stiefel
manifold (O(n) is the square Stiefel manifold). Each step sets ``.grad`` to the objective's
Euclidean gradient and calls the geoopt optimizer, which converts it with ``egrad2rgrad``, updates
its moments and moves with the manifold's ``retr_transp``.

The default manifold is ``geoopt.CanonicalStiefel`` (``geoopt.Stiefel()``'s default): its
retraction is the exact Cayley transform ``(I - A/2)^{-1} (I + A/2) @ R`` with
``A = u R^T - R u^T`` (left multiplication; orthogonal to rounding even for the non-tangent Adam
direction) and its transport moves the moments along the same curve. On square matrices the
canonical Riemannian gradient is twice the Euclidean one (``G - R G^T R = 2 R skew(R^T G)``), so a
Riemannian SGD step with the canonical metric is twice as long as with ``canonical=False``
(``geoopt.EuclideanStiefel``: QR retraction, projection transport).
"""

from __future__ import annotations

import geoopt
import torch

from orthoopt.errors import InvalidInputError

from ..objectives.base import Objective
from .base import Solver


class _GeooptSolver(Solver):
    """Shared plumbing: one ManifoldParameter per rotation and one geoopt optimizer over all of them."""

    def __init__(self, lr: float, canonical: bool, ortho_tol: float | None) -> None:
        super().__init__(ortho_tol)
        if not lr > 0:
            raise InvalidInputError(f"lr must be positive, got {lr!r}")
        self.lr = float(lr)
        self.canonical = bool(canonical)
        self.optimizer: torch.optim.Optimizer | None = None

    def _make_optimizer(self, params: list[geoopt.ManifoldParameter]) -> torch.optim.Optimizer:  # pragma: no cover
        raise NotImplementedError

    def _reset_state(self) -> None:
        manifold = geoopt.Stiefel(canonical=self.canonical)
        params = {k: geoopt.ManifoldParameter(R, manifold=manifold) for k, R in self._current().items()}
        self._R = params  # the parameters are the live iterate (they share storage with the copies)
        self.optimizer = self._make_optimizer(list(params.values()))

    def _state(self) -> tuple[dict[str, torch.Tensor], dict]:
        names = list(self._current())
        sd = self.optimizer.state_dict()
        tensors, scalars = {}, {}
        for i, st in sd["state"].items():
            for key, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"{names[i]}.{key}"] = v
                else:
                    scalars[f"{names[i]}.{key}"] = v
        groups = [{k: v for k, v in g.items() if k not in ("params", "betas") and isinstance(v, (int, float, type(None)))}
                  for g in sd["param_groups"]]  # e.g. geoopt's group["step"]
        return tensors, {"optimizer": scalars, "groups": groups}

    def _load_state(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        names = list(self._current())
        state: dict[int, dict] = {}
        for i, name in enumerate(names):
            prefix = name + "."
            st = {k[len(prefix):]: v.clone() for k, v in tensors.items() if k.startswith(prefix)}
            st.update({k[len(prefix):]: v for k, v in scalars.get("optimizer", {}).items() if k.startswith(prefix)})
            if st:
                state[i] = st
        sd = self.optimizer.state_dict()
        groups = sd["param_groups"]
        for g, saved in zip(groups, scalars.get("groups", [])):
            g.update(saved)
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        # torch's load_state_dict turns Adam's int "step" into a tensor; geoopt keeps it a Python int
        params = list(self._current().values())
        for i, st in state.items():
            for key, v in st.items():
                if not isinstance(v, torch.Tensor):
                    self.optimizer.state[params[i]][key] = v

    def _set(self, name: str, R: torch.Tensor) -> None:
        with torch.no_grad():
            self._current()[name].copy_(R)

    def _update(self, objective: Objective) -> tuple[float, list[str]]:
        loss, grads = self._value_and_grad(objective)
        for k, p in self._current().items():
            p.grad = grads.get(k)  # None: geoopt leaves the rotation (and its state) alone
        self.optimizer.step()
        for p in self._current().values():
            p.grad = None
        return loss, list(grads)


class RiemannianAdam(_GeooptSolver):
    """``geoopt.optim.RiemannianAdam`` (Becigneul & Ganea, ICLR 2019) on O(n).

    lr, betas, eps, amsgrad: as in ``torch.optim.Adam``. canonical: ``CanonicalStiefel`` (default)
    or ``EuclideanStiefel``. ortho_tol: see :class:`~orthoopt.solvers.base.Solver`.
    """

    name = "radam"

    def __init__(
        self,
        lr: float = 2e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        amsgrad: bool = False,
        canonical: bool = True,
        ortho_tol: float | None = None,
    ) -> None:
        super().__init__(lr, canonical, ortho_tol)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise InvalidInputError(f"betas must be in [0, 1), got {betas!r}")
        self.betas, self.eps, self.amsgrad = (float(betas[0]), float(betas[1])), float(eps), bool(amsgrad)

    def _make_optimizer(self, params):
        return geoopt.optim.RiemannianAdam(params, lr=self.lr, betas=self.betas, eps=self.eps, amsgrad=self.amsgrad)

    def config(self) -> dict:
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "amsgrad": self.amsgrad,
                "canonical": self.canonical, "ortho_tol": self.ortho_tol}

    def _describe(self) -> str:
        return f"lr={self.lr}, betas={self.betas}, canonical={self.canonical}"


class RiemannianSGD(_GeooptSolver):
    """``geoopt.optim.RiemannianSGD`` (Bonnabel 2013; momentum transported along the retraction) on O(n).

    lr, momentum, nesterov: as in ``torch.optim.SGD``. The step scales with the gradient, so ``lr``
    depends on the objective's scale. canonical: ``CanonicalStiefel`` (default) or
    ``EuclideanStiefel``. ortho_tol: see :class:`~orthoopt.solvers.base.Solver`.
    """

    name = "rsgd"

    def __init__(
        self,
        lr: float = 5e-2,
        momentum: float = 0.9,
        nesterov: bool = False,
        canonical: bool = True,
        ortho_tol: float | None = None,
    ) -> None:
        super().__init__(lr, canonical, ortho_tol)
        if not 0 <= momentum < 1:
            raise InvalidInputError(f"momentum must be in [0, 1), got {momentum!r}")
        if nesterov and momentum == 0:
            raise InvalidInputError("nesterov needs momentum > 0")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def _make_optimizer(self, params):
        return geoopt.optim.RiemannianSGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)

    def config(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov, "canonical": self.canonical,
                "ortho_tol": self.ortho_tol}

    def _describe(self) -> str:
        return f"lr={self.lr}, momentum={self.momentum}, canonical={self.canonical}"
