"""Finite fields GF(q), q = p^k, just enough for Paley constructions.

Paley needs two things of GF(q): subtraction and the quadratic character
``chi(a) = 0 if a == 0, +1 if a is a nonzero square, -1 otherwise``.

Elements are encoded as integers ``0 <= e < q``: the base-``p`` digits of ``e`` are the coefficients of a
polynomial of degree ``< k`` over GF(p), taken modulo a *primitive* polynomial ``f`` of degree ``k``
(the powers of ``x`` run through all ``q - 1`` nonzero elements). For ``k = 1`` this is plain arithmetic
modulo ``p``. With a primitive element ``g = x`` every nonzero element is ``g^i`` and
``chi(g^i) = (-1)^i``, since the squares are exactly the even powers.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np

from orthoopt.errors import InvalidInputError


def prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q == p**k`` and ``p`` prime, or ``None`` when ``q`` is not a prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, int(q**0.5) + 1) if q % d == 0), q)
    k, rest = 0, q
    while rest % p == 0:
        rest //= p
        k += 1
    return (p, k) if rest == 1 else None


class FiniteField:
    """GF(q) for a prime power ``q`` (see the module docstring for the element encoding).

    Attributes: ``q, p, k``; ``modulus`` (the coefficients ``c_0..c_{k-1}`` of the monic primitive
    polynomial ``x^k + c_{k-1} x^{k-1} + ... + c_0``, empty for ``k == 1``); ``chi`` (an int8 array of
    length ``q``, the quadratic character of each element).
    """

    def __init__(self, q: int):
        pk = prime_power(q)
        if pk is None:
            raise InvalidInputError(f"GF(q) needs a prime power q, got q={q}")
        self.q = q
        self.p, self.k = pk
        if self.k == 1:
            self.modulus: tuple[int, ...] = ()
            self.chi = self._prime_field_character()
        else:
            self.modulus, log = _primitive_modulus_and_log(self.p, self.k)
            chi = np.where(log % 2 == 0, 1, -1).astype(np.int8)
            chi[0] = 0
            self.chi = chi
        # digits[e, i] = i-th base-p digit of element e; used to subtract digit-wise.
        self._digits = (np.arange(q)[:, None] // self.p ** np.arange(self.k)) % self.p
        self._place = self.p ** np.arange(self.k)

    def _prime_field_character(self) -> np.ndarray:
        p = self.p
        chi = np.full(p, -1, dtype=np.int8)
        chi[(np.arange(1, p, dtype=np.int64) ** 2) % p] = 1
        chi[0] = 0
        return chi

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Elementwise ``a - b`` in GF(q) for integer-encoded arrays ``a, b`` (broadcasting)."""
        a, b = np.asarray(a), np.asarray(b)
        if self.k == 1:
            return (a - b) % self.p
        diff = (self._digits[a] - self._digits[b]) % self.p
        return diff @ self._place

    def __repr__(self) -> str:
        return f"FiniteField(q={self.q}={self.p}^{self.k})"


def _primitive_modulus_and_log(p: int, k: int) -> tuple[tuple[int, ...], np.ndarray]:
    """First monic primitive polynomial of degree ``k`` over GF(p) (lexicographic in its coefficients)
    and the discrete log table of ``x`` in GF(p^k) (``log[e]`` for encoded ``e != 0``; ``log[0]`` unused).

    A monic ``f`` with ``f(0) != 0`` is primitive iff the powers of ``x`` modulo ``f`` reach ``p^k - 1``
    distinct nonzero residues before returning to 1: a reducible ``f`` has fewer than ``p^k - 1`` units.
    """
    q = p**k
    place = [p**i for i in range(k)]
    for coeffs in itertools.product(range(p), repeat=k):
        if coeffs[0] == 0:
            continue
        log = np.full(q, -1, dtype=np.int64)
        digits = [1] + [0] * (k - 1)  # x^0
        for i in range(q - 1):
            e = sum(d * w for d, w in zip(digits, place))
            if log[e] >= 0:
                break  # x has order i < q - 1
            log[e] = i
            # multiply by x: shift up, then reduce x^k = -(c_0 + ... + c_{k-1} x^{k-1})
            top = digits[-1]
            digits = [0] + digits[:-1]
            digits = [(d - top * c) % p for d, c in zip(digits, coeffs)]
        else:
            if digits == [1] + [0] * (k - 1):
                return tuple(coeffs), log
    raise RuntimeError(f"no primitive polynomial of degree {k} over GF({p}) found")  # impossible


@lru_cache(maxsize=None)
def finite_field(q: int) -> FiniteField:
    """The cached :class:`FiniteField` of order ``q``."""
    return FiniteField(q)
