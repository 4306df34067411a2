"""``solve``: drive a solver on an objective for a number of steps.

Rotations are ``{name: [n, n]}`` acting as ``x -> x @ R`` (``docs/conventions.md``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from tqdm.auto import tqdm

from orthoopt.errors import InvalidInputError

from ..core.tolerance import check_orthogonal
from ..manifold import check_square, orthogonality_error
from ..objectives.base import Objective
from .base import Solver
from .init import initial_rotations
from .registry import make_solver

Callback = Callable[[int, float, dict[str, torch.Tensor]], object]


@dataclass
class SolveResult:
    """What :func:`solve` returns.

    Parameters
    ----------
    rotations : dict of str to torch.Tensor
        ``{name: [n, n]}`` final iterate (copies).
    history : list of float
        Loss before each step taken (``history[i]`` is the loss at step ``i``'s start).
    orthogonality_error : float
        Max over rotations of ``||R^T R - I||_F`` (float64) of the final iterate.
    steps : int
        Number of steps taken (``len(history)``; fewer than asked if stopped early).
    seconds : float
        Wall time of the steps.
    final_loss : float
        ``objective.loss`` at the final rotations (the loss after the last step).
    stop_reason : str
        Which criterion ended the run: ``"max_steps"``, ``"min_grad_norm"``, ``"min_rel_decrease"``,
        ``"max_seconds"``, ``"callback"`` or ``"stalled"`` (a line-search solver found no acceptable
        step twice in a row).
    num_evaluations : int
        Loss-and-gradient evaluations of the objective made by this run's steps (the cost unit of
        ``docs/solvers.md``; procrustes: loss-and-targets evaluations).
    num_reorthogonalizations : int
        Re-projections onto O(n) during this run (0 for the exact Cayley and geoopt solvers; a broken
        retraction shows here).
    grad_norm : float or None
        Riemannian gradient norm ``sqrt(sum ||skew(R^T G)||_F^2)`` at the start of the last step
        (None for procrustes or when no step was taken).
    """

    rotations: dict[str, torch.Tensor]
    history: list[float]
    orthogonality_error: float
    steps: int
    seconds: float
    final_loss: float
    stop_reason: str = "max_steps"
    num_evaluations: int = 0
    num_reorthogonalizations: int = 0
    grad_norm: float | None = None


def _start_rotations(
    objective: Objective,
    init: Mapping[str, torch.Tensor] | str,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    seed: int,
) -> dict[str, torch.Tensor]:
    dims = objective.dims
    if isinstance(init, str):
        return initial_rotations(dims, init, seed=seed, dtype=dtype or torch.float32, device=device)
    if not isinstance(init, Mapping):
        raise InvalidInputError(
            "init must be a dict of rotations, a SolveResult, None or one of identity/random/hadamard, "
            f"got {type(init).__name__}"
        )
    missing = [k for k in dims if k not in init]
    if missing:
        raise InvalidInputError(f"init lacks rotations {missing} that the objective needs (it needs {dict(dims)})")
    out = {}
    for k, R in init.items():
        n = check_square(R, f"init rotation {k!r}")
        if k in dims and n != dims[k]:
            raise InvalidInputError(f"init rotation {k!r} is {n}x{n}, the objective needs {dims[k]}x{dims[k]}")
        check_orthogonal(R, f"init {k}")  # the one tolerance policy, in R's own dtype
        out[k] = R.detach().to(dtype=dtype or R.dtype, device=device or R.device)
    return out


def _small_decrease(h: list[float], window: int, tol: float) -> bool:
    return len(h) > window and h[-1 - window] - h[-1] <= tol * abs(h[-1 - window])


def solve(
    objective: Objective,
    init: Mapping[str, torch.Tensor] | str | SolveResult | None,
    solver: Solver | str,
    steps: int,
    callback: Callback | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    *,
    min_grad_norm: float | None = None,
    min_rel_decrease: float | None = None,
    window: int = 10,
    max_seconds: float | None = None,
    prior_history: list[float] | None = None,
) -> SolveResult:
    """Run at most ``steps`` solver steps on ``objective`` and return a :class:`SolveResult`.

    Parameters
    ----------
    objective : Objective
        An :class:`~orthoopt.objectives.base.Objective` (``dims``, ``loss``, ``value_and_grad``;
        ``procrustes_targets`` for the ``"procrustes"`` solver).
    init : {"identity", "random", "hadamard"}, dict, SolveResult or None
        A named start (built for ``objective.dims`` with ``seed``, in ``dtype`` or float32); a dict
        ``{name: [n, n]}`` of orthogonal matrices (each within
        :func:`orthoopt.core.tolerance.orthogonality_tolerance` of its size and dtype, else
        InvalidInputError; cast to ``dtype`` if given; names the objective does not use are carried
        along unchanged); a previous :class:`SolveResult` (its rotations); or None to continue an
        already initialized ``solver`` object with its state (momentum, Adam moments) intact.
    solver : Solver or str
        A solver object or a name for :func:`make_solver` with its defaults. Resuming with
        ``init=previous.rotations`` calls ``solver.init``, which restarts momentum/moments;
        ``init=None`` keeps them.
    steps : int
        At most this many steps (stop reason ``"max_steps"``).
    callback : callable, optional
        ``callback(step, loss, rotations)`` after each step, with the 0-based step index, the loss
        before that step and a copy of the rotations after it; a true return stops early
        (``"callback"``).
    progress : bool
        A tqdm bar on stderr with the latest loss.
    dtype, device : torch.dtype, torch.device or str, optional
        Of the rotations the solver works on (the objective computes on the rotations' device); by
        default float32 on the CPU for a named init, the given tensors' otherwise.
    seed : int
        Seeds a random or Hadamard named start.
    min_grad_norm : float, optional
        Stop when the Riemannian gradient norm at the start of a step (``solver.grad_norm``) is at
        most this (``"min_grad_norm"``); solvers without a gradient (procrustes) never stop here.
    min_rel_decrease, window : float and int, optional
        Stop when ``history[-1-window] - history[-1] <= min_rel_decrease * |history[-1-window]|``:
        the loss fell by less than this fraction over the last ``window`` steps (``"min_rel_decrease"``).
    max_seconds : float, optional
        Stop when the wall time of the steps reaches this (``"max_seconds"``).
    prior_history : list of float, optional
        Losses of steps taken before this call (a resumed run), counted in the window test only
        (``history`` holds this call's steps).

    Returns
    -------
    SolveResult
        The final rotations, loss history and why the run stopped. The stopping criteria are checked
        after every step; the first that holds ends the run and is named in
        ``SolveResult.stop_reason`` (None turns one off); a line-search solver (cayley-bb,
        cayley-lbfgs) that finds no acceptable step twice in a row gives ``"stalled"``.

    Raises
    ------
    InvalidInputError
        For bad arguments.
    NonFiniteLossError
        (:mod:`orthoopt.solvers.base`, a ValueError) naming the step when the loss or a gradient is
        NaN or inf.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise InvalidInputError(f"steps must be a non-negative int, got {steps!r}")
    for label, v in (("min_grad_norm", min_grad_norm), ("min_rel_decrease", min_rel_decrease),
                     ("max_seconds", max_seconds)):
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
            raise InvalidInputError(f"{label} must be a non-negative number or None, got {v!r}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise InvalidInputError(f"window must be a positive int, got {window!r}")
    if isinstance(solver, str):
        solver = make_solver(solver)
    elif not (callable(getattr(solver, "init", None)) and callable(getattr(solver, "step", None))):
        raise InvalidInputError(f"solver must be a name or an object with init/step/rotations, got {type(solver).__name__}")
    if isinstance(init, SolveResult):
        init = init.rotations
    if init is None:
        if not getattr(solver, "initialized", False):
            raise InvalidInputError("init=None continues a solver's state, but the solver was never initialized")
        if dtype is not None or device is not None:
            raise InvalidInputError("dtype and device cannot change when continuing a solver (init=None)")
    else:
        solver.init(_start_rotations(objective, init, dtype, device, seed))

    history: list[float] = []
    prior = list(prior_history or [])
    name = getattr(solver, "name", type(solver).__name__)
    evals0 = getattr(solver, "num_evaluations", 0)
    reorth0 = getattr(solver, "num_reorthogonalizations", 0)
    stop_reason = "max_steps"
    stalls = 0
    t0 = time.perf_counter()
    with tqdm(total=steps, desc=f"solve {name}", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for i in range(steps):
            loss = solver.step(objective)
            history.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.6g}", refresh=False)
            grad_norm = getattr(solver, "grad_norm", None)
            stalls = stalls + 1 if getattr(solver, "stalled", False) else 0
            if callback is not None and callback(i, loss, solver.rotations):
                stop_reason = "callback"
            elif min_grad_norm is not None and grad_norm is not None and grad_norm <= min_grad_norm:
                stop_reason = "min_grad_norm"
            elif min_rel_decrease is not None and _small_decrease(prior + history, window, min_rel_decrease):
                stop_reason = "min_rel_decrease"
            elif max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
                stop_reason = "max_seconds"
            elif stalls >= 2:
                stop_reason = "stalled"
            else:
                continue
            break
    seconds = time.perf_counter() - t0

    rotations = solver.rotations
    known = solver.current_loss() if callable(getattr(solver, "current_loss", None)) else None
    if known is not None:
        final_loss = float(known)
    else:
        with torch.no_grad():
            final_loss = float(objective.loss(rotations))
    return SolveResult(
        rotations=rotations,
        history=history,
        orthogonality_error=max(orthogonality_error(R) for R in rotations.values()),
        steps=len(history),
        seconds=seconds,
        final_loss=final_loss,
        stop_reason=stop_reason,
        num_evaluations=getattr(solver, "num_evaluations", 0) - evals0,
        num_reorthogonalizations=getattr(solver, "num_reorthogonalizations", 0) - reorth0,
        grad_norm=getattr(solver, "grad_norm", None) if history else None,
    )
