"""orthoopt.manifold: sampling, tangent projection, retractions (float64 to 1e-10, float32 to 1e-5)."""

import math

import geoopt
import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orthoopt.core.tolerance import check_orthogonal, orthogonality_tolerance
from orthoopt.manifold import (
    O_N,
    cayley_retraction,
    cayley_retraction_iterative,
    orthogonality_error,
    project_tangent,
    random_orthogonal,
    reorthogonalize,
    skew,
)


def qr_retraction(R, xi, step):
    """The QR retraction (geoopt's EuclideanStiefel.retr) as orthoopt computes it."""
    return reorthogonalize(R + step * xi, "qr")


def polar_retraction(R, xi, step):
    return reorthogonalize(R + step * xi, "polar")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
sizes = st.integers(min_value=1, max_value=12)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
dtypes = st.sampled_from([torch.float64, torch.float32])


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def random_skew(n, seed, dtype=torch.float64):
    A = randn(n, n, seed=seed)
    return (A - A.T).to(dtype)


def inner(a, b):
    return float((a * b).sum())


# -- sampling and measuring -------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(n=sizes, seed=seeds, dtype=dtypes)
def test_random_orthogonal_is_orthogonal_and_seeded(n, seed, dtype):
    R = random_orthogonal(n, seed, dtype=dtype)
    assert R.shape == (n, n) and R.dtype == dtype
    assert orthogonality_error(R) < TOL[dtype]
    assert torch.equal(R, random_orthogonal(n, seed, dtype=dtype))


def test_random_orthogonal_seeds_differ_and_dtypes_agree():
    a, b = random_orthogonal(6, 0), random_orthogonal(6, 1)
    assert not torch.allclose(a, b)
    assert torch.allclose(random_orthogonal(6, 0, dtype=torch.float32).double(), a, atol=1e-7, rtol=0)


def test_random_orthogonal_is_haar_not_raw_qr():
    # Haar on O(2): Q[0, 0] = cos(theta), theta uniform, so mean 0, mean square 1/2, det +-1 equally
    # often. Raw Householder QR (no sign fix) gives Q[0, 0] < 0 always.
    k = 400
    samples = [random_orthogonal(2, s) for s in range(k)]
    first = torch.stack([Q[0, 0] for Q in samples])
    assert abs(float(first.mean())) < 4 * math.sqrt(0.5 / k)
    assert abs(float(first.square().mean()) - 0.5) < 4 * math.sqrt(0.125 / k)
    dets = torch.stack([torch.linalg.det(Q) for Q in samples])
    assert 0.4 < float((dets > 0).double().mean()) < 0.6  # both components of O(n)


def test_random_orthogonal_rejects_bad_size():
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="positive int"):
            random_orthogonal(bad)


def test_orthogonality_error_values():
    assert orthogonality_error(torch.eye(5)) == 0.0
    assert orthogonality_error(2 * torch.eye(4, dtype=torch.float64)) == pytest.approx(3 * math.sqrt(4))
    # computed in float64 even for a float32 input: I + e1 e1^T * 1e-4 has error ~2e-4
    R = torch.eye(3, dtype=torch.float32)
    R[0, 0] += 1e-4
    expected = (1 + 1e-4) ** 2 - 1
    assert orthogonality_error(R) == pytest.approx(float(np.float32(1 + 1e-4)) ** 2 - 1, rel=1e-9)
    assert orthogonality_error(R) == pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="square"):
        orthogonality_error(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="floating"):
        orthogonality_error(torch.eye(3, dtype=torch.int64))


def test_orthogonality_tolerance_is_one_policy():
    assert orthogonality_tolerance(4096, torch.float64) == 1e-10
    assert orthogonality_tolerance(16, torch.float32) == 1e-5
    # large float32 rotations: above the rounding floor of a stored rotation
    floor = orthogonality_error(random_orthogonal(256).float())
    assert orthogonality_tolerance(256, torch.float32) > 1e-5 and orthogonality_tolerance(256, torch.float32) > 10 * floor
    with pytest.raises(ValueError, match="float32 or float64"):
        orthogonality_tolerance(8, torch.bfloat16)
    # the same number everywhere: the group, write-back, solve's init check
    from orthoopt.adapters.writeback import orthogonality_tolerance as writeback_tolerance

    assert O_N.tolerance(576, torch.float32) == writeback_tolerance(576, torch.float32) == orthogonality_tolerance(576, torch.float32)


