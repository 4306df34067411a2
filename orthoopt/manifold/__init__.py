"""The orthogonal group O(n): :class:`OrthogonalGroup`, which every solver calls, and its functions.

Rotations are ``[n, n]`` matrices acting as ``x -> x @ R`` (``docs/conventions.md``). Cayley
retractions take a skew-symmetric generator ``W`` and multiply from the left (``R <- C @ R``);
:func:`reorthogonalize` projects back onto O(n) (polar or QR). The orthogonality tolerance is the one
policy of :mod:`orthoopt.core.tolerance` (re-exported here).
"""

from orthoopt.core.tolerance import check_orthogonal, orthogonality_tolerance

from .group import O_N, OrthogonalGroup
from .orthogonal import (
    check_square,
    orthogonality_error,
    project_tangent,
    random_orthogonal,
    skew,
)
from .retractions import (
    cayley_retraction,
    cayley_retraction_iterative,
    polar_factor,
    reorthogonalize,
)

__all__ = [
    "O_N",
    "OrthogonalGroup",
    "cayley_retraction",
    "cayley_retraction_iterative",
    "check_orthogonal",
    "check_square",
    "orthogonality_error",
    "orthogonality_tolerance",
    "polar_factor",
    "project_tangent",
    "random_orthogonal",
    "reorthogonalize",
    "skew",
]
