"""Solvers by name, with their default settings."""

from __future__ import annotations

from orthoopt.errors import InvalidInputError

from .base import Solver
from .cayley_bb import CayleyBB
from .cayley_lbfgs import CayleyLBFGS
from .cayley_sgd import CayleySGD
from .procrustes import ProcrustesAlternation
from .riemannian import RiemannianAdam, RiemannianSGD

SOLVERS: dict[str, type[Solver]] = {
    "cayley-lbfgs": CayleyLBFGS,  # memory=8, rho=1e-4, eta=0 (monotone), angle=0.1: L-BFGS, exact Cayley
    "cayley-bb": CayleyBB,  # rho=1e-4, eta=0.85, angle=0.1: BB step, nonmonotone line search, exact Cayley
    "cayley-sgd": CayleySGD,  # lr=0.5, momentum=0.9, iterative, n_iters=2, q=0.5, epsilon=1e-8
    "radam": RiemannianAdam,  # lr=2e-2, betas=(0.9, 0.999), CanonicalStiefel
    "rsgd": RiemannianSGD,  # lr=5e-2, momentum=0.9, CanonicalStiefel (lr depends on the loss scale)
    "procrustes": ProcrustesAlternation,  # no learning rate
}
"""Every solver by its ``--solver`` name (each class's ``name``), in this order in choices and help;
``make_solver(name, **kwargs)`` builds one. Defaults and update rules: ``docs/solvers.md``."""


def make_solver(name: str, **kwargs) -> Solver:
    """A new solver by name (``"cayley-bb" | "cayley-sgd" | "radam" | "rsgd" | "procrustes"``); ``kwargs`` go to its
    constructor and override the defaults listed in ``docs/solvers.md``."""
    try:
        cls = SOLVERS[name]
    except (KeyError, TypeError):
        raise InvalidInputError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}") from None
    try:
        return cls(**kwargs)
    except TypeError as e:  # an unknown keyword
        raise InvalidInputError(f"solver {name!r}: {e}") from None
