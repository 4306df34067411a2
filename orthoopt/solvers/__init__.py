"""Optimizers on the orthogonal group and ``solve``.

Solver interface (``docs/architecture.md``): ``init(rotations)``, ``step(objective) -> float`` (the
loss before the update), ``.rotations``. Update rules and defaults: ``docs/solvers.md``.
"""

from .base import NonFiniteLossError, Solver
from .cayley_bb import CayleyBB
from .cayley_lbfgs import CayleyLBFGS
from .cayley_sgd import CayleySGD
from .init import INIT_KINDS, derived_seed, initial_rotations
from .procrustes import ProcrustesAlternation, ProcrustesUnsupportedError, orthogonal_procrustes
from .registry import SOLVERS, make_solver
from .riemannian import RiemannianAdam, RiemannianSGD
from .solve import SolveResult, solve

__all__ = [
    "INIT_KINDS",
    "SOLVERS",
    "CayleyBB",
    "CayleyLBFGS",
    "CayleySGD",
    "NonFiniteLossError",
    "ProcrustesAlternation",
    "ProcrustesUnsupportedError",
    "RiemannianAdam",
    "RiemannianSGD",
    "SolveResult",
    "Solver",
    "derived_seed",
    "initial_rotations",
    "make_solver",
    "orthogonal_procrustes",
    "solve",
]
