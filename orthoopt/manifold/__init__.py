"""The orthogonal group O(n): sampling, tangent projection, retractions.

Rotations are ``[n, n]`` matrices acting as ``x -> x @ R`` (``docs/conventions.md``). Cayley
retractions take a skew-symmetric generator ``W`` and multiply from the left (``R <- C @ R``);
QR/polar retractions take an ambient tangent vector ``xi`` and map ``R + xi`` back to O(n).
"""

from .orthogonal import (
    ORTHOGONALITY_TOL,
    check_square,
    default_tolerance,
    orthogonality_error,
    project_tangent,
    random_orthogonal,
    riemannian_grad,
    skew,
    sym,
)
from .retractions import (
    cayley_retraction,
    cayley_retraction_iterative,
    polar_retraction,
    qr_retraction,
    reorthogonalize,
)

__all__ = [
    "ORTHOGONALITY_TOL",
    "cayley_retraction",
    "cayley_retraction_iterative",
    "check_square",
    "default_tolerance",
    "orthogonality_error",
    "polar_retraction",
    "project_tangent",
    "qr_retraction",
    "random_orthogonal",
    "reorthogonalize",
    "riemannian_grad",
    "skew",
    "sym",
]
