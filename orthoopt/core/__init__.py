"""Neutral core: what every layer shares and that is no objective, solver or model adapter.

Depends on torch and the standard library only (``tests/test_layering.py`` enforces it).

* :mod:`.blocks`    ``WeightBlock``, ``Rotations``, ``Side``, ``get_rotation``, ``block_dims``.
* :mod:`.tolerance` the one orthogonality tolerance policy (``orthogonality_tolerance``,
                    ``check_orthogonal``) and the write-back invariance tolerance.
* :mod:`.grid`      the one uniform quantization grid (``QuantSpec``, ``quantize_rows``, ...).
* :mod:`.moments`   the one kurtosis definition (Pearson; excess = kurtosis - 3).
* :mod:`.checks`    ``check_finite_tensor``, ``check_not_meta``.
"""

from .blocks import Rotations, Side, WeightBlock, block_dims, get_rotation
from .checks import check_finite_tensor, check_not_meta
from .moments import kurtosis, moments
from .tolerance import (
    check_orthogonal,
    invariance_ok,
    invariance_tolerance,
    orthogonality_error,
    orthogonality_tolerance,
)

__all__ = [
    "Rotations",
    "Side",
    "WeightBlock",
    "block_dims",
    "check_finite_tensor",
    "check_not_meta",
    "check_orthogonal",
    "get_rotation",
    "invariance_ok",
    "invariance_tolerance",
    "kurtosis",
    "moments",
    "orthogonality_error",
    "orthogonality_tolerance",
]
