"""orthoopt.solvers: the solvers, Procrustes, initial rotations and ``solve`` on small test objectives."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orthoopt.core.tolerance import orthogonality_tolerance
from orthoopt.manifold import (
    cayley_retraction,
    orthogonality_error,
    project_tangent,
    random_orthogonal,
    skew,
)
from orthoopt.objectives.base import Objective
from orthoopt.solvers import (
    SOLVERS,
    CayleySGD,
    NonFiniteLossError,
    ProcrustesAlternation,
    RiemannianAdam,
    RiemannianSGD,
    SolveResult,
    derived_seed,
    initial_rotations,
    make_solver,
    orthogonal_procrustes,
    solve,
)

F64 = torch.float64


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def special_orthogonal(n, seed):
    """A random rotation with det +1 (reachable from the identity by a continuous path)."""
    R = random_orthogonal(n, seed)
    if torch.linalg.det(R) < 0:
        R[:, 0] = -R[:, 0]
    return R


# -- test objectives --------------------------------------------------------------------------


class LinearTrace(Objective):
    """``L(R) = -<M, R>`` with ``M = R_true @ diag(s)``, ``s > 0``: minimized on O(n) exactly at
    ``R_true`` (the polar factor of ``M``), with value ``-sum(s)``."""

    def __init__(self, R_true, s, name="R"):
        self.M, self.name, self.optimum = R_true @ torch.diag(s), name, -float(s.sum())

    @property
    def dims(self):
        return {self.name: self.M.shape[0]}

    def loss(self, rotations):
        return -(self.M.to(rotations[self.name].dtype) * rotations[self.name]).sum()


class LeastSquares(Objective):
    """``L(R) = ||A @ R - B||_F^2``; implements the Procrustes protocol with the fixed target ``B``."""

    def __init__(self, A, B, name="R"):
        self.A, self.B, self.name = A, B, name

    @property
    def dims(self):
        return {self.name: self.A.shape[1]}

    def loss(self, rotations):
        R = rotations[self.name]
        return (self.A.to(R.dtype) @ R - self.B.to(R.dtype)).square().sum()

    def procrustes_targets(self, rotations):
        return {self.name: (self.A, self.B)}


class GridQuantization(Objective):
    """DFRot-style toy: ``L(R) = ||A @ R - round(A @ R / h) * h||_F^2``; the target is the rounded ``A @ R``."""

    def __init__(self, A, h=0.5, name="R"):
        self.A, self.h, self.name = A, h, name

    @property
    def dims(self):
        return {self.name: self.A.shape[1]}

    def _quantized(self, Y):
        return torch.round(Y / self.h) * self.h

    def loss(self, rotations):
        Y = self.A @ rotations[self.name]
        return (Y - self._quantized(Y.detach())).square().sum()

    def procrustes_targets(self, rotations):
        return {self.name: (self.A, self._quantized(self.A @ rotations[self.name]))}


class NaNAfter(Objective):
    """Wraps an objective and returns NaN from call ``k`` on."""

    def __init__(self, inner, k):
        self.inner, self.k, self.calls = inner, k, 0

    @property
    def dims(self):
        return self.inner.dims

    def loss(self, rotations):
        return self.inner.loss(rotations)

    def value_and_grad(self, rotations):
        self.calls += 1
        value, grads = self.inner.value_and_grad(rotations)
        return (value * float("nan") if self.calls > self.k else value), grads


class ProcrustesTrace(LinearTrace):
    """:class:`LinearTrace` with Procrustes targets: ``||I R - M||_F^2 = const - 2 <M, R>`` on O(n), so
    the closed-form step is the polar factor of ``M``, ``R_true``."""

    def procrustes_targets(self, rotations):
        return {self.name: (torch.eye(self.M.shape[0], dtype=self.M.dtype), self.M)}


@pytest.fixture
def trace_problem():
    n = 6
    R_true = special_orthogonal(n, 11)
    return LinearTrace(R_true, torch.linspace(1.0, 2.0, n, dtype=F64)), R_true


def _trace_for(name, problem):
    """The trace problem in the form solver ``name`` can run (procrustes needs targets)."""
    objective, R_true = problem
    if name == "procrustes":
        return ProcrustesTrace(R_true, torch.linspace(1.0, 2.0, R_true.shape[0], dtype=F64)), R_true
    return objective, R_true


# settings beyond the defaults under which each solver is also checked; every solver of the registry
# runs with its defaults (a new solver enrols itself)
VARIANTS = {
    "cayley-sgd": [{"iterative": False}],
    "radam": [{"lr": 0.05}, {"lr": 0.05, "canonical": False}],
    "rsgd": [{"canonical": False}],
}
GRADIENT_SOLVERS = [(name, kw) for name in SOLVERS for kw in [{}, *VARIANTS.get(name, [])]]


def test_variants_name_registered_solvers():
    assert GRADIENT_SOLVERS and set(VARIANTS) <= set(SOLVERS)


# -- gradient solvers ------------------------------------------------------------------------


@pytest.mark.parametrize("name,kw", GRADIENT_SOLVERS, ids=[f"{n}{kw or ''}" for n, kw in GRADIENT_SOLVERS])
def test_every_solver_stays_orthogonal_and_finds_the_optimum(name, kw, trace_problem):
    objective, R_true = _trace_for(name, trace_problem)
    errors = []
    result = solve(
        objective, "identity", make_solver(name, **kw), 200, progress=False, dtype=F64,
        callback=lambda i, loss, rots: errors.append(orthogonality_error(rots["R"])),
    )
    assert len(errors) == 200 and max(errors) < 1e-10
    assert result.orthogonality_error < 1e-10
    assert result.final_loss < result.history[0]
    assert result.final_loss == pytest.approx(objective.optimum, abs=1e-6)
    assert torch.allclose(result.rotations["R"], R_true, atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_float32_solvers_stay_within_tolerance(name, trace_problem):
    objective, _ = _trace_for(name, trace_problem)
    errors = []
    result = solve(objective, "random", name, 100, progress=False,
                   callback=lambda i, loss, rots: errors.append(orthogonality_error(rots["R"])))
    assert result.rotations["R"].dtype == torch.float32
    assert max(errors) < 1e-5
    assert result.final_loss < result.history[0]


def test_cayley_sgd_first_step_is_the_cayley_step_of_the_riemannian_gradient():
    # momentum 0 and lr below the clip: R1 = Cayley(lr W) @ R0 with W = -skew(G R0^T), whose tangent is
    # W @ R0 = -project_tangent(R0, G).
    n, lr = 5, 1e-3
    objective = LinearTrace(special_orthogonal(n, 1), torch.ones(n, dtype=F64))
    R0 = random_orthogonal(n, 2)
    solver = CayleySGD(lr=lr, momentum=0.0, iterative=False)
    solver.init({"R": R0})
    loss = solver.step(objective)
    assert loss == pytest.approx(float(objective.loss({"R": R0})))  # the loss *before* the step
    _, grads = objective.value_and_grad({"R": R0})
    W = -skew(grads["R"] @ R0.T)
    assert torch.allclose(W @ R0, -project_tangent(R0, grads["R"]), atol=1e-14, rtol=0)
    assert solver.last_step_sizes["R"] == lr
    assert torch.allclose(solver.rotations["R"], cayley_retraction(R0, W, lr), atol=1e-14, rtol=0)


def test_cayley_sgd_clips_the_step_and_iterative_matches_exact():
    # a huge gradient scale: the step becomes 2q / ||W||_1, and the iterates of the fixed-point and
    # exact variants agree up to re-projection rounding over a few steps
    n = 6
    big = LinearTrace(special_orthogonal(n, 3), torch.full((n,), 1e6, dtype=F64))
    start = {"R": random_orthogonal(n, 4)}
    solvers = {k: CayleySGD(lr=1.0, iterative=k == "iterative", n_iters=60) for k in ("iterative", "exact")}
    for s in solvers.values():
        s.init(start)
        for _ in range(5):
            s.step(big)
        alpha = s.last_step_sizes["R"]
        assert alpha < 1.0
    R_it, R_ex = solvers["iterative"].rotations["R"], solvers["exact"].rotations["R"]
    assert torch.allclose(R_it, R_ex, atol=1e-9, rtol=0)


def test_cayley_step_size_bound_is_2q_over_norm():
    n = 4
    objective = LinearTrace(special_orthogonal(n, 5), torch.full((n,), 1e3, dtype=F64))
    R0 = random_orthogonal(n, 6)
    solver = CayleySGD(lr=10.0, momentum=0.0, q=0.25, iterative=False)
    solver.init({"R": R0})
    solver.step(objective)
    _, grads = objective.value_and_grad({"R": R0})
    W = -skew(grads["R"] @ R0.T)
    expected = 2 * 0.25 / (float(torch.linalg.matrix_norm(W, ord=1)) + solver.epsilon)
    assert solver.last_step_sizes["R"] == pytest.approx(expected, rel=1e-12)


def test_momentum_speeds_up_cayley_sgd(trace_problem):
    objective, _ = trace_problem
    gaps = {}
    for beta in (0.0, 0.9):
        r = solve(objective, "identity", CayleySGD(lr=0.02, momentum=beta), 40, progress=False, dtype=F64)
        gaps[beta] = r.final_loss - objective.optimum
    assert gaps[0.9] < 0.5 * gaps[0.0]


def test_geoopt_state_is_reset_by_init(trace_problem):
    objective, _ = trace_problem
    start = initial_rotations(objective.dims, "random", dtype=F64)
    solver = RiemannianAdam(lr=0.05)
    solver.init(start)
    first = [solver.step(objective) for _ in range(5)]
    solver.init(start)  # fresh moments: the same trajectory again
    second = [solver.step(objective) for _ in range(5)]
    assert first == second
    assert solver.num_steps == 5


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solvers_leave_rotations_without_gradient_alone(name, trace_problem):
    objective, _ = _trace_for(name, trace_problem)
    extra = random_orthogonal(3, 9)
    solver = make_solver(name)
    solver.init({"R": torch.eye(6, dtype=F64), "other": extra})
    for _ in range(3):
        solver.step(objective)
    assert torch.equal(solver.rotations["other"], extra)
    assert not torch.equal(solver.rotations["R"], torch.eye(6, dtype=F64))


def test_solver_argument_errors(trace_problem):
    objective, _ = trace_problem
    with pytest.raises(ValueError, match="init"):
        CayleySGD().step(objective)
    with pytest.raises(ValueError, match="lr"):
        CayleySGD(lr=0)
    with pytest.raises(ValueError, match="momentum"):
        CayleySGD(momentum=1.0)
    with pytest.raises(ValueError, match="q"):
        CayleySGD(q=1.5)
    with pytest.raises(ValueError, match="betas"):
        RiemannianAdam(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov"):
        RiemannianSGD(momentum=0, nesterov=True)
    with pytest.raises(ValueError, match="float32 or float64"):
        CayleySGD().init({"R": torch.eye(6, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="square"):
        CayleySGD().init({"R": torch.zeros(6, 5)})
    solver = CayleySGD()
    solver.init({"Q": torch.eye(6, dtype=F64)})
    with pytest.raises(ValueError, match="needs rotations"):
        solver.step(objective)


def test_nan_loss_raises_and_keeps_rotations(trace_problem):
    objective, _ = trace_problem
    solver = CayleySGD()
    solver.init({"R": torch.eye(6, dtype=F64)})
    bad = NaNAfter(objective, 2)
    solver.step(bad)
    solver.step(bad)
    before = solver.rotations["R"]
    with pytest.raises(NonFiniteLossError, match="step 2"):
        solver.step(bad)
    assert torch.equal(solver.rotations["R"], before)


# -- Procrustes ---------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 8), extra=st.integers(0, 10), seed=st.integers(0, 2**31 - 1))
def test_orthogonal_procrustes_recovers_planted_rotation(n, extra, seed):
    A = randn(n + extra, n, seed=seed)
    R_true = random_orthogonal(n, seed + 1)
    R = orthogonal_procrustes(A, A @ R_true)
    assert orthogonality_error(R) < 1e-10
    assert torch.allclose(R, R_true, atol=1e-8, rtol=0)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 10), n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_orthogonal_procrustes_matches_scipy_and_is_optimal(m, n, seed):
    A, B = randn(m, n, seed=seed), randn(m, n, seed=seed + 1)
    R = orthogonal_procrustes(A, B)
    R_scipy, _ = scipy.linalg.orthogonal_procrustes(A.numpy(), B.numpy())
    # the minimizer is unique when A.T @ B is nonsingular (m >= n); compare the attained value always
    value = float((A @ R - B).norm())
    assert value == pytest.approx(float(np.linalg.norm(A.numpy() @ R_scipy - B.numpy())), abs=1e-9)
    if m >= n:
        assert np.allclose(R.numpy(), R_scipy, atol=1e-8, rtol=0)
    for s in range(5):  # no random rotation does better
        assert value <= float((A @ random_orthogonal(n, seed + 2 + s) - B).norm()) + 1e-12


def test_orthogonal_procrustes_errors_and_dtype():
    with pytest.raises(ValueError, match="same shape"):
        orthogonal_procrustes(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="floating"):
        orthogonal_procrustes(torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64))
    R = orthogonal_procrustes(torch.randn(5, 3), torch.randn(5, 3))
    assert R.dtype == torch.float32 and orthogonality_error(R) < 1e-5


def test_procrustes_alternation_solves_least_squares_in_one_step():
    n = 5
    A = randn(20, n, seed=1)
    R_true = random_orthogonal(n, 2)
    objective = LeastSquares(A, A @ R_true)
    result = solve(objective, "random", "procrustes", 2, progress=False, dtype=F64)
    assert result.history[0] > 1.0 and result.history[1] < 1e-20
    assert torch.allclose(result.rotations["R"], R_true, atol=1e-10, rtol=0)


def test_procrustes_alternation_is_monotone_on_grid_quantization():
    objective = GridQuantization(randn(40, 6, seed=3), h=0.5)
    result = solve(objective, "random", ProcrustesAlternation(), 15, progress=False, dtype=F64, seed=4)
    h = result.history + [result.final_loss]
    assert all(b <= a + 1e-12 for a, b in zip(h, h[1:]))
    assert result.final_loss < 0.9 * h[0]
    assert result.orthogonality_error < 1e-10


def test_procrustes_alternation_needs_targets(trace_problem):
    from orthoopt.objectives import SupportsProcrustes
    from orthoopt.solvers import ProcrustesUnsupportedError

    objective, _ = trace_problem
    assert not isinstance(objective, SupportsProcrustes)
    assert isinstance(LeastSquares(randn(5, 3, seed=0), randn(5, 3, seed=1)), SupportsProcrustes)
    with pytest.raises(TypeError, match=r"procrustes_targets.*LinearTrace has none") as e:
        solve(objective, "identity", "procrustes", 3, progress=False)
    assert isinstance(e.value, ProcrustesUnsupportedError) and isinstance(e.value, ValueError)  # CLI: exit 2


def test_objective_is_an_abc():
    class NoLoss(Objective):
        @property
        def dims(self):
            return {"R": 2}

    with pytest.raises(TypeError, match="abstract"):
        NoLoss()
    with pytest.raises(TypeError, match="abstract"):
        Objective()


# -- initial rotations ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["identity", "random", "hadamard"])
def test_initial_rotations(kind):
    dims = {"R1": 8, "R2.0": 4, "R2.1": 4}
    rots = initial_rotations(dims, kind, seed=3, dtype=F64)
    assert set(rots) == set(dims)
    for k, R in rots.items():
        assert R.shape == (dims[k], dims[k]) and R.dtype == F64
        assert orthogonality_error(R) < 1e-10
    again = initial_rotations(dims, kind, seed=3, dtype=F64)
    assert all(torch.equal(rots[k], again[k]) for k in dims)
    if kind != "identity":
        assert not torch.equal(rots["R2.0"], rots["R2.1"])  # per-name seeds
        other = initial_rotations(dims, kind, seed=4, dtype=F64)
        assert not torch.equal(rots["R1"], other["R1"])
    if kind == "hadamard":  # entries +-1/sqrt(n)
        assert torch.allclose(rots["R1"].abs(), torch.full((8, 8), 1 / math.sqrt(8), dtype=F64))
    assert initial_rotations(dims, kind)["R1"].dtype == torch.float32


def test_initial_rotations_errors():
    with pytest.raises(ValueError, match="identity, random, hadamard"):
        initial_rotations({"R": 4}, "orthogonal")
    with pytest.raises(ValueError, match="positive int"):
        initial_rotations({"R": 0}, "identity")
    with pytest.raises(ValueError):
        initial_rotations({"R": 3}, "hadamard")  # no Hadamard matrix of order 3
    assert derived_seed(0, "R1") == derived_seed(0, "R1") != derived_seed(0, "R2")


# -- make_solver and solve ----------------------------------------------------------------------


def test_make_solver_names_and_errors():
    for name, cls in SOLVERS.items():  # each entry builds its class, which carries the registry name
        assert type(make_solver(name)) is cls and cls.name == name
    assert isinstance(make_solver("cayley-sgd"), CayleySGD)
    assert make_solver("radam", lr=0.1).lr == 0.1
    assert make_solver("rsgd").lr == 5e-2
    assert isinstance(make_solver("procrustes"), ProcrustesAlternation)
    with pytest.raises(ValueError, match=", ".join(SOLVERS)):
        make_solver("adam")
    with pytest.raises(ValueError, match="radam"):
        make_solver("radam", momentum=0.9)  # not an Adam argument


def test_solve_history_callback_and_early_stop(trace_problem):
    objective, _ = trace_problem
    seen = []

    def callback(step, loss, rotations):
        seen.append((step, loss))
        return step == 6

    result = solve(objective, "random", "cayley-sgd", 50, callback=callback, progress=False, dtype=F64)
    assert isinstance(result, SolveResult)
    assert result.steps == 7 == len(result.history)
    assert [s for s, _ in seen] == list(range(7))
    assert [l for _, l in seen] == result.history
    assert result.seconds >= 0
    assert result.orthogonality_error == max(orthogonality_error(R) for R in result.rotations.values())
    assert result.final_loss == pytest.approx(float(objective.loss(result.rotations)))
    full = solve(objective, "random", "cayley-sgd", 12, progress=False, dtype=F64)
    assert full.steps == 12 == len(full.history)


def test_solve_resumes(trace_problem):
    objective, _ = trace_problem
    whole = solve(objective, "random", "radam", 20, progress=False, dtype=F64)
    # init=None continues the same solver object with its Adam moments: identical to one run
    solver = make_solver("radam")
    first = solve(objective, "random", solver, 12, progress=False, dtype=F64)
    rest = solve(objective, None, solver, 8, progress=False)
    assert first.history + rest.history == whole.history
    assert torch.equal(rest.rotations["R"], whole.rotations["R"])
    # init=<previous result> restarts the moments from the previous rotations
    restarted = solve(objective, first, "radam", 8, progress=False)
    assert restarted.history[0] == pytest.approx(first.final_loss)
    assert restarted.rotations["R"].dtype == F64
    with pytest.raises(ValueError, match="never initialized"):
        solve(objective, None, "radam", 1, progress=False)


def test_solve_init_validation_and_extras(trace_problem):
    objective, _ = trace_problem
    with pytest.raises(ValueError, match="lacks rotations"):
        solve(objective, {"Q": torch.eye(6)}, "radam", 1, progress=False)
    with pytest.raises(ValueError, match="6x6"):
        solve(objective, {"R": torch.eye(5)}, "radam", 1, progress=False)
    with pytest.raises(ValueError, match="not orthogonal"):
        solve(objective, {"R": 2 * torch.eye(6)}, "radam", 1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        solve(objective, "identity", "radam", -1, progress=False)
    with pytest.raises(ValueError, match="unknown solver"):
        solve(objective, "identity", "lbfgs", 1, progress=False)
    with pytest.raises(ValueError, match="init kind"):
        solve(objective, "eye", "radam", 1, progress=False)
    # a rotation the objective does not use is carried along untouched (not even re-projected)
    # (float32 within its tolerance, cast to float64 where it is above float64's: still not re-projected)
    extra = (random_orthogonal(3, 1) + 1e-7 * randn(3, 3, seed=2)).float()
    assert orthogonality_tolerance(3, F64) < orthogonality_error(extra) < orthogonality_tolerance(3, torch.float32)
    result = solve(objective, {"R": torch.eye(6), "other": extra}, "radam", 3, progress=False, dtype=F64)
    assert torch.equal(result.rotations["other"], extra.double())
    # the one tolerance policy, in the init's own dtype: the same matrix in float64 is refused
    with pytest.raises(ValueError, match=r"rotation 'init other' is not orthogonal: .* > tolerance 1.000e-10"):
        solve(objective, {"R": torch.eye(6), "other": extra.double()}, "radam", 1, progress=False)
    zero = solve(objective, "identity", "radam", 0, progress=False)
    assert zero.steps == 0 and zero.history == [] and torch.equal(zero.rotations["R"], torch.eye(6))


def test_solve_nan_names_the_step(trace_problem):
    objective, _ = trace_problem
    with pytest.raises(ValueError, match=r"loss is nan at step 3"):
        solve(NaNAfter(objective, 3), "identity", "cayley-sgd", 10, progress=False)


def test_solve_progress_bar_shows_loss(trace_problem, capsys):
    objective, _ = trace_problem
    solve(objective, "identity", "rsgd", 3, progress=True)
    err = capsys.readouterr().err
    assert "solve rsgd" in err and "loss=" in err
    solve(objective, "identity", "rsgd", 3, progress=False)
    assert capsys.readouterr().err == ""
