"""Fast Hadamard transforms along one dimension, without forming the dense matrix.

* :func:`fwht`: ``x @ S_n`` (Sylvester order, ``n`` a power of two).
* :func:`hadamard_transform`: ``x @ hadamard_matrix(n)`` for any supported ``n = 2^j * m``.
* :func:`factor_orders`: the orders of the factors it applies (a pass over ``x`` each; the cost model counts them).

Both use the Kronecker structure ``hadamard_matrix(n) = kron(B_m, S_{2^j})`` and
``S_{2^j} = kron(S_{2^a}, S_{2^b}, ...)`` (``a + b + ... = j``, each at most 5): ``x`` is viewed as
``[..., m, 2^a, 2^b, ...]`` and each factor is one matrix product along its axis (:func:`kron_apply`),
``2 (m + 2^a + 2^b + ...)`` flops per element instead of the dense ``2 n``, one pass over ``x`` per factor
(matrix products rather than ``log2 n`` butterfly stages: each stage is a pass too, with almost no
arithmetic).

Both act on row vectors as ``x -> x @ H`` (docs/conventions.md), divide by ``sqrt(n)`` when
``normalize=True`` (then the map is orthogonal), and are differentiable.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from orthoopt.errors import InvalidInputError

from .construct import base_matrix, hadamard_plan, sylvester_matrix


def _check_input(x: torch.Tensor, normalize: bool, dim: int = -1) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise InvalidInputError("x must be a tensor with at least one dimension (transformed along dim)")
    if normalize and not (x.dtype.is_floating_point or x.dtype.is_complex):
        raise InvalidInputError(f"normalize=True needs a floating tensor, got {x.dtype}; pass normalize=False for integers")
    if not -x.dim() <= dim < x.dim():
        raise InvalidInputError(f"dim={dim} is out of range for a tensor with {x.dim()} dimensions")
    return x.shape[dim]


# The widest Sylvester factor one matrix product applies: 2^_MAX_FACTOR_BITS. Each factor is one pass
# over ``x`` at 2 * width flops per element, so the width trades passes against arithmetic. With the
# write-back's blocks in the cache (orthoopt.hadamard.signed.CHUNK) widths 16-32 were fastest on a 2-core
# AVX2 CPU in float64 (4096: 1.23 s at 32, 1.48 s at 64 for a [14336, 4096] weight and its transpose).
_MAX_FACTOR_BITS = 5


@lru_cache(maxsize=None)
def _sylvester_factor(bits: int, dtype: torch.dtype) -> torch.Tensor:
    return sylvester_matrix(1 << bits, dtype)


def _sylvester_bits(n: int) -> list[int]:
    """``log2(n)`` split into as few, as even as possible, chunks of at most ``_MAX_FACTOR_BITS``."""
    j = n.bit_length() - 1
    k = max(1, -(-j // _MAX_FACTOR_BITS))
    return [j // k + (i < j % k) for i in range(k)]


def kron_apply(x: torch.Tensor, factors: list[torch.Tensor], dim: int = -1) -> torch.Tensor:
    """``x @ kron(F_1, ..., F_k)`` along dimension ``dim`` of ``x``, without forming the product.

    ``x.shape[dim]`` is the product ``n`` of the square factors' orders. Along the last dimension the
    result is ``x @ K`` (``K = kron(F_1, ..., F_k)``); along ``dim`` in general every 1-D slice ``v``
    through ``dim`` becomes ``v @ K`` (for a matrix and ``dim=-2``: ``K.T @ x``). ``x`` is viewed as
    ``[before, f_1, ..., f_k, after]`` and each factor is one (batched) matrix product on its axis,
    with no copies or transposes of ``x`` beyond that product's output.
    """
    dim = dim % x.dim()
    n = x.shape[dim]
    lead = math.prod(x.shape[:dim])
    trail = math.prod(x.shape[dim + 1:])
    y = x.contiguous()
    inner = 1  # product of the factor orders already applied (the axes before the current one)
    for F in factors:
        f = F.shape[0]
        after = n // (inner * f) * trail
        if after == 1:
            y = y.reshape(-1, f) @ F
        else:  # y[b, j, a] -> sum_j F[j, j'] y[b, j, a] = (F.T @ y[b])[j', a]
            y = F.T @ y.reshape(lead * inner, f, after)
        inner *= f
    return y.reshape(x.shape)


def _sylvester_factors(n: int, x: torch.Tensor) -> list[torch.Tensor]:
    """The factors of ``S_n = S_{2^a} ⊗ S_{2^b} ⊗ ...`` in ``x``'s dtype and device (none for ``n = 1``)."""
    return [] if n == 1 else [_sylvester_factor(b, x.dtype).to(x.device) for b in _sylvester_bits(n)]


