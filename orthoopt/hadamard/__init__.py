"""Hadamard constructions and fast transforms.

``hadamard_matrix(n)`` builds an exact ±1 Hadamard matrix for every ``n = 2^j * m`` whose base ``m`` is 1 or
a Paley I / Paley II / Williamson order (``docs/hadamard.md``); ``random_hadamard`` gives the orthogonal
``D @ H / sqrt(n)``; ``fwht`` and ``hadamard_transform`` apply ``x -> x @ H / sqrt(n)`` without the dense
matrix (``factor_orders`` names the factors they apply);
``SignedHadamard`` applies ``D @ H / sqrt(n)`` as an operator (``fast_rotation`` finds one in a dense ``R``).
"""

from .construct import (
    HadamardPlan,
    hadamard_matrix,
    hadamard_plan,
    hadamard_sizes,
    is_hadamard_size,
    nearest_hadamard_sizes,
    sylvester_matrix,
)
from .fwht import factor_orders, fwht, hadamard_transform
from .random import random_hadamard, random_signs
from .signed import SignedHadamard, fast_rotation

__all__ = [
    "HadamardPlan",
    "SignedHadamard",
    "factor_orders",
    "fast_rotation",
    "fwht",
    "hadamard_matrix",
    "hadamard_plan",
    "hadamard_sizes",
    "hadamard_transform",
    "is_hadamard_size",
    "nearest_hadamard_sizes",
    "random_hadamard",
    "random_signs",
    "sylvester_matrix",
]
