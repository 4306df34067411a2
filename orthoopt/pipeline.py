"""Rotate a model with one method, end to end: the job behind ``orthoopt rotate``, in memory or streamed.

Data flows one way (``docs/architecture.md``): the adapter turns the model into weight blocks (and
calibration activations), a method turns those into an objective, a solver learns the rotations,
and the adapter fuses them back. This module is the only place that knows both sides.

Phases: ``R1`` is learned first and fused; then every ``R2.i`` is learned on the R1-rotated weights
(the value/output blocks then already carry R1, so the R2 objective sees the weights it will
actually change). Learned rotations are re-orthogonalized in float64 (polar) before they are fused;
fixed ones (Hadamard, random) are fused as drawn. Either way the saved
``orthoopt/rotations.safetensors`` is exactly what the weights carry.

Methods: one entry each in the registry :data:`orthoopt.methods.METHODS` (objective factory, default
solver, steps and lr, the statistics it needs, joint or per-layer units, lr schedule, streamed
support); the table generated from it is in ``docs/solvers.md`` and the formulas in
``docs/objectives.md``. Nothing here dispatches on a method's name.

spinquant (SpinQuant's end-to-end objective) learns R1 and every R2.i *jointly* in one solve (the
other methods learn R1, fuse it, then the R2s): the causal-LM loss of the rotated network with the
quantization of ``sim_quant`` simulated (:class:`orthoopt.quant.rotated.SimQuantConfig`), one batch of
``batch_size`` calibration windows per step, Cayley SGD with SpinQuant's lr 1.5 and a cosine decay of
the step size to 0 over the steps (SpinQuant: 100 steps of 8 x 2048 WikiText-2 tokens).

Learned objectives see only the blocks that get quantized: ``embed_tokens`` and ``lm_head`` stay in
full precision in every quantization setting here (as in QuaRot, SpinQuant and OptRot's evaluation),
so they are left out of the objective by default (``include_embeddings=True`` puts them back; the
embedding's planted outlier columns would otherwise dominate a plain fourth-power sum). They are
still rotated, of course, so the model's function is unchanged.

Learned methods start from a random Hadamard matrix (the usual start of OptRot and DFRot) unless
``init`` gives rotations.

One phase loop (:func:`run_phases`) runs every method over a weight store (:mod:`orthoopt.store`):
:class:`MemoryStore` (a Hugging Face module; :func:`rotate_model`) or the safetensors store
(:class:`orthoopt.streaming.rotate.SafetensorsStore`, layers read from disk, sharded write-back;
:func:`rotate_streamed`, also under ``torchrun``). The settings are one
:class:`~orthoopt.config.RotateConfig`, validated once and written into ``report.json["config"]``.
A phase is one or more units (solves), planned by the loop (:func:`plan_units`), not by the store:
R1 is one unit and each layer's R2 its own (``R2.0``, ``R2.1``, ...), in memory and streamed alike
(the safetensors store fuses and writes each layer as it is done); a joint method (spinquant) is one
unit over all its phases. A data-driven method takes a phase's calibration statistics once, before
the phase's first unit (:meth:`MemoryStore.prepare`). The loop starts each unit (random Hadamard or ``init``), runs the solver with the
cosine schedule of spinquant and the user's callback, re-orthogonalizes in float64 and hands the
rotations to the store.

Exact resume: with ``checkpoint=PATH`` and ``config.checkpoint_every=k`` the loop writes its whole state
(finished rotations in float64, the solver's state, the objective's sampling generators, the loss
histories; :mod:`orthoopt.resume`) to ``PATH`` every ``k`` steps of a unit and after each unit (so a
streamed run continues from the first unfinished layer); ``resume=True`` continues from ``PATH`` when
it exists, refusing (ValueError naming the differences) a file written with another method, model,
solver or settings. A resumed run gives bit-identical rotations (and weights) to an uninterrupted one
on the same machine with the same number of threads, in memory, streamed and distributed (the store
reads and writes the file: under ``torchrun`` rank 0 writes the collective R1 state of every rank to
``PATH`` and each rank its own R2 layers to ``PATH`` with ``.rankR-of-W`` before the suffix).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from orthoopt.adapters import DecoderAdapter, logits_relative_error  # noqa: F401 (re-exported helper)
from orthoopt.adapters.verify import logits as model_logits
from orthoopt.core.tolerance import invariance_ok, invariance_tolerance
from orthoopt.config import FULL_PRECISION_BLOCKS, PHASES, RotateConfig
from orthoopt.methods import METHODS, ObjectiveInputs, check_sampling  # noqa: F401 (METHODS re-exported)
from orthoopt.methods import names as _names
from orthoopt.methods import method as method_entry
from orthoopt.manifold import orthogonality_error, reorthogonalize
from orthoopt.objectives import Objective
from orthoopt.resume import Partial, read_partial, settings_difference, tensor_checksum, write_partial
from orthoopt.solvers import SolveResult, initial_rotations, make_solver, solve
from orthoopt.store import Unit, WeightStore


def _phase_names(dims: Mapping[str, int], phase: str) -> dict[str, int]:
    return {k: n for k, n in dims.items() if k == phase or k.startswith(phase + ".")}


def _blocks(adapter: DecoderAdapter, phase: str, include_embeddings: bool, names=None):
    blocks = adapter.weight_blocks(phase)
    if names is not None:
        blocks = [b for b in blocks if b.rotation in names]
    return blocks if include_embeddings else [b for b in blocks if b.name not in FULL_PRECISION_BLOCKS]


def _activations(adapter: DecoderAdapter, phase: str, calib: torch.Tensor, max_tokens: int,
                 seed: int, progress: bool, include_embeddings: bool) -> dict[str, torch.Tensor]:
    """``{rotation: X [rows, n]}``: the rows each rotation of ``phase`` multiplies, i.e. the inputs of
    the side-"in" blocks (q/k/v and gate/up share one input per layer and count once; o_proj heads of
    layer i give ``[T * heads, head_dim]`` rows for ``R2.i``)."""
    blocks = [b for b in _blocks(adapter, phase, include_embeddings) if b.side == "in"]
    sources = adapter.block_sources(phase)
    modules = sorted({sources[b.name][0] for b in blocks if sources[b.name] is not None})
    inputs = adapter.linear_inputs(calib, max_tokens=max_tokens, modules=modules, seed=seed, progress=progress)
    rows: dict[str, list[torch.Tensor]] = {}
    seen: set[tuple[int, str]] = set()
    for b in blocks:
        src = sources[b.name]
        if src is None:
            continue
        X = inputs[src[0]]
        key = (X.data_ptr(), str(src[1]))  # modules reading one tensor share it: count it once
        if key in seen:
            continue
        seen.add(key)
        rows.setdefault(b.rotation, []).append(X if src[1] is None else X[:, src[1]])
    return {name: torch.cat(xs) for name, xs in rows.items()}


def _hessian_statistics(adapter: DecoderAdapter, phase: str, calib, calib_tokens, seed, progress,
                        include_embeddings) -> dict:
    sources = adapter.block_sources(phase)
    modules = sorted({s[0] for s in sources.values() if s is not None})
    return {"hessians": adapter.input_hessians(calib, modules=modules, progress=progress)}


def _activation_statistics(adapter: DecoderAdapter, phase: str, calib, calib_tokens, seed, progress,
                           include_embeddings) -> dict:
    return {"activations": _activations(adapter, phase, calib, calib_tokens, seed, progress, include_embeddings)}


_PHASE_STATISTICS = {"hessians": _hessian_statistics, "activations": _activation_statistics}
"""How each per-phase statistics kind of :data:`orthoopt.methods.STATISTICS` is taken."""


def phase_statistics(method: str, adapter: DecoderAdapter, phase: str, calib: torch.Tensor | None,
                     calib_tokens: int = 2048, seed: int = 0, progress: bool = True,
                     include_embeddings: bool = False) -> dict:
    """The calibration statistics the objective of ``method`` needs for ``phase`` on the adapter's
    current weights, by the entry's ``statistics``: ``{"hessians": ...}``, ``{"activations":
    {rotation: X}}``, or ``{}`` (data-free methods, and ``"model"``, which reads batches itself)."""
    take = _PHASE_STATISTICS.get(method_entry(method).statistics)
    return {} if take is None else take(adapter, phase, calib, calib_tokens, seed, progress, include_embeddings)


def _block_hessians(adapter: DecoderAdapter, phase: str, blocks, H: Mapping) -> list:
    """The input Hessian of each block (its rows and columns of its module's; None without a source)."""
    sources = adapter.block_sources(phase)
    out = []
    for b in blocks:
        src = sources[b.name]
        out.append(None if src is None else (H[src[0]] if src[1] is None else H[src[0]][src[1], src[1]]))
    return out


def build_objective(method: str, adapter: DecoderAdapter, phase: str | Iterable[str], calib: torch.Tensor | None = None,
                    calib_tokens: int = 2048, seed: int = 0, progress: bool = True,
                    include_embeddings: bool = False, sample_fraction: float | None = None,
                    device: torch.device | str | None = None, sim_quant=None, batch_size: int = 1,
                    micro_batch_size: int | None = None, names: Iterable[str] | None = None,
                    cache: dict | None = None) -> Objective:
    """The objective of a learned ``method`` for the rotations of ``phase`` (``"R1"`` or ``"R2"``) on the
    adapter's current (fused, possibly partly rotated) weights: the registry entry's ``objective``
    factory (:data:`orthoopt.methods.METHODS`) applied to the blocks and the statistics of its
    ``statistics`` kind. ``calib``: token ids ``[N, L]``, needed by the data-driven methods.
    ``include_embeddings``: see the module doc. ``sample_fraction`` and ``device``: methods with
    ``sampling`` only (optrot). Statistics ``"model"`` (spinquant): ``phase`` may be several phases
    (learned jointly), ``sim_quant`` is the simulated quantization
    (:class:`orthoopt.quant.rotated.SimQuantConfig`, default W4 RTN only), ``batch_size`` /
    ``micro_batch_size`` the calibration windows per step / per backward pass. ``names``: only these
    rotations of ``phase`` (one layer's ``R2.i``); ``cache``: the phase's calibration statistics
    (:func:`phase_statistics`) when already taken, so that a phase solved layer by layer runs the
    calibration forward pass once."""
    entry = method_entry(method)
    if not entry.learned:
        raise ValueError(f"method {method!r} learns nothing; learned methods: "
                         f"{', '.join(_names(lambda m: m.learned))}")
    check_sampling(entry, sample_fraction, device)
    if entry.needs_calibration and calib is None:
        raise ValueError(f"method {method!r} needs calibration text (--calib TEXT_FILE)")
    inputs = ObjectiveInputs(calib=calib, sample_fraction=sample_fraction, seed=seed, device=device,
                             batch_size=batch_size, micro_batch_size=micro_batch_size)
    if entry.simulates_quantization:
        from orthoopt.quant.rotated import RotatedQuantLM

        phases = (phase,) if isinstance(phase, str) else tuple(phase)
        inputs.model_loss = RotatedQuantLM(adapter.model, sim_quant, rotations=phases)
        return entry.objective(inputs)
    if cache is None:
        cache = phase_statistics(method, adapter, phase, calib, calib_tokens, seed, progress, include_embeddings)
    inputs.blocks = _blocks(adapter, phase, include_embeddings, names)
    if "hessians" in cache:
        inputs.hessians = _block_hessians(adapter, phase, inputs.blocks, cache["hessians"])
    if "activations" in cache:
        inputs.activations = {k: v for k, v in cache["activations"].items() if names is None or k in names}
    return entry.objective(inputs)


# ------------------------------------------------------------------------------------------------
# the in-memory store

class MemoryStore:
    """A Hugging Face decoder in memory as a :class:`~orthoopt.store.WeightStore`: norms fused by
    :meth:`begin`, rotations fused in place."""

    def __init__(self, model) -> None:
        self.model = model
        self.adapter: DecoderAdapter | None = None
        self._phase_data: tuple[str, dict] | None = None  # (phase, its calibration statistics)

    def fingerprint(self) -> dict:
        return {"store": "memory",
                "model": tensor_checksum(t for _, t in sorted(self.model.state_dict().items())),
                "model_config": getattr(getattr(self.model, "config", None), "model_type", None)}

    def begin(self) -> None:
        self.adapter = DecoderAdapter(self.model)
        self.adapter.fuse_norms()
        self.dims = self.adapter.rotation_dims()

    def rotation_dims(self) -> dict[str, int]:
        return dict(self.dims)

    def prepare(self, phase: str, config: RotateConfig, calib, progress: bool) -> None:
        self._phase_data = None  # the previous phase's statistics go before the next ones are taken
        if config.entry.per_phase_statistics:
            stats = phase_statistics(config.method, self.adapter, phase, calib, config.calib_tokens, config.seed,
                                     progress, config.include_embeddings)
            self._phase_data = (phase, stats)

    def local_units(self, units: list[Unit]) -> list[Unit]:
        return list(units)

    def objective(self, unit: Unit, config: RotateConfig, calib, progress: bool) -> Objective:
        joint = config.entry.joint
        extra = ({"sim_quant": config.sim_quant, "batch_size": config.batch_size,
                  "micro_batch_size": config.micro_batch_size} if config.entry.simulates_quantization else {})
        if not joint and self._phase_data is not None and self._phase_data[0] == unit.phase:
            extra["cache"] = self._phase_data[1]
        return build_objective(config.method, self.adapter, unit.phases if joint else unit.phase, calib,
                               config.calib_tokens, config.seed, progress, config.include_embeddings,
                               config.sample_fraction, config.device, names=tuple(unit.dims), **extra)

    def settle(self, unit: Unit, rotations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return rotations

    def apply(self, unit: Unit, rotations: dict[str, torch.Tensor]) -> None:
        self.adapter.apply_rotations(rotations)

    def report(self) -> dict:
        return {}

    def write_partial(self, path, partial: Partial, unit: Unit) -> None:
        write_partial(path, partial)

    def read_partial(self, path) -> Partial | None:
        return read_partial(path) if Path(path).is_file() else None


# ------------------------------------------------------------------------------------------------
# the phase loop

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
        "calib_tokens": config.calib_tokens if calib is not None else None,
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
    (module doc); ``config.checkpoint_every`` sets the period. Raises ValueError for a refused resume
    before the store is touched (:meth:`~orthoopt.store.WeightStore.begin`).
    """
    if (config.checkpoint_every or resume) and checkpoint is None:
        raise ValueError("checkpoint_every and resume need checkpoint=PATH")
    learned = config.learned
    phase_steps = config.phase_steps()
    every = config.checkpoint_every
    settings = partial = None
    if checkpoint is not None and (resume or (learned and every)):
        settings = run_settings(config, store.fingerprint(), calib, init)
        partial = store.read_partial(checkpoint) if resume else None
        if partial is not None:
            asked = phase_steps.get(_unit_phase(partial.phase), 0)
            if partial.step > asked:
                raise ValueError(f"{checkpoint}: {partial.phase} has already taken {partial.step} steps, more "
                                 f"than the {asked} asked for now (--steps {asked}); rerun with the interrupted run's "
                                 f"settings (steps {partial.settings.get('steps')}) to continue, or delete the file "
                                 "to start afresh")
            diff = settings_difference(partial.settings, settings)
            if diff:
                raise ValueError(f"{checkpoint} is the partial checkpoint of a different run ({'; '.join(diff)}); "
                                 "rerun with the same settings, or delete it to start afresh")
    if not learned:
        checkpoint = None
    store.begin()
    plan = plan_units(config, store.rotation_dims())
    dtype, device = config.torch_dtype, config.device
    lr = config.effective_lr
    stop = dict(config.stop)
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
            done, before = 0, []
            if partial is not None and partial.phase == unit.key and partial.solver is not None:
                if partial.objective:
                    objective.load_state_dict(partial.objective)
                where = next(iter(start.values())).device
                solver.load_state_dict({"tensors": {k: v.to(where) for k, v in partial.solver["tensors"].items()},
                                        "meta": partial.solver["meta"]})
                done, before = partial.step, list(partial.histories.get(unit.key, []))
            cb = _unit_callback(store, unit, done, before, callback, out, results, solver, objective,
                                checkpoint if every else None, every, settings)
            if config.entry.schedule == "cosine" and hasattr(solver, "lr"):
                total = config.schedule_steps or phase_steps.get(unit.phase, 0)
                cb = _cosine(solver, float(solver.lr), total, done, cb)
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


@dataclass
class RotateResult:
    """What :func:`rotate_model` / :func:`rotate_streamed` return: the fused rotations (float64), a
    JSON-able report and the solve of each phase."""

    rotations: dict[str, torch.Tensor]
    report: dict
    solves: dict[str, SolveResult] = field(default_factory=dict)


def loss_summary(history: list[float]) -> dict:
    """A report's view of a loss history: first, last, min and at most ~50 evenly spaced points."""
    if not history:
        return {"steps": 0}
    k = max(1, len(history) // 50)  # at most ~50 points for the report
    return {"steps": len(history), "first": history[0], "last": history[-1], "min": min(history),
            "every": k, "curve": history[::k]}


def build_report(config: RotateConfig, rotations: Mapping[str, torch.Tensor], solves: Mapping[str, SolveResult],
                 seconds: float, resumed: Partial | None = None, checkpoint=None) -> dict:
    """``report.json`` of a run: the config (``"config"``, :meth:`RotateConfig.to_json`), its main
    settings at the top level, the losses of each phase and the worst orthogonality error."""
    report = {
        "method": config.method,
        "rotations": list(config.rotations),
        "solver": config.solver_name,
        "steps": config.phase_steps() if config.learned else 0,
        "lr": config.effective_lr,
        "seed": config.seed,
        "include_embeddings": config.include_embeddings,
        "sample_fraction": config.sample_fraction,
        **({"sim_quant": config.sim_quant.to_dict(), "batch_size": config.batch_size,
            "micro_batch_size": config.micro_batch_size or config.batch_size, "lr_schedule": "cosine"}
           if config.entry.simulates_quantization else {}),
        "device": config.device,
        "dtype": config.dtype,
        "seconds": seconds,
        "orthogonality_error": max(orthogonality_error(R) for R in rotations.values()),
        "loss": {p: loss_summary(r.history) | {"final": r.final_loss, "orthogonality_error": r.orthogonality_error,
                                               "evaluations": r.num_evaluations, "stop_reason": r.stop_reason,
                                               "reorthogonalizations": r.num_reorthogonalizations}
                 for p, r in solves.items()},
        "config": config.to_json(),
    }
    if config.stop:
        report["stop"] = dict(config.stop)
    if resumed is not None:
        report["resumed"] = {"from": str(checkpoint), "phase": resumed.phase, "steps_done": resumed.step}
    return report


def _as_config(config: RotateConfig | str | None, rotations, kwargs: dict) -> RotateConfig:
    """A :class:`RotateConfig` from ``config``, or from a method name and keyword settings (the
    keyword form of :func:`rotate_model` / :func:`rotate_streamed`)."""
    if isinstance(config, RotateConfig):
        if kwargs or rotations is not None:
            raise ValueError(f"pass settings either as a RotateConfig or as keywords, not both "
                             f"(got {sorted(kwargs) + (['rotations'] if rotations is not None else [])})")
        return config
    if config is not None and not isinstance(config, str):
        raise ValueError(f"config must be a RotateConfig or a method name, got {type(config).__name__}")
    if "dtype" in kwargs and isinstance(kwargs["dtype"], torch.dtype):
        kwargs["dtype"] = str(kwargs["dtype"]).removeprefix("torch.")
    if "method" in kwargs and config is not None:
        raise ValueError(f"method given twice: {config!r} and method={kwargs['method']!r}")
    method = kwargs.pop("method", config or "optrot")
    return RotateConfig(method=method, rotations=PHASES if rotations is None else tuple(rotations), **kwargs)


def rotate_model(
    model,
    config: RotateConfig | str | None = None,
    rotations: Iterable[str] | None = None,
    *,
    calib: torch.Tensor | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
    verify_ids: torch.Tensor | None = None,
    verify_tol: float | None = None,
    progress: bool = True,
    callback: Callable[[str, int, float, dict], bool | None] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    **settings,
) -> RotateResult:
    """Fuse norms, learn (or draw) the rotations of ``config`` and fuse them into ``model`` in place.

    config:     a :class:`~orthoopt.config.RotateConfig`, or a method name with the config's fields as
                keywords (``rotate_model(model, "optrot", steps=50, seed=1)``; ``rotations`` may be
                the third positional argument; ``checkpoint_every`` is a config field).
    calib:      calibration token ids ``[N, L]`` for the methods that need them (``Method.needs_calibration``).
    init:       starting rotations (e.g. a previous run's, :func:`~orthoopt.adapters.load_rotations`); rotations it
                names start there instead of at a random Hadamard. A fixed method ignores it.
    verify_ids: token ids ``[B, L]`` on which the logits before and after must agree; the relative
                error goes into the report and a ValueError is raised above ``verify_tol`` (default
                the model dtype's ``rtol`` of :data:`orthoopt.core.tolerance.INVARIANCE`, with its
                ``atol``: 1e-4 for float32 models, 1e-6 for float64, 16 unit roundoffs for
                bfloat16 / float16, ``docs/conventions.md``).
    callback:   ``callback(phase, step, loss, rotations)`` after each solver step (``step`` counts from
                the unit's start, also in a resumed run: R1, then each layer's R2 from 0, reported as
                phase ``"R2"``), with the rotations of the finished units (as fused) and the current
                iterate; a true return stops that unit early (one layer's R2: the next layer still
                runs). A joint
                method (spinquant) reports its one solve as phase ``"R1"`` (the first selected phase)
                with all its rotations, and takes ``steps`` of that phase.
    checkpoint, resume: exact resume, see the module doc. ``steps`` are per unit (R1; each ``R2.i``). The file is
                left in place when the run ends; the caller removes it once the output is safely written.
    """
    config = _as_config(config, rotations, settings)
    start = time.perf_counter()
    ref = model_logits(model, verify_ids) if verify_ids is not None else None
    run = run_phases(MemoryStore(model), config, calib=calib, init=init, progress=progress, callback=callback,
                     checkpoint=checkpoint, resume=resume)
    solves = combine_results(run.units, run.results)
    report = build_report(config, run.rotations, solves, time.perf_counter() - start, run.resumed, checkpoint)
    if ref is not None:
        after = model_logits(model, verify_ids)
        err = float((after.double() - ref.double()).norm() / ref.double().norm())
        report["invariance_error"] = err
        param_dtype = next(model.parameters()).dtype
        tol = verify_tol if verify_tol is not None else invariance_tolerance(param_dtype)
        report["invariance_tolerance"] = tol
        if not invariance_ok(after, ref, param_dtype, rtol=tol):
            raise ValueError(f"rotated model's logits differ from the original's by {err:.3e} (relative), "
                             f"above the tolerance {tol:.1e} ({str(param_dtype).removeprefix('torch.')} model): "
                             "the write-back is wrong")
    return RotateResult(run.rotations, report, solves)


def rotate_streamed(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: RotateConfig | str | None = None,
    rotations: Iterable[str] | None = None,
    *,
    init: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
    callback: Callable[[str, int, float, dict], bool | None] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    report_extra: Mapping | None = None,
    extras: Callable[[Path, RotateResult], None] | None = None,
    **settings,
) -> RotateResult:
    """Rotate the checkpoint in ``model_dir`` and write it to ``out_dir``, streaming (the safetensors
    store, :class:`orthoopt.streaming.rotate.SafetensorsStore`: about one layer in memory).

    config:        as in :func:`rotate_model`, a method that streams (``Method.supports_streamed``: the
                   fixed ones and optrot, ``docs/solvers.md``); ``model_dtype``,
                   ``layers_per_shard``, ``chunk_rows``, ``arch`` are the store's fields.
    init, progress, callback, checkpoint, resume: as in :func:`rotate_model`; R2 is solved layer by
                   layer, each layer's solve reported as phase ``"R2"`` with steps from 0. Under
                   ``torchrun`` rank 0 writes R1's collective state to ``checkpoint`` and in R2 each rank
                   writes its own file (:func:`orthoopt.streaming.rotate.rank_partial`).
    report_extra:  entries merged into ``report.json``; ``extras(folder, result)`` may add files.

    The output folder matches ``save_rotated``'s (sharded safetensors, config, side files,
    ``orthoopt/rotations.safetensors``, ``report.json``), written to a temporary sibling and renamed into place.
    With the same settings the weights equal :func:`rotate_model`'s bit for bit on one machine. Under
    ``torchrun`` every rank returns the result; rank 0 writes. Raises ValueError / FileNotFoundError
    for bad arguments or inputs before anything is written.
    """
    from orthoopt.streaming.rotate import SafetensorsStore
    from orthoopt.utils.paths import prepare_output

    config = _as_config(config, rotations, settings)
    config.check_streamed()
    out_dir = Path(out_dir)
    prepare_output(out_dir, {"model_dir": model_dir}, what="out_dir")
    began = time.perf_counter()
    store = SafetensorsStore(model_dir, config, progress=progress)

    def finish(run: PhaseRun, rots: dict[str, torch.Tensor], results: dict[str, SolveResult]) -> RotateResult:
        solves = combine_results(run.units, results)
        report = build_report(config, rots, solves, time.perf_counter() - began, run.resumed, checkpoint)
        report.update(store.report())
        report.update(dict(report_extra or {}))
        return RotateResult(rots, report, solves)

    return store.run(out_dir, lambda: run_phases(store, config, init=init, progress=progress and store.rank == 0,
                                                 callback=callback, checkpoint=checkpoint, resume=resume),
                     finish, extras)


__all__ = ["MemoryStore", "PhaseRun", "RotateConfig", "RotateResult", "build_objective", "build_report",
           "combine_results", "rotate_model", "rotate_streamed", "run_phases"]