def test_check_orthogonal_names_the_rotation_and_its_error():
    R = random_orthogonal(8, 0)
    assert check_orthogonal(R, "R1") == orthogonality_error(R)
    bad = R + 1e-7 * randn(8, 8, seed=1)
    err = orthogonality_error(bad)
    with pytest.raises(ValueError, match=rf"rotation 'R2.3' is not orthogonal: .* = {err:.3e} > tolerance 1.000e-10"):
        check_orthogonal(bad, "R2.3")
    assert check_orthogonal(bad, "R2.3", tol=1e-3) == err
    check_orthogonal(bad.float(), "R1")  # float32: ~1e-6 is below its tolerance
    with pytest.raises(ValueError, match="'R1' has NaN"):
        check_orthogonal(torch.full((2, 2), float("nan")), "R1")
    with pytest.raises(ValueError, match="square"):
        check_orthogonal(torch.zeros(2, 3), "R1")


# -- tangent space --------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(n=sizes, seed=seeds)
def test_project_tangent_is_tangent_idempotent_and_matches_geoopt(n, seed):
    R = random_orthogonal(n, seed)
    G = randn(n, n, seed=seed + 1)
    xi = project_tangent(R, G)
    assert torch.linalg.matrix_norm(R.T @ xi + xi.T @ R) < 1e-12 * (1 + G.norm())  # tangent
    assert torch.allclose(project_tangent(R, xi), xi, atol=1e-12, rtol=0)  # idempotent
    assert torch.allclose(xi, geoopt.EuclideanStiefel().proju(R, G), atol=1e-12, rtol=0)
    assert torch.allclose(xi, skew(G @ R.T) @ R, atol=1e-12, rtol=0)  # left generator form
    # orthogonal projection: the residual is normal to every tangent vector
    other = project_tangent(R, randn(n, n, seed=seed + 2))
    assert abs(inner(G - xi, other)) < 1e-10 * (1 + G.norm() * other.norm())


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 8), seed=seeds)
def test_riemannian_grad_represents_the_derivative(n, seed):
    # f(R) = <C, R>: its derivative along a tangent xi is <C, xi> = <rgrad, xi> (Euclidean metric)
    R = random_orthogonal(n, seed)
    C = randn(n, n, seed=seed + 1)
    xi = project_tangent(R, randn(n, n, seed=seed + 2))
    rgrad = O_N.egrad2rgrad(R, C)
    assert inner(rgrad, xi) == pytest.approx(inner(C, xi), abs=1e-10)
    assert torch.allclose(O_N.generator(R, C) @ R, rgrad, rtol=0, atol=1e-12)  # left generator form
    assert O_N.grad_norm(R, C) == pytest.approx(float(rgrad.norm()), rel=1e-12)
    # geoopt's canonical metric is half the Euclidean one on O(n): its gradient is twice ours
    assert torch.allclose(geoopt.CanonicalStiefel().egrad2rgrad(R, C), 2 * rgrad, rtol=0, atol=1e-12)


def test_tangent_shape_errors():
    with pytest.raises(ValueError, match="shape of R"):
        project_tangent(torch.eye(3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="square"):
        project_tangent(torch.zeros(3, 2), torch.zeros(3, 2))


# -- retractions ----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(n=sizes, seed=seeds, dtype=dtypes, step=st.floats(-3.0, 3.0))
def test_retractions_stay_orthogonal(n, seed, dtype, step):
    R = random_orthogonal(n, seed, dtype=dtype)
    W = random_skew(n, seed + 1, dtype)
    xi = W @ R
    for Y in (cayley_retraction(R, W, step), qr_retraction(R, xi, step), polar_retraction(R, xi, step)):
        assert Y.dtype == dtype and Y.shape == (n, n)
        assert orthogonality_error(Y) < TOL[dtype]


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 10), seed=seeds)
def test_retractions_are_first_order(n, seed):
    # Retr_R(0) = R and d/dt Retr_R(t xi) at 0 = xi (central differences, error O(t^2))
    R = random_orthogonal(n, seed)
    W = random_skew(n, seed + 1) / n
    xi = W @ R
    t = 1e-4
    for retr, arg in ((cayley_retraction, W), (qr_retraction, xi), (polar_retraction, xi)):
        assert torch.allclose(retr(R, arg, 0.0), R, atol=1e-13, rtol=0)
        derivative = (retr(R, arg, t) - retr(R, arg, -t)) / (2 * t)
        assert torch.allclose(derivative, xi, atol=1e-6, rtol=0), getattr(retr, '__name__', str(retr))