def _factors(n: int, x: torch.Tensor) -> list[torch.Tensor]:
    """The factors :func:`hadamard_transform` applies for order ``n``: ``B_m`` (if ``m > 1``), then Sylvester's."""
    plan = hadamard_plan(n)
    return ([base_matrix(plan, x.dtype).to(x.device)] if plan.base_order > 1 else []) \
        + _sylvester_factors(plan.power_of_two, x)


def factor_orders(n: int) -> list[int]:
    """The orders of the square factors :func:`hadamard_transform` applies for order ``n``, in order.

    Parameters
    ----------
    n : int
        A supported Hadamard order (:func:`~orthoopt.hadamard.is_hadamard_size`).

    Returns
    -------
    list of int
        The base order ``m`` when ``m > 1``, then the Sylvester factors' orders (each at most 32); their
        product is ``n``, and each is one pass over ``x`` of ``2 * order`` flops per element. Empty for
        ``n = 1``.
    """
    return [F.shape[0] for F in _factors(n, torch.empty(0, dtype=torch.float64))]


_FOLD_SCALE = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def _transform(x: torch.Tensor, factors: list[torch.Tensor], n: int, normalize: bool, dim: int) -> torch.Tensor:
    """The factors applied along ``dim``, then ``/ sqrt(n)`` if ``normalize``. In float32/float64 the first
    factor carries the ``1 / sqrt(n)`` (no extra pass); in bf16/fp16 that factor would round the scale
    itself (bf16: 2^-9 relative), so the result is divided instead."""
    if not factors:
        return x / math.sqrt(n) if normalize else x.clone()
    fold = normalize and x.dtype in _FOLD_SCALE
    if fold:
        factors = [factors[0] / math.sqrt(n), *factors[1:]]
    y = kron_apply(x, factors, dim)
    return y / math.sqrt(n) if normalize and not fold else y


def fwht(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Fast Walsh–Hadamard transform of ``x`` (``[..., n]``, ``n`` a power of two) along the last dim.

    Returns ``x @ hadamard_matrix(n) / sqrt(n)`` (Sylvester order; without the ``/ sqrt(n)`` when
    ``normalize=False``), same shape as ``x``. Normalized, it is an involution: ``fwht(fwht(x)) == x``.
    One matrix product per Sylvester factor (module docstring). Raises ``ValueError`` if ``n`` is not
    a power of two.
    """
    n = _check_input(x, normalize)
    if n < 1 or n & (n - 1):
        raise InvalidInputError(f"fwht needs a power-of-two last dimension, got {n}; use hadamard_transform for 2^k * m")
    return _transform(x, _sylvester_factors(n, x), n, normalize, -1)


def hadamard_transform(x: torch.Tensor, normalize: bool = True, dim: int = -1) -> torch.Tensor:
    """``x @ hadamard_matrix(n)`` (``/ sqrt(n)`` if ``normalize``) along ``dim``, for any supported ``n``.

    ``x`` is ``[..., n]`` (``n = x.shape[dim]``); the result has the same shape. Along ``dim=-2`` of a
    matrix it is ``H.T @ x`` (every column transformed) without transposing ``x``. Uses the Kronecker structure (module
    docstring) with the small base matrix in ``x``'s dtype and device, so it never forms the ``[n, n]``
    matrix. For ``n`` a power of two it equals :func:`fwht`. Raises ``ValueError`` for an unsupported
    ``n`` (naming the nearest supported sizes).
    """
    n = _check_input(x, normalize, dim)
    return _transform(x, _factors(n, x), n, normalize, dim)
