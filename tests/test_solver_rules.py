"""Update rules, re-projection accounting and stopping criteria of the solvers (issue 11, item 3).

* one step of every solver against a float64 reference of its update rule, written here from the
  formulas of ``docs/solvers.md`` (not by calling the solver's helpers);
* the exact-Cayley and geoopt solvers never re-project (a broken retraction would show up as
  re-projections, and ``SolveResult`` reports them);
* each stopping criterion of ``solve`` stops the run and is named in ``stop_reason``.
"""

from __future__ import annotations

import math

import pytest
import torch

from orthoopt.manifold import OrthogonalGroup, orthogonality_error
from orthoopt.objectives import FourthPower, WeightBlock
from orthoopt.solvers import SOLVERS, CayleySGD, initial_rotations, make_solver, orthogonal_procrustes, solve


def _toy(n: int = 24, dtype=torch.float64, seed: int = 0) -> FourthPower:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    W[:, [1, n // 2]] *= 12.0
    return FourthPower([WeightBlock(W.to(dtype), "R1", "in")], normalize=True)


def _start(n: int = 24, dtype=torch.float64) -> dict[str, torch.Tensor]:
    return initial_rotations({"R1": n}, "hadamard", seed=2, dtype=dtype)


def _vg(objective, R):
    value, grads = objective.value_and_grad({"R1": R})
    return float(value), grads["R1"]


def _cayley(R, P, tau):
    n = R.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    return torch.linalg.inv(eye - tau / 2 * P) @ (eye + tau / 2 * P) @ R


def _skew(A):
    return (A - A.T) / 2


def _reference_first_step(name: str, objective, R: torch.Tensor) -> torch.Tensor:
    """The first update of solver ``name`` (default settings) from ``R``, in float64, from the
    formulas of docs/solvers.md."""
    f0, G = _vg(objective, R)
    if name in ("cayley-sgd", "cayley-sgd-exact"):
        M = -G  # momentum starts at zero
        W = _skew(M @ R.T)  # W_hat - W_hat^T for square orthogonal R
        alpha = min(0.5, 2 * 0.5 / (float(torch.linalg.matrix_norm(W, ord=1)) + 1e-8))
        if name == "cayley-sgd-exact":
            return _cayley(R, W, alpha)
        Y = R + alpha * W @ R
        for _ in range(2):
            Y = R + alpha / 2 * W @ (R + Y)
        if orthogonality_error(Y) > 1e-10:  # the documented re-projection (polar, float64)
            U, _, Vh = torch.linalg.svd(Y)
            Y = U @ Vh
        return Y
    if name in ("cayley-bb", "cayley-lbfgs"):
        g = _skew(G @ R.T)  # gradient generator; the first step has no memory: P = -g, tau = 0.1 / ||g||
        gnorm2 = float((g * g).sum())
        tau, slope = 0.1 / math.sqrt(gnorm2), -gnorm2
        while True:
            Rn = _cayley(R, -g, tau)
            fn, _ = _vg(objective, Rn)
            if fn <= f0 + 1e-4 * tau * slope:
                return Rn
            tq = -slope * tau * tau / (2 * (fn - f0 - slope * tau))
            tau = min(max(tq, 0.1 * tau), 0.5 * tau)
    if name == "radam":  # canonical Stiefel: rgrad = G - R G^T R; Adam's first step; Cayley retraction
        rg = G - R @ G.T @ R
        # geoopt's second moment is the manifold's inner product (a scalar per matrix), here the
        # canonical one: <u, u> = tr(u^T (I - R R^T / 2) u)
        inner = float(torch.trace(rg.T @ (torch.eye(R.shape[0], dtype=R.dtype) - R @ R.T / 2) @ rg))
        m, v = 0.1 * rg, 0.001 * inner
        u = -0.02 * (m / 0.1) / (math.sqrt(v / 0.001) + 1e-8)
        return _cayley(R, u @ R.T - R @ u.T, 1.0)
    if name == "rsgd":  # geoopt seeds the buffer with the Euclidean gradient, then b = 0.9 b + rgrad
        rg = G - R @ G.T @ R
        b = 0.9 * G + rg
        u = -0.05 * b
        return _cayley(R, u @ R.T - R @ u.T, 1.0)
    if name == "procrustes":
        raise AssertionError("procrustes is tested separately")
    raise AssertionError(name)


SOLVER_SETTINGS = {
    "cayley-sgd": ("cayley-sgd", {}),
    "cayley-sgd-exact": ("cayley-sgd", {"iterative": False}),
    "cayley-bb": ("cayley-bb", {}),
    "cayley-lbfgs": ("cayley-lbfgs", {}),
    "radam": ("radam", {}),
    "rsgd": ("rsgd", {}),
}


def test_every_registered_solver_has_a_reference_update_rule():
    """A new solver of the registry fails here until its update rule is written out above (procrustes:
    :func:`test_procrustes_step_matches_svd_of_the_targets`)."""
    assert {name for name, _ in SOLVER_SETTINGS.values()} | {"procrustes"} == set(SOLVERS)


@pytest.mark.parametrize("label", sorted(SOLVER_SETTINGS))
def test_one_step_matches_a_float64_reference_of_the_update_rule(label):
    objective, R = _toy(), _start()["R1"]
    name, kw = SOLVER_SETTINGS[label]
    solver = make_solver(name, **kw)
    solver.init({"R1": R})
    loss = solver.step(objective)
    assert loss == pytest.approx(_vg(objective, R)[0], rel=1e-14)
    want = _reference_first_step(label, objective, R)
    got = solver.rotations["R1"]
    assert float((got - want).abs().max()) < 1e-10, f"{label}: the step differs from its update rule"
    assert float((got - R).abs().max()) > 1e-4  # it did move


def test_procrustes_step_matches_svd_of_the_targets():
    from orthoopt.objectives import DFRotLoss

    X = torch.randn(300, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    X[:, 3] *= 30
    objective = DFRotLoss({"R1": X})
    R = _start(16)["R1"]
    solver = make_solver("procrustes")
    solver.init({"R1": R})
    A, B = objective.procrustes_targets({"R1": R})["R1"]
    U, _, Vh = torch.linalg.svd(A.T.double() @ B.double())
    solver.step(objective)
    assert torch.allclose(solver.rotations["R1"], U @ Vh, atol=1e-12, rtol=0)
    assert torch.allclose(orthogonal_procrustes(A, B), U @ Vh, atol=1e-12, rtol=0)


def _ip(a, b):
    return float((a * b).sum())


def _line_search(objective, R, f, g, P, tau, C):
    """docs/solvers.md's accepted trial along the exact Cayley curve from ``R`` in direction ``P``:
    ``f(R(tau)) <= C + 1e-4 tau <g, P>``, else the safeguarded quadratic step. ``(R(tau), g(tau), tau)``."""
    slope = _ip(g, P)
    while True:
        Rn = _cayley(R, P, tau)
        fn, Gn = _vg(objective, Rn)
        if fn <= C + 1e-4 * tau * slope:
            return Rn, _skew(Gn @ Rn.T), tau, fn
        tq = -slope * tau * tau / (2 * (fn - f - slope * tau))
        tau = min(max(tq, 0.1 * tau), 0.5 * tau)


def _reference_two_steps(name, objective, R0):
    """The first two iterates of cayley-bb / cayley-lbfgs (default settings) from docs/solvers.md."""
    f0, G0 = _vg(objective, R0)
    g0 = _skew(G0 @ R0.T)
    R1, g1, tau, f1 = _line_search(objective, R0, f0, g0, -g0, 0.1 / math.sqrt(_ip(g0, g0)), f0)
    s, y = -tau * g0, g1 - g0
    sy = _ip(s, y)
    if name == "cayley-bb":  # second step: tau = <s,s> / |<s,y>|, nonmonotone C_1 = (0.85 f0 + f1) / 1.85
        C1 = (0.85 * f0 + f1) / 1.85
        R2, *_ = _line_search(objective, R1, f1, g1, -g1, _ip(s, s) / abs(sy), C1)
    else:  # L-BFGS two-loop recursion with the one pair (s, y), H0 = <s,y>/<y,y> I, trial tau = 1
        a = _ip(s, g1) / sy
        q = g1 - a * y
        r = (sy / _ip(y, y)) * q
        r = r + (a - _ip(y, r) / sy) * s
        R2, *_ = _line_search(objective, R1, f1, g1, -r, 1.0, f1)
    return R1, R2


@pytest.mark.parametrize("name", ["cayley-bb", "cayley-lbfgs"])
def test_two_line_search_steps_match_a_float64_reference(name):
    # the second step uses the memory (BB step size / L-BFGS direction): a wrong retraction or a
    # wrong transport of s and y changes it
    objective, R0 = _toy(), _start()["R1"]
    solver = make_solver(name, ortho_tol=1.0)  # no re-projection can hide a broken step
    solver.init({"R1": R0})
    want1, want2 = _reference_two_steps(name, objective, R0)
    solver.step(objective)
    torch.testing.assert_close(solver.rotations["R1"], want1, rtol=0, atol=1e-12)
    solver.step(objective)
    torch.testing.assert_close(solver.rotations["R1"], want2, rtol=0, atol=1e-11)
    assert float((want2 - want1).abs().max()) > 1e-4  # the second step moved
    assert solver.num_reorthogonalizations == 0


@pytest.mark.parametrize("label", ["cayley-sgd-exact", "cayley-bb", "cayley-lbfgs"])
def test_exact_cayley_iterates_are_orthogonal_to_1e_12_without_any_reprojection(label):
    # ortho_tol=1 switches re-projection off in practice: what is checked is the retraction itself.
    # Each update C = R_{k+1} R_k^T must be a Cayley transform: orthogonal, with a skew generator
    # X = (C - I)(C + I)^{-1} (an Euler step R + a W R gives neither).
    name, kw = SOLVER_SETTINGS[label]
    objective, R = _toy(), _start()["R1"]
    solver = make_solver(name, **kw, ortho_tol=1.0)
    solver.init({"R1": R})
    eye = torch.eye(R.shape[0], dtype=torch.float64)
    for _ in range(6):
        solver.step(objective)
        new = solver.rotations["R1"]
        assert orthogonality_error(new) < 1e-12
        C = new @ R.T
        X = (C - eye) @ torch.linalg.inv(C + eye)
        assert float((X + X.T).abs().max()) < 1e-12 * max(1.0, float(X.abs().max()))
        R = new
    assert solver.num_reorthogonalizations == 0
    assert float(objective.loss({"R1": R})) < float(objective.loss(_start()))


def test_cayley_sgd_exact_step_is_the_closed_form_cayley_transform():
    # one step, momentum 0, lr below the clip: (I - a/2 W)^{-1} (I + a/2 W) R with W = -skew(G R^T),
    # the transform written here with an explicit inverse (not the library's solve)
    objective, R = _toy(), _start()["R1"]
    solver = CayleySGD(lr=1e-2, momentum=0.0, iterative=False, ortho_tol=1.0)
    solver.init({"R1": R})
    _, G = _vg(objective, R)
    W = -_skew(G @ R.T)
    a = min(1e-2, 1.0 / (float(torch.linalg.matrix_norm(W, ord=1)) + 1e-8))
    solver.step(objective)
    eye = torch.eye(R.shape[0], dtype=torch.float64)
    want = torch.linalg.inv(eye - a / 2 * W) @ (eye + a / 2 * W) @ R
    assert solver.last_step_sizes["R1"] == a
    torch.testing.assert_close(solver.rotations["R1"], want, rtol=0, atol=1e-13)
    assert orthogonality_error(solver.rotations["R1"]) < 1e-13 and solver.num_reorthogonalizations == 0


@pytest.mark.parametrize("label, dtype", [
    *[(s, d) for s in ("cayley-sgd-exact", "cayley-bb", "cayley-lbfgs") for d in (torch.float32, torch.float64)],
    # geoopt computes its Cayley step in the parameter's dtype: exact in float64; in float32 its
    # rounding drifts past the float32 tolerance within tens of steps (re-projected and counted)
    ("radam", torch.float64), ("rsgd", torch.float64),
])
def test_exact_cayley_and_geoopt_solvers_never_reproject(label, dtype):
    objective, start = _toy(48, dtype), _start(48, dtype)
    name, kw = SOLVER_SETTINGS[label]
    result = solve(objective, start, make_solver(name, **kw), 60, progress=False)
    assert result.num_reorthogonalizations == 0, f"{label} needed re-projection: its retraction is not exact"
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert result.orthogonality_error < tol
    assert result.final_loss < result.history[0]


class _EulerGroup(OrthogonalGroup):
    """O(n) with a broken retraction: the exact Cayley step replaced by a plain Euler step ``R + a W R``."""

    def cayley(self, R, W, step):
        return R + step * W @ R


class _EulerSGD(CayleySGD):
    """A broken Cayley SGD: every solver reaches the retraction through ``self.group``."""

    group = _EulerGroup()

    def __init__(self):
        super().__init__(iterative=False)


def test_a_broken_retraction_is_reported_not_hidden():
    result = solve(_toy(), _start(), _EulerSGD(), 10, progress=False)
    assert result.num_reorthogonalizations > 0  # the re-projection happened, and it is on record
    assert result.orthogonality_error < 1e-10


def test_counters_and_final_loss():
    objective = _toy()
    r = solve(objective, _start(), "cayley-sgd", 7, progress=False)
    assert (r.steps, r.num_evaluations, r.stop_reason) == (7, 7, "max_steps")
    r = solve(objective, _start(), "cayley-lbfgs", 7, progress=False)
    assert r.num_evaluations >= 8  # the start plus at least one trial per step
    assert r.final_loss == pytest.approx(float(objective.loss(r.rotations)), rel=1e-12)
    assert r.grad_norm is not None and r.grad_norm > 0


def test_stop_min_grad_norm():
    objective = _toy(16)
    r = solve(objective, _start(16), "cayley-lbfgs", 500, progress=False, min_grad_norm=1e-3)
    assert r.stop_reason == "min_grad_norm" and r.steps < 500
    assert r.grad_norm <= 1e-3


def test_stop_min_rel_decrease():
    objective = _toy(16)
    r = solve(objective, _start(16), "cayley-sgd", 2000, progress=False, min_rel_decrease=1e-4, window=5)
    assert r.stop_reason == "min_rel_decrease" and r.steps < 2000
    h = r.history
    assert h[-6] - h[-1] <= 1e-4 * abs(h[-6])
    assert all(h[i - 5] - h[i] > 1e-4 * abs(h[i - 5]) for i in range(5, len(h) - 1))  # not earlier


def test_stop_max_seconds_callback_and_stalled():
    objective = _toy(16)
    r = solve(objective, _start(16), "cayley-sgd", 1000, progress=False, max_seconds=0.0)
    assert (r.stop_reason, r.steps) == ("max_seconds", 1)
    r = solve(objective, _start(16), "cayley-sgd", 1000, progress=False, callback=lambda i, loss, rots: i == 3)
    assert (r.stop_reason, r.steps) == ("callback", 4)
    flat = FourthPower([WeightBlock(torch.zeros(8, 16, dtype=torch.float64), "R1", "in")])
    r = solve(flat, _start(16), "cayley-bb", 50, progress=False)  # zero gradient: nothing to do
    assert r.stop_reason == "stalled" and r.steps == 2


def test_bad_stopping_arguments():
    for kw in ({"min_grad_norm": -1}, {"min_rel_decrease": "x"}, {"window": 0}, {"max_seconds": float("nan")}):
        with pytest.raises(ValueError):
            solve(_toy(8), _start(8), "cayley-sgd", 3, progress=False, **kw)