def test_cayley_multiplies_from_the_left():
    # (I - W/2)^{-1} (I + W/2) is orthogonal; the step is that factor applied to R from the left
    R = random_orthogonal(5, 3)
    W = random_skew(5, 4) / 5
    eye = torch.eye(5, dtype=torch.float64)
    C = torch.linalg.inv(eye - 0.35 * W) @ (eye + 0.35 * W)
    assert torch.allclose(cayley_retraction(R, W, 0.7), C @ R, atol=1e-13, rtol=0)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 10), seed=seeds, step=st.floats(0.05, 1.0))
def test_cayley_fixed_point_converges_to_exact(n, seed, step):
    R = random_orthogonal(n, seed)
    W = random_skew(n, seed + 1)
    W = W / float(torch.linalg.matrix_norm(W, ord=2))  # ||step W / 2|| <= 1/2: a contraction
    exact = cayley_retraction(R, W, step)
    errors = [float((cayley_retraction_iterative(R, W, step, s) - exact).norm()) for s in (1, 2, 4, 8, 40)]
    assert errors[-1] < 1e-12
    assert all(b <= a * 0.51 + 1e-14 for a, b in zip(errors, errors[1:]))  # at least halves per doubling
    # orthogonal only approximately, and better with more iterations
    assert orthogonality_error(cayley_retraction_iterative(R, W, step, 40)) < 1e-10


def test_cayley_rejects_non_skew_generator():
    R = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="skew"):
        cayley_retraction(R, torch.ones(3, 3, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="skew"):
        cayley_retraction_iterative(R, torch.ones(3, 3, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="shape of R"):
        cayley_retraction(R, torch.zeros(2, 2, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="n_iters"):
        cayley_retraction_iterative(R, torch.zeros(3, 3, dtype=torch.float64), 0.1, n_iters=0)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 10), seed=seeds, dtype=dtypes)
def test_reorthogonalize(n, seed, dtype):
    Q = random_orthogonal(n, seed)
    noisy = (Q + 1e-3 * randn(n, n, seed=seed + 1)).to(dtype)
    polar = reorthogonalize(noisy)
    qr = reorthogonalize(noisy, method="qr")
    for Y in (polar, qr):
        assert Y.dtype == dtype and orthogonality_error(Y) < TOL[dtype]
    # the polar factor is the nearest orthogonal matrix: scipy agrees, and it beats Q
    U, _ = scipy.linalg.polar(noisy.double().numpy())
    assert np.allclose(polar.double().numpy(), U, atol=10 * TOL[dtype], rtol=0)
    assert (polar.double() - noisy.double()).norm() <= (Q - noisy.double()).norm() + 1e-6
    # an orthogonal matrix is a fixed point
    assert torch.allclose(reorthogonalize(Q), Q, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="method"):
        reorthogonalize(Q, method="svd")


def test_qr_projection_is_geoopts_qr_retraction_and_polar_factor_is_procrustes():
    R = random_orthogonal(6, 5)
    xi = project_tangent(R, randn(6, 6, seed=6))
    want = geoopt.EuclideanStiefel().retr(R, 0.3 * xi)
    torch.testing.assert_close(qr_retraction(R, xi, 0.3), want, rtol=0, atol=1e-12)
    M = randn(6, 6, seed=7)
    U, _ = scipy.linalg.polar(M.numpy())
    torch.testing.assert_close(O_N.polar_factor(M), torch.from_numpy(U), rtol=0, atol=1e-12)
