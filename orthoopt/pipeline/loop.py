"""The phase loop: plan a run's units, solve them one by one over a weight store, checkpoint exactly.

See the package doc (:mod:`orthoopt.pipeline`) for units, phases and exact resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from orthoopt.config import RotateConfig
from orthoopt.errors import InvalidInputError
from orthoopt.manifold import reorthogonalize
from orthoopt.resume import Partial, settings_difference, tensor_checksum
from orthoopt.solvers import SolveResult, initial_rotations, make_solver, solve
from orthoopt.store import Unit, WeightStore


def _phase_names(dims: Mapping[str, int], phase: str) -> dict[str, int]:
    return {k: n for k, n in dims.items() if k == phase or k.startswith(phase + ".")}


def run_settings(config: RotateConfig, fingerprint: dict, calib: torch.Tensor | None, init) -> dict:
    """Everything a run's trajectory depends on, JSON-able, for refusing a foreign partial checkpoint:
    the config's trajectory fields, the solver's resolved settings, the store's fingerprint (a
    checksum of the weights) and checksums of the calibration tokens and the init rotations."""
    kwargs = {} if config.effective_lr is None else {"lr": config.effective_lr}
    return {
        **config.trajectory(),
        "solver": config.solver_name,
        "solver_settings": make_solver(config.solver_name, **kwargs).config() if config.learned else None,
        "steps": config.phase_steps(),
        "lr": config.effective_lr,
        "calib_tokens": config.calib.tokens if calib is not None else None,
        "calib": None if calib is None else tensor_checksum([calib]),
        "init": None if init is None else tensor_checksum([init[k] for k in sorted(init)]),
        **fingerprint,
    }


def _result_summary(r: SolveResult) -> dict:
    return {"final_loss": r.final_loss, "orthogonality_error": r.orthogonality_error, "seconds": r.seconds,
            "stop_reason": r.stop_reason, "num_evaluations": r.num_evaluations,
            "num_reorthogonalizations": r.num_reorthogonalizations, "grad_norm": r.grad_norm}


def _saved_result(rots: dict[str, torch.Tensor], history: list[float], saved: dict) -> SolveResult:
    return SolveResult(rotations=rots, history=list(history), steps=len(history), **saved)


def _partial(settings: dict, key: str, step: int, out: dict, results: dict, solver=None, objective=None,
             history: list[float] | None = None) -> Partial:
    histories = {k: r.history for k, r in results.items()}
    if history is not None:
        histories[key] = history
    obj_state = objective.state_dict() if callable(getattr(objective, "state_dict", None)) else {}
    return Partial(settings=settings, phase=key, step=step, done=dict(out),
                   solver=None if solver is None else solver.state_dict(), objective=obj_state,
                   histories=histories, results={k: _result_summary(r) for k, r in results.items()})


def _unit_callback(store, unit, done, before, callback, out, results, solver, objective, checkpoint, every, settings):
    """The per-step callback of one unit: the user's callback (step counted from the unit's start)
    and the partial checkpoint every ``every`` steps."""
    history = list(before)

    def cb(i: int, loss: float, rotations: dict) -> bool:
        step = done + i
        history.append(loss)
        if checkpoint is not None and (step + 1) % every == 0:
            store.write_partial(checkpoint, _partial(settings, unit.key, step + 1, out, results, solver, objective,
                                                     history), unit)
        return bool(callback(unit.phase, step, loss, {**out, **rotations})) if callback is not None else False

    return cb if (callback is not None or checkpoint is not None) else None


def _cosine(solver, lr: float, total: int, done: int, callback):
    """Set ``solver.lr`` to the cosine schedule ``lr * (1 + cos(pi * t / total)) / 2`` before each step
    ``t`` (``done`` steps were taken by an earlier run); chains ``callback``."""

    def at(t: int) -> float:
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(t, total) / max(total, 1)))

    solver.lr = max(at(done), 1e-12)

    def cb(i, loss, r):
        solver.lr = max(at(done + i + 1), 1e-12)  # CayleySGD rejects lr <= 0
        return callback(i, loss, r) if callback is not None else None

    return cb


def _unit_phase(key: str) -> str:
    return key.split(".", 1)[0]


def plan_units(config: RotateConfig, dims: Mapping[str, int]) -> list[Unit]:
    """The solves of a run, in order; the loop decides them, not the store.

    A joint method (spinquant: one end-to-end loss of every rotation) is one unit over all selected
    phases. Otherwise R1 is one unit and every layer's ``R2.i`` its own unit: the layers' R2
    objectives share no term, and a line-search solver (``cayley-lbfgs``, ``cayley-bb``) moves all
    rotations of a unit along one step length, so solving them together would be another problem.
    So the in-memory and the streamed store solve the same problems, with every solver.
    ``dims``: ``{rotation: n}`` of the store (:meth:`~orthoopt.store.WeightStore.rotation_dims`).
    """
    if config.entry.joint:
        names = {k: n for p in config.rotations for k, n in _phase_names(dims, p).items()}
        return [Unit(config.rotations[0], config.rotations[0], names, tuple(config.rotations))]
    return [Unit(k, p, {k: n}, (p,)) for p in config.rotations for k, n in _phase_names(dims, p).items()]


@dataclass
class PhaseRun:
    """What :func:`run_phases` returns: the fused rotations (float64), the solve of each unit (by unit
    key), the units in order, and the partial checkpoint it resumed from (None for a fresh run)."""

    rotations: dict[str, torch.Tensor]
    results: dict[str, SolveResult]
    units: list[Unit]
    resumed: Partial | None = None


def run_phases(store: WeightStore, config: RotateConfig, *, calib: torch.Tensor | None = None,
               init: Mapping[str, torch.Tensor] | None = None, progress: bool = True,
               callback: Callable[[str, int, float, dict], bool | None] | None = None,
               checkpoint: str | Path | None = None, resume: bool = False) -> PhaseRun:
    """The phase loop (module doc): R1 then R2 (or one joint group), unit by unit, over ``store``.

    calib, init, progress, callback: as in :func:`rotate_model`. checkpoint, resume: exact resume
    (module doc); ``config.solve.checkpoint_every`` sets the period. Raises ValueError for a refused resume
    before the store is touched (:meth:`~orthoopt.store.WeightStore.begin`).
    """
    if (config.solve.checkpoint_every or resume) and checkpoint is None:
        raise InvalidInputError("checkpoint_every and resume need checkpoint=PATH")
    learned = config.learned
    phase_steps = config.phase_steps()
    every = config.solve.checkpoint_every
    settings = partial = None
    if checkpoint is not None and (resume or (learned and every)):
        settings = run_settings(config, store.fingerprint(), calib, init)
        partial = store.read_partial(checkpoint) if resume else None
        if partial is not None:
            asked = phase_steps.get(_unit_phase(partial.phase), 0)
            if partial.step > asked:
                raise InvalidInputError(f"{checkpoint}: {partial.phase} has already taken {partial.step} steps, more "
                                 f"than the {asked} asked for now (--steps {asked}); rerun with the interrupted run's "
                                 f"settings (steps {partial.settings.get('steps')}) to continue, or delete the file "
                                 "to start afresh")
            diff = settings_difference(partial.settings, settings)
            if diff:
                raise InvalidInputError(f"{checkpoint} is the partial checkpoint of a different run ({'; '.join(diff)}); "
                                 "rerun with the same settings, or delete it to start afresh")
    if not learned:
        checkpoint = None
    store.begin()
    plan = plan_units(config, store.rotation_dims())
    dtype, device = config.compute.torch_dtype, config.compute.device
    lr = config.effective_lr
    stop = dict(config.solve.stop)
    out: dict[str, torch.Tensor] = {}
    results: dict[str, SolveResult] = {}
    mine = store.local_units(plan)
    prepared: set[str] = set()
    for j, unit in enumerate(mine):
        if learned and unit.phase not in prepared:  # before the phase's first unit is (re-)applied
            prepared.add(unit.phase)
            if any(u.phase == unit.phase and (partial is None or u.key not in partial.results) for u in mine):
                store.prepare(unit.phase, config, calib, progress)
        if not learned:
            rots = initial_rotations(unit.dims, config.entry.init, seed=config.seed, dtype=torch.float64)
        elif partial is not None and unit.key in partial.results:  # finished before the interruption
            rots = {k: partial.done[k] for k in unit.dims}
            results[unit.key] = _saved_result(rots, partial.histories[unit.key], partial.results[unit.key])
        else:
            objective = store.objective(unit, config, calib, progress)
            start = initial_rotations(unit.dims, "hadamard", seed=config.seed, dtype=dtype, device=device)
            for k in unit.dims:
                if init is not None and k in init:
                    start[k] = init[k].to(dtype=dtype, device=start[k].device)
            solver = make_solver(config.solver_name, **({} if lr is None else {"lr": lr}))
            cosine = config.entry.schedule == "cosine" and hasattr(solver, "lr")
            base_lr = float(solver.lr) if cosine else None
            done, before = 0, []
            if partial is not None and partial.phase == unit.key and partial.solver is not None:
                if partial.objective:
                    objective.load_state_dict(partial.objective)
                if cosine:  # the saved lr is the schedule's value at the checkpoint, not another setting
                    solver.lr = partial.solver["meta"].get("config", {}).get("lr", base_lr)
                where = next(iter(start.values())).device
                solver.load_state_dict({"tensors": {k: v.to(where) for k, v in partial.solver["tensors"].items()},
                                        "meta": partial.solver["meta"]})
                done, before = partial.step, list(partial.histories.get(unit.key, []))
            cb = _unit_callback(store, unit, done, before, callback, out, results, solver, objective,
                                checkpoint if every else None, every, settings)
            if cosine:
                total = config.solve.schedule_steps or phase_steps.get(unit.phase, 0)
                cb = _cosine(solver, base_lr, total, done, cb)
            result = solve(objective, None if done or before else start, solver,
                           max(0, phase_steps.get(unit.phase, 0) - done), callback=cb, progress=progress,
                           prior_history=before, **stop)
            result.history = before + result.history
            result.steps = len(result.history)
            results[unit.key] = result
            del objective
            settled = store.settle(unit, result.rotations)
            rots = {k: reorthogonalize(R.detach().to("cpu", torch.float64)) for k, R in settled.items()}
        store.apply(unit, rots)
        out.update(rots)
        if checkpoint is not None and every and j + 1 < len(mine):  # unit boundary
            store.write_partial(checkpoint, _partial(settings, mine[j + 1].key, 0, out, results), unit)
    return PhaseRun(out, results, plan, partial)


def combine_results(units: Iterable[Unit], results: Mapping[str, SolveResult]) -> dict[str, SolveResult]:
    """``{phase: SolveResult}``: a phase solved as one unit keeps its result; one solved in several units
    (R2 layer by layer) gets one result as a joint solve reports it: histories and final losses summed
    over units (in unit order), the worst orthogonality error, evaluations and seconds added."""
    by_phase: dict[str, list[tuple[str, SolveResult]]] = {}
    for u in units:
        if u.key in results:
            by_phase.setdefault(u.phase, []).append((u.key, results[u.key]))
    out = {}
    for phase, items in by_phase.items():
        if len(items) == 1 and items[0][0] == phase:
            out[phase] = items[0][1]
            continue
        rs = [r for _, r in items]
        steps = min(r.steps for r in rs)
        reasons = sorted({r.stop_reason for r in rs})
        norms = [r.grad_norm for r in rs if r.grad_norm is not None]
        out[phase] = SolveResult(
            rotations={k: R for r in rs for k, R in r.rotations.items()},
            history=[sum((r.history[s] for r in rs), 0.0) for s in range(steps)],
            orthogonality_error=max(r.orthogonality_error for r in rs), steps=steps,
            seconds=sum(r.seconds for r in rs), final_loss=sum((r.final_loss for r in rs), 0.0),
            stop_reason=",".join(reasons), num_evaluations=sum(r.num_evaluations for r in rs),
            num_reorthogonalizations=sum(r.num_reorthogonalizations for r in rs),
            grad_norm=math.sqrt(sum(g * g for g in norms)) if norms else None)
    return out
