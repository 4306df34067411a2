"""Dense Hadamard matrices of order ``n = 2^j * m``: Kronecker product of a base and a Sylvester matrix.

``hadamard_matrix(n) = kron(B_m, S_{2^j})`` where ``S`` is Sylvester's matrix
(``S[i, k] = (-1)^popcount(i & k)``) and ``B_m`` is a base matrix of order ``m`` built by Paley I, Paley II
or Williamson (``orthoopt.hadamard.paley``, ``orthoopt.hadamard.williamson``). The decomposition takes
the largest power of two that leaves a constructible base (the smallest base); ``docs/hadamard.md``
lists the rule and the bases.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from functools import lru_cache

import torch

from orthoopt.errors import InvalidInputError

from .paley import paley_i, paley_i_order, paley_ii, paley_ii_order
from .williamson import WILLIAMSON_ORDERS, williamson_hadamard

CONSTRUCTIONS = ("sylvester", "paley-i", "paley-ii", "williamson")


@dataclass(frozen=True)
class HadamardPlan:
    """How ``hadamard_matrix(n)`` is built: ``kron(base, sylvester(n // base_order))``.

    ``construction`` is one of :data:`CONSTRUCTIONS` and says how the base of order ``base_order`` is
    made; ``q`` is the field order for the Paley constructions (``None`` otherwise).
    """

    n: int
    base_order: int
    construction: str
    q: int | None = None

    @property
    def power_of_two(self) -> int:
        """The Sylvester factor's order, ``n // base_order``."""
        return self.n // self.base_order


def _base_plan(n: int, m: int) -> HadamardPlan | None:
    """A plan with base order ``m`` (preferring Paley I, then Paley II, then Williamson), or ``None``."""
    if m == 1:
        return HadamardPlan(n, 1, "sylvester")
    if m % 4:
        return None  # every Hadamard order above 2 is a multiple of 4; m = 2 is covered by m = 1
    if paley_i_order(m - 1) == m:
        return HadamardPlan(n, m, "paley-i", m - 1)
    if paley_ii_order(m // 2 - 1) == m:
        return HadamardPlan(n, m, "paley-ii", m // 2 - 1)
    if m in WILLIAMSON_ORDERS:
        return HadamardPlan(n, m, "williamson")
    return None


@lru_cache(maxsize=4096)
def _find_plan(n: int) -> HadamardPlan | None:
    j = (n & -n).bit_length() - 1  # n = 2^j * odd
    for power in range(j, -1, -1):
        plan = _base_plan(n, n >> power)
        if plan is not None:
            return plan
    return None


def _as_order(n) -> int | None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        return None
    return int(n)


def is_hadamard_size(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can build order ``n`` (``False`` for non-integers and ``n < 1``)."""
    order = _as_order(n)
    return order is not None and _find_plan(order) is not None


def nearest_hadamard_sizes(n: int) -> tuple[int | None, int]:
    """``(below, above)``: the largest supported order ``< n`` (``None`` if none) and the smallest ``> n``."""
    order = _as_order(n)
    if order is None:
        raise InvalidInputError(f"n must be a positive integer, got n={n!r}")
    below = next((k for k in range(order - 1, 0, -1) if _find_plan(k) is not None), None)
    above = next(k for k in range(order + 1, 2 * order + 1) if _find_plan(k) is not None)  # 2^j is supported
    return below, above


def hadamard_sizes(start: int, stop: int) -> list[int]:
    """The supported orders ``n`` with ``start <= n < stop``, ascending."""
    return [k for k in range(max(1, start), stop) if _find_plan(k) is not None]


def hadamard_plan(n: int) -> HadamardPlan:
    """The :class:`HadamardPlan` for order ``n``; raises ``ValueError`` naming the nearest supported sizes."""
    order = _as_order(n)
    if order is None:
        raise InvalidInputError(f"a Hadamard order must be a positive integer, got n={n!r}")
    plan = _find_plan(order)
    if plan is None:
        below, above = nearest_hadamard_sizes(order)
        raise InvalidInputError(
            f"no Hadamard construction for n={order}; nearest supported sizes: {below} below, {above} above "
            f"(supported: 2^k * m with m = 1 or a Paley I/II or Williamson order; see docs/hadamard.md)"
        )
    return plan


@lru_cache(maxsize=None)
def _base_int8(construction: str, m: int, q: int | None) -> torch.Tensor:
    """The cached base matrix (int8). Internal: callers must copy before handing it out."""
    if construction == "sylvester":
        return torch.ones(1, 1, dtype=torch.int8)
    if construction == "paley-i":
        return paley_i(q)
    if construction == "paley-ii":
        return paley_ii(q)
    if construction == "williamson":
        return williamson_hadamard(m)
    raise InvalidInputError(f"unknown construction {construction!r}; expected one of {CONSTRUCTIONS}")


def base_matrix(plan: HadamardPlan, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A fresh copy of ``plan``'s ``[base_order, base_order]`` base matrix, as ``dtype``."""
    return _base_int8(plan.construction, plan.base_order, plan.q).to(dtype, copy=True)


def _check_dtype(dtype: torch.dtype) -> None:
    if not (dtype.is_floating_point or dtype.is_complex or dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise InvalidInputError(f"dtype must be a floating, complex or signed integer dtype, got {dtype}")


def sylvester_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester's ``[n, n]`` Hadamard matrix, ``n`` a power of two: ``S[i, k] = (-1)^popcount(i & k)``.

    Symmetric; ``x @ S`` is what :func:`orthoopt.hadamard.fwht` computes (unnormalized).
    """
    order = _as_order(n)
    if order is None or order & (order - 1):
        raise InvalidInputError(f"Sylvester order must be a power of two, got n={n!r}")
    _check_dtype(dtype)
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=dtype)
    s = torch.ones(1, 1, dtype=dtype)
    while s.shape[0] < order:
        s = torch.kron(h2, s)
    return s


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An ``[n, n]`` Hadamard matrix: entries ±1 and ``H @ H.T == H.T @ H == n * I`` exactly.

    Built as ``kron(B_m, S_{2^j})`` by :func:`hadamard_plan` (``docs/hadamard.md``). ``dtype`` may be a
    floating type (default float64; entries are exact) or a signed integer type (``torch.int64`` for
    exact integer checks, ``torch.int8`` to save memory: 18944² entries are 359 MB as int8, 2.9 GB as
    float64). Base matrices are cached; the result is a fresh tensor the caller owns. Not normalized:
    ``H / sqrt(n)`` is orthogonal (see :func:`orthoopt.hadamard.random_hadamard`).

    Raises ``ValueError`` for an unsupported ``n``, naming the nearest supported sizes.
    """
    plan = hadamard_plan(n)
    _check_dtype(dtype)
    if plan.base_order == 1:
        return sylvester_matrix(plan.n, dtype)
    base = base_matrix(plan, dtype)
    if plan.power_of_two == 1:
        return base
    return torch.kron(base, sylvester_matrix(plan.power_of_two, dtype))
