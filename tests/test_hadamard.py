"""Tests for orthoopt.hadamard: field arithmetic, Paley / Williamson / Sylvester constructions, the
decomposition n = 2^j * m, randomized Hadamard rotations and the fast transforms.

Exactness is checked in integers. Products of ±1 matrices are integers of size <= n, so a float64
matmul (n < 2^53) or float32 matmul (n < 2^24) of them is exact and stands in for a slow int64 matmul.
For the large model sizes a full ``H @ H.T`` (n^3, up to 18944^3) is too slow on CPU, so they are
verified through the Kronecker structure instead: the base factor is checked exactly (every base order
is), Sylvester's factor is exact by construction and checked for small orders, the returned matrix is
checked to *be* ``kron(base, sylvester)`` at random entries against the closed form
``B[i // s, k // s] * (-1)^popcount((i % s) & (k % s))`` (exact factors imply an exact product), and
a random subset of rows is checked exactly against all n rows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orthoopt.hadamard import (
    fwht,
    hadamard_matrix,
    hadamard_plan,
    hadamard_sizes,
    hadamard_transform,
    is_hadamard_size,
    nearest_hadamard_sizes,
    random_hadamard,
    random_signs,
    sylvester_matrix,
)
from orthoopt.hadamard import williamson
from orthoopt.hadamard.galois import finite_field, prime_power
from orthoopt.hadamard.paley import jacobsthal_matrix, paley_i, paley_ii
from orthoopt.hadamard.williamson import williamson_hadamard, williamson_quadruple

# Base orders named in the issue; all but 1 must be buildable as a single base matrix.
BASE_ORDERS = [1, 12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172]
# Hidden / intermediate / head sizes of real models that must work.
MODEL_SIZES = [64, 80, 96, 128, 576, 768, 896, 960, 1536, 2048, 2560, 2816, 3072, 3584, 4096, 4864,
               5120, 8192, 8960, 11008, 13824, 14336, 18944]
SMALL_SIZES = hadamard_sizes(1, 300)


def _primes_below(hi: int) -> list[int]:
    sieve = np.ones(hi, dtype=bool)
    sieve[:2] = False
    for d in range(2, int(hi**0.5) + 1):
        if sieve[d]:
            sieve[d * d::d] = False
    return np.flatnonzero(sieve).tolist()


def _prime_powers(lo: int, hi: int) -> list[int]:
    """Prime powers in [lo, hi), by enumerating p^k over a sieve (independent of ``prime_power``)."""
    found = set()
    for p in _primes_below(hi):
        q = p
        while q < hi:
            if q >= lo:
                found.add(q)
            q *= p
    return sorted(found)


def assert_exact_hadamard(h: torch.Tensor) -> None:
    """Entries ±1 and H @ H.T == n I exactly (float64 matmul of integers below 2^53 is exact)."""
    n = h.shape[0]
    assert h.shape == (n, n)
    hf = h.to(torch.float64)
    assert torch.equal(hf.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(hf @ hf.T, n * torch.eye(n, dtype=torch.float64))


def assert_rows_orthogonal(h: torch.Tensor, rows: torch.Tensor) -> None:
    """Rows ``rows`` of ``h`` have inner product n with themselves and 0 with every other row, exactly
    (float32 matmul in column chunks; all partial sums are integers of size <= n < 2^24)."""
    n = h.shape[0]
    picked = h[rows].to(torch.float32)
    gram = torch.empty(len(rows), n)
    for start in range(0, n, 2048):
        gram[:, start:start + 2048] = picked @ h[start:start + 2048].to(torch.float32).T
    expected = torch.zeros(len(rows), n)
    expected[torch.arange(len(rows)), rows] = n
    assert torch.equal(gram, expected)


# ---------------------------------------------------------------- finite fields and Paley


def test_prime_power_matches_brute_force():
    expected = set(_prime_powers(2, 400))
    for q in range(0, 400):
        pk = prime_power(q)
        assert (pk is not None) == (q in expected), q
        if pk is not None:
            assert pk[0] in _primes_below(q + 1) and pk[0] ** pk[1] == q


@pytest.mark.parametrize("q", [3, 5, 7, 9, 13, 25, 27, 49, 81, 121, 125, 169, 343])
def test_field_character_and_jacobsthal(q):
    field = finite_field(q)
    chi = field.chi.astype(np.int64)
    assert chi[0] == 0 and (chi[1:] == 1).sum() == (q - 1) // 2 == (chi[1:] == -1).sum()
    a = np.arange(q)
    assert np.array_equal(field.sub(a, a), np.zeros(q, dtype=np.int64))
    assert np.array_equal(field.sub(a, 0), a)
    assert np.array_equal(field.sub(0, field.sub(0, a)), a)  # -(-a) == a
    jac = jacobsthal_matrix(q).astype(np.int64)
    assert np.array_equal(jac @ jac.T, q * np.eye(q, dtype=np.int64) - 1)
    assert not jac.sum(axis=0).any() and not jac.sum(axis=1).any()
    chi_minus_one = (-1) ** ((q - 1) // 2)  # -1 is a square iff q ≡ 1 (mod 4)
    assert np.array_equal(jac.T, chi_minus_one * jac)


@pytest.mark.parametrize("q", [q for q in _prime_powers(3, 260) if q % 4 == 3])
def test_paley_i_exact(q):
    h = paley_i(q)
    assert h.shape == (q + 1, q + 1)
    assert_exact_hadamard(h)


@pytest.mark.parametrize("q", [q for q in _prime_powers(5, 130) if q % 4 == 1])
def test_paley_ii_exact(q):
    h = paley_ii(q)
    assert h.shape == (2 * (q + 1), 2 * (q + 1))
    assert_exact_hadamard(h)


def test_paley_rejects_wrong_q():
    for bad in (5, 15, 21):  # 5 ≡ 1 mod 4; 15 and 21 are not prime powers
        with pytest.raises(ValueError, match=f"q={bad}"):
            paley_i(bad)
    for bad in (7, 45):
        with pytest.raises(ValueError, match=f"q={bad}"):
            paley_ii(bad)


# ---------------------------------------------------------------- Williamson


@pytest.mark.parametrize("w", sorted(williamson.WILLIAMSON_FIRST_ROWS))
def test_williamson_exact(w):
    quad = williamson_quadruple(w)
    assert all(torch.equal(m, m.T) for m in quad)
    assert_exact_hadamard(williamson_hadamard(4 * w))


def test_williamson_table_is_verified(monkeypatch):
    rows = list(williamson.WILLIAMSON_FIRST_ROWS[39])
    rows[0] = rows[0][:5] + ("-" if rows[0][5] == "+" else "+") + rows[0][6:-5] + \
        ("-" if rows[0][-5] == "+" else "+") + rows[0][-4:]  # flip a symmetric pair: still symmetric
    monkeypatch.setitem(williamson.WILLIAMSON_FIRST_ROWS, 39, tuple(rows))
    with pytest.raises(RuntimeError, match="4wI"):
        williamson_quadruple(39)


# ---------------------------------------------------------------- decomposition and dense matrices


@pytest.mark.parametrize("m", BASE_ORDERS)
def test_issue_base_orders_exact(m):
    assert is_hadamard_size(m)
    assert_exact_hadamard(hadamard_matrix(m, dtype=torch.int64))


def test_every_supported_size_below_300_is_exact():
    assert len(SMALL_SIZES) > 50
    for n in SMALL_SIZES:
        h = hadamard_matrix(n, dtype=torch.int64)
        assert h.dtype == torch.int64
        assert_exact_hadamard(h)
        assert_exact_hadamard(h.T)


def test_small_orders_are_exactly_1_2_and_multiples_of_4():
    # Every multiple of 4 below 92 is a Sylvester or Paley order; 92 = 4 * 23 is the first that is not.
    assert hadamard_sizes(1, 92) == [1, 2] + list(range(4, 92, 4))
    assert not is_hadamard_size(92)


def _base_construction(m: int) -> str | None:
    """Independent statement of the base rule (docs/hadamard.md), with brute-force prime powers."""
    if m == 1:
        return "sylvester"
    if m % 4 == 0 and m - 1 in PRIME_POWERS and (m - 1) % 4 == 3:
        return "paley-i"
    if m % 4 == 0 and m // 2 - 1 in PRIME_POWERS and (m // 2 - 1) % 4 == 1:
        return "paley-ii"
    if m % 4 == 0 and m // 4 in williamson.WILLIAMSON_FIRST_ROWS:
        return "williamson"
    return None


PRIME_POWERS = set(_prime_powers(2, 20000))


def test_decomposition_takes_largest_power_of_two():
    for n in MODEL_SIZES + SMALL_SIZES:
        plan = hadamard_plan(n)
        s = plan.power_of_two
        assert plan.base_order * s == n and s & (s - 1) == 0
        assert plan.construction == _base_construction(plan.base_order)
        # no larger power of two leaves a base order
        t = 2 * s
        while n % t == 0:
            assert _base_construction(n // t) is None, (n, t)
            t *= 2


@pytest.mark.parametrize("n", MODEL_SIZES)
def test_model_sizes_exact_via_kronecker_structure(n):
    gen = torch.Generator().manual_seed(n)
    plan = hadamard_plan(n)
    s = plan.power_of_two
    base = hadamard_matrix(plan.base_order, dtype=torch.int64)
    assert_exact_hadamard(base)
    h = hadamard_matrix(n, dtype=torch.int8)
    assert h.shape == (n, n) and h.dtype == torch.int8
    # The result is kron(base, sylvester(s)): spot-check entries against the closed form.
    i, k = (torch.randint(0, n, (4000,), generator=gen) for _ in range(2))
    closed = [int(base[a // s, b // s]) * (-1) ** bin((a % s) & (b % s)).count("1") for a, b in zip(i.tolist(), k.tolist())]
    assert h[i, k].tolist() == closed
    rows = torch.randint(0, n, (4,), generator=gen)
    if n <= 1024:
        assert_exact_hadamard(h)
    else:
        assert_rows_orthogonal(h, rows)
    # The fast transform reproduces those rows: e_r @ H == H[r].
    eye_rows = torch.zeros(len(rows), n, dtype=torch.float64)
    eye_rows[torch.arange(len(rows)), rows] = 1.0
    assert torch.equal(hadamard_transform(eye_rows, normalize=False), h[rows].to(torch.float64))


@pytest.mark.parametrize("n", [3, 6, 10, 92, 18945, 2**14 + 4])
def test_unsupported_size_names_nearest(n):
    below, above = nearest_hadamard_sizes(n)
    assert is_hadamard_size(above) and above > n
    assert below is None or (is_hadamard_size(below) and below < n)
    assert not any(is_hadamard_size(k) for k in range((below or 0) + 1, above))
    with pytest.raises(ValueError) as err:
        hadamard_matrix(n)
    message = str(err.value)
    assert f"n={n}" in message and f"{below} below" in message and f"{above} above" in message


@pytest.mark.parametrize("bad", [0, -4, 12.0, True, "12"])
def test_non_integer_or_nonpositive_order(bad):
    assert not is_hadamard_size(bad)
    with pytest.raises(ValueError, match="positive integer"):
        hadamard_matrix(bad)


def test_dtypes_and_fresh_copies():
    ref = hadamard_matrix(12, dtype=torch.int64)
    for dtype in (torch.int8, torch.int32, torch.float32, torch.float64):
        h = hadamard_matrix(12, dtype=dtype)
        assert h.dtype == dtype and torch.equal(h.to(torch.int64), ref)
    with pytest.raises(ValueError, match="dtype"):
        hadamard_matrix(12, dtype=torch.bool)
    # The cached base must not leak: mutating a result does not change the next one.
    hadamard_matrix(12, dtype=torch.int64).mul_(0)
    hadamard_matrix(24, dtype=torch.int64)[:12].zero_()
    assert torch.equal(hadamard_matrix(12, dtype=torch.int64), ref)


def test_sylvester_closed_form():
    n = 64
    s = sylvester_matrix(n, dtype=torch.int64)
    closed = torch.tensor([[(-1) ** bin(i & k).count("1") for k in range(n)] for i in range(n)])
    assert torch.equal(s, closed)
    assert torch.equal(hadamard_matrix(n, dtype=torch.int64), s)
    with pytest.raises(ValueError, match="power of two"):
        sylvester_matrix(12)


# ---------------------------------------------------------------- random Hadamard rotations


@settings(max_examples=20, deadline=None)
@given(n=st.sampled_from(SMALL_SIZES), seed=st.integers(0, 2**31 - 1))
def test_random_hadamard_orthogonal_and_sign_structure(n, seed):
    r = random_hadamard(n, seed=seed)
    assert r.dtype == torch.float64 and r.shape == (n, n)
    assert torch.linalg.matrix_norm(r.T @ r - torch.eye(n, dtype=torch.float64)) < 1e-10
    signs = random_signs(n, seed)
    assert torch.equal(signs.abs(), torch.ones(n, dtype=torch.float64))
    h = hadamard_matrix(n)
    # D multiplies rows: every row of R * sqrt(n) / H is one constant sign.
    ratio = r * math.sqrt(n) / h
    assert torch.allclose(ratio, signs[:, None].expand(n, n), rtol=0, atol=1e-12)
    assert torch.equal(random_hadamard(n, seed=seed), r)


def test_random_hadamard_seeds_differ_beyond_output_signs():
    """Two seeds must not differ only by flipping output channels (invisible to symmetric quantizers):
    R0.T @ R1 is a signed permutation exactly when they do."""
    n = 64
    m = random_hadamard(n, seed=0).T @ random_hadamard(n, seed=1)
    assert (m.abs() > 1e-9).sum(dim=1).max() > 1


def test_random_hadamard_seeds_and_dtype():
    n = 64
    assert not torch.equal(random_hadamard(n, seed=0), random_hadamard(n, seed=1))
    r32 = random_hadamard(n, seed=3, dtype=torch.float32)
    assert r32.dtype == torch.float32
    assert torch.linalg.matrix_norm(r32.T @ r32 - torch.eye(n)) < 1e-5
    with pytest.raises(ValueError, match="n=92"):
        random_hadamard(92)


# ---------------------------------------------------------------- fast transforms


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 256, 1024])
def test_fwht_matches_dense_sylvester(n):
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    dense = x @ hadamard_matrix(n) / math.sqrt(n)
    assert torch.allclose(fwht(x), dense, rtol=0, atol=1e-12)
    assert torch.allclose(hadamard_transform(x), dense, rtol=0, atol=1e-12)
    xi = torch.randint(-5, 6, (4, n), generator=torch.Generator().manual_seed(n))
    assert torch.equal(fwht(xi, normalize=False), xi @ hadamard_matrix(n, dtype=torch.int64))


@settings(max_examples=25, deadline=None)
@given(log_n=st.integers(0, 11), batch=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_fwht_involution_and_linear(log_n, batch, seed, a, b):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, batch, 2**log_n, dtype=torch.float64, generator=gen)
    assert torch.allclose(fwht(fwht(x)), x, rtol=0, atol=1e-12)
    assert torch.allclose(fwht(a * x + b * y), a * fwht(x) + b * fwht(y), rtol=0, atol=1e-11)
    assert torch.allclose(fwht(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


def test_fwht_gradient_is_the_transform():
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 32, dtype=torch.float64)
    (fwht(x) * g).sum().backward()
    assert torch.allclose(x.grad, fwht(g), rtol=0, atol=1e-12)  # H symmetric: d(x@H)/dx applied to g is g@H


def test_fwht_rejects_bad_input():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(3, 12))
    with pytest.raises(ValueError, match="floating"):
        fwht(torch.zeros(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="dimension"):
        fwht(torch.tensor(1.0))
    with pytest.raises(ValueError, match="n=92"):
        hadamard_transform(torch.zeros(2, 92))


@pytest.mark.parametrize("n", [12, 20, 24, 28, 40, 52, 76, 148, 156, 172, 344, 688])
def test_hadamard_transform_matches_dense(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=gen)
    y = hadamard_transform(x)
    assert y.shape == x.shape
    assert torch.allclose(y, x @ hadamard_matrix(n) / math.sqrt(n), rtol=0, atol=1e-12)
    assert torch.allclose(hadamard_transform(y.flip(-1)).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
