"""Rotate a Hugging Face decoder with one method, end to end: the job behind ``orthoopt rotate``.

Data flows one way (``docs/architecture.md``): the adapter turns the model into weight blocks (and
calibration activations), a method turns those into an objective, a solver learns the rotations,
and the adapter fuses them back. This module is the only place that knows both sides.

Phases: ``R1`` is learned first and fused; then every ``R2.i`` is learned on the R1-rotated weights
(the value/output blocks then already carry R1, so the R2 objective sees the weights it will
actually change). Rotations are re-orthogonalized in float64 (polar) before they are fused, so the
saved ``rotations.safetensors`` is exactly what the weights carry.

Methods (``docs/objectives.md`` has the formulas):

===========  ============================================================  ==========  ===========
method       rotation                                                      data        solver
===========  ============================================================  ==========  ===========
identity     none (norms are still fused)                                  no          -
random       Haar-random orthogonal                                        no          -
hadamard     random Hadamard ``D H / sqrt(n)`` (QuaRot)                    no          -
optrot       learned: :class:`~orthoopt.objectives.FourthPower`            no          cayley-lbfgs
optrot+      learned: :class:`~orthoopt.objectives.HessianWeighted`        calibration cayley-lbfgs
kurtosis     learned: :class:`~orthoopt.objectives.Kurtosis` (KurTail)     calibration radam
dfrot        learned: :class:`~orthoopt.objectives.DFRotLoss`              calibration procrustes
spinquant    learned: :class:`~orthoopt.objectives.QuantizedLMLoss`        calibration cayley-sgd
===========  ============================================================  ==========  ===========

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

Exact resume: with ``checkpoint=PATH`` and ``checkpoint_every=k`` the run writes its whole state
(finished rotations in float64, the solver's state, the objective's sampling generators, the loss
histories; :mod:`orthoopt.resume`) to ``PATH`` every ``k`` steps and at each phase boundary;
``resume=True`` continues from ``PATH`` when it exists, refusing (ValueError naming the differences)
a file written with another method, model, solver or settings. A resumed run gives bit-identical
rotations to an uninterrupted one on the same machine with the same number of threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from orthoopt.adapters import DecoderAdapter, logits_relative_error  # noqa: F401 (re-exported helper)
from orthoopt.adapters.verify import logits as model_logits
from orthoopt.core.tolerance import invariance_tolerance
from orthoopt.manifold import orthogonality_error, reorthogonalize
from orthoopt.objectives import DFRotLoss, FourthPower, HessianWeighted, Kurtosis, Objective, QuantizedLMLoss
from orthoopt.resume import Partial, read_partial, settings_difference, tensor_checksum, write_partial
from orthoopt.solvers import SolveResult, initial_rotations, make_solver, solve
from orthoopt.utils.checks import check_device

FIXED_METHODS = {"identity": "identity", "random": "random", "hadamard": "hadamard"}
LEARNED_METHODS = {"optrot": "cayley-lbfgs", "optrot+": "cayley-lbfgs", "kurtosis": "radam", "dfrot": "procrustes",
                   "spinquant": "cayley-sgd"}
DATA_METHODS = ("optrot+", "kurtosis", "dfrot", "spinquant")
JOINT_METHODS = ("spinquant",)
"""Methods that learn all selected rotations in one solve (their objective is not a sum over phases)."""
DEFAULT_LR = {"spinquant": 1.5}
"""Learning rates that differ from the solver's default (SpinQuant's published setting)."""
COSINE_METHODS = ("spinquant",)
"""Methods whose solver step size decays as ``lr * (1 + cos(pi * step / steps)) / 2``."""
METHODS = (*FIXED_METHODS, *LEARNED_METHODS)
PHASES = ("R1", "R2")


def _phase_names(dims: Mapping[str, int], phase: str) -> dict[str, int]:
    return {k: n for k, n in dims.items() if k == phase or k.startswith(phase + ".")}


FULL_PRECISION_BLOCKS = ("embed_tokens", "lm_head")


def _blocks(adapter: DecoderAdapter, phase: str, include_embeddings: bool):
    blocks = adapter.weight_blocks(phase)
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


def build_objective(method: str, adapter: DecoderAdapter, phase: str | Iterable[str], calib: torch.Tensor | None = None,
                    calib_tokens: int = 2048, seed: int = 0, progress: bool = True,
                    include_embeddings: bool = False, sample_fraction: float | None = None,
                    device: torch.device | str | None = None, sim_quant=None, batch_size: int = 1,
                    micro_batch_size: int | None = None) -> Objective:
    """The objective of a learned ``method`` for the rotations of ``phase`` (``"R1"`` or ``"R2"``) on the
    adapter's current (fused, possibly partly rotated) weights. ``calib``: token ids ``[N, L]``, needed
    by the data-driven methods. ``include_embeddings``: see the module doc. ``sample_fraction`` and
    ``device`` are passed to :class:`~orthoopt.objectives.FourthPower` (optrot only). spinquant: ``phase``
    may be several phases (learned jointly), ``sim_quant`` is the simulated quantization
    (:class:`orthoopt.quant.rotated.SimQuantConfig`, default W4 RTN only), ``batch_size`` /
    ``micro_batch_size`` the calibration windows per step / per backward pass."""
    if method not in LEARNED_METHODS:
        raise ValueError(f"method {method!r} learns nothing; learned methods: {', '.join(LEARNED_METHODS)}")
    if method != "optrot" and (sample_fraction is not None or device is not None):
        raise ValueError(f"sample_fraction and device are supported by method 'optrot' only, not {method!r}")
    if method in DATA_METHODS and calib is None:
        raise ValueError(f"method {method!r} needs calibration text (--calib TEXT_FILE)")
    if method == "spinquant":
        from orthoopt.quant.rotated import RotatedQuantLM

        phases = (phase,) if isinstance(phase, str) else tuple(phase)
        loss_fn = RotatedQuantLM(adapter.model, sim_quant, rotations=phases)
        return QuantizedLMLoss(loss_fn, calib, batch_size=batch_size, micro_batch_size=micro_batch_size)
    if method == "optrot":
        return FourthPower(_blocks(adapter, phase, include_embeddings), sample_fraction=sample_fraction,
                           seed=seed, device=device)
    if method == "optrot+":
        blocks = _blocks(adapter, phase, include_embeddings)
        sources = adapter.block_sources(phase)
        modules = sorted({s[0] for s in sources.values() if s is not None})
        H = adapter.input_hessians(calib, modules=modules, progress=progress)
        hessians = []
        for b in blocks:
            src = sources[b.name]
            hessians.append(None if src is None else (H[src[0]] if src[1] is None else H[src[0]][src[1], src[1]]))
        return HessianWeighted(blocks, hessians)
    X = _activations(adapter, phase, calib, calib_tokens, seed, progress, include_embeddings)
    if method == "kurtosis":
        return Kurtosis(X)
    return DFRotLoss(X)


def _run_settings(model, method, phases, solver_name, solver_config, phase_steps, lr, seed, dtype,
                  include_embeddings, sample_fraction, device, calib, calib_tokens, init, stop) -> dict:
    """Everything a run's trajectory depends on, JSON-able, for refusing a foreign partial checkpoint."""
    return {
        "method": method, "rotations": list(phases), "solver": solver_name, "solver_settings": solver_config,
        "steps": dict(phase_steps), "lr": lr, "seed": seed, "dtype": str(dtype).removeprefix("torch."),
        "include_embeddings": include_embeddings, "sample_fraction": sample_fraction,
        "device": None if device is None else str(device), "calib_tokens": calib_tokens if calib is not None else None,
        "calib": None if calib is None else tensor_checksum([calib]),
        "init": None if init is None else tensor_checksum([init[k] for k in sorted(init)]),
        "model": tensor_checksum(t for _, t in sorted(model.state_dict().items())),
        "model_config": getattr(getattr(model, "config", None), "model_type", None),
        "stop": {k: v for k, v in sorted(stop.items())},
    }


def _result_summary(r: SolveResult) -> dict:
    return {"final_loss": r.final_loss, "orthogonality_error": r.orthogonality_error, "seconds": r.seconds,
            "stop_reason": r.stop_reason, "num_evaluations": r.num_evaluations,
            "num_reorthogonalizations": r.num_reorthogonalizations, "grad_norm": r.grad_norm}


def _saved_result(rots: dict[str, torch.Tensor], history: list[float], saved: dict) -> SolveResult:
    return SolveResult(rotations=rots, history=list(history), steps=len(history), **saved)


def _partial(settings: dict, phase: str, step: int, out: dict, solves: dict, solver=None, objective=None,
             history: list[float] | None = None) -> Partial:
    histories = {p: r.history for p, r in solves.items()}
    if history is not None:
        histories[phase] = history
    obj_state = objective.state_dict() if callable(getattr(objective, "state_dict", None)) else {}
    return Partial(settings=settings, phase=phase, step=step, done=dict(out),
                   solver=None if solver is None else solver.state_dict(), objective=obj_state,
                   histories=histories, results={p: _result_summary(r) for p, r in solves.items()})


def _phase_callback(phase, done, before, callback, out, solves, solver, objective, checkpoint, every, settings):
    """The per-step callback of one phase: the user's callback (step counted from the phase start)
    and the partial checkpoint every ``every`` steps."""
    history = list(before)

    def cb(i: int, loss: float, rotations: dict) -> bool:
        step = done + i
        history.append(loss)
        if checkpoint is not None and settings is not None and (step + 1) % every == 0:
            write_partial(checkpoint, _partial(settings, phase, step + 1, out, solves, solver, objective, history))
        return bool(callback(phase, step, loss, {**out, **rotations})) if callback is not None else False

    return cb if (callback is not None or checkpoint is not None) else None


def _cosine(solver, lr: float, total: int, done: int, callback):
    """Set ``solver.lr`` to the cosine schedule ``lr * (1 + cos(pi * t / total)) / 2`` before each step
    ``t`` (``done`` steps were taken by an earlier run); chains ``callback``."""
    import math

    def at(t: int) -> float:
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(t, total) / max(total, 1)))

    solver.lr = max(at(done), 1e-12)

    def cb(i, loss, r):
        solver.lr = max(at(done + i + 1), 1e-12)  # CayleySGD rejects lr <= 0
        return callback(i, loss, r) if callback is not None else None

    return cb


@dataclass
class RotateResult:
    """What :func:`rotate_model` returns: the fused rotations (float64) and a JSON-able report."""

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


def rotate_model(
    model,
    method: str,
    rotations: Iterable[str] = PHASES,
    *,
    solver: str | None = None,
    steps: int | Mapping[str, int] = 100,
    lr: float | None = None,
    seed: int = 0,
    calib: torch.Tensor | None = None,
    calib_tokens: int = 2048,
    init: Mapping[str, torch.Tensor] | None = None,
    verify_ids: torch.Tensor | None = None,
    verify_tol: float | None = None,
    dtype: torch.dtype = torch.float32,
    include_embeddings: bool = False,
    sample_fraction: float | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    callback: Callable[[str, int, float, dict], bool | None] | None = None,
    stop: Mapping[str, float | int | None] | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    sim_quant=None,
    batch_size: int = 1,
    micro_batch_size: int | None = None,
    schedule_steps: int | None = None,
) -> RotateResult:
    """Fuse norms, learn (or draw) the rotations of ``method`` and fuse them into ``model`` in place.

    rotations:  which of ``"R1"``, ``"R2"`` to use (R1 first, see the module doc).
    solver, lr: override the method's default solver / learning rate (:func:`orthoopt.solvers.make_solver`).
    steps:      solver steps per phase (learned methods only), or ``{phase: steps}`` (a resumed run
                passes the steps left; a phase missing from the dict takes no step).
    calib:      calibration token ids ``[N, L]`` for optrot+, kurtosis, dfrot.
    init:       starting rotations (e.g. a previous run's ``rotations.safetensors``); rotations it
                names start there instead of at a random Hadamard. A fixed method ignores it.
    verify_ids: token ids ``[B, L]`` on which the logits before and after must agree; the relative
                error goes into the report and a ValueError is raised above ``verify_tol`` (default
                1e-4 for float32 models, 1e-6 for float64 ones: transformers' RMSNorm computes in
                float32 whatever the model dtype, see ``docs/adapters.md``).
    dtype:      dtype the rotations are learned in.
    include_embeddings: put ``embed_tokens``/``lm_head`` into learned objectives (module doc).
    sample_fraction, device: optrot only: rows sampled per step (unbiased, ``docs/performance.md``)
                and the device the objective and solver compute on (weights are fused on the CPU).
    callback:   ``callback(phase, step, loss, rotations)`` after each solver step (``step`` counts from
                the phase's start, also in a resumed run), with the rotations of the finished phases
                (as fused) and the current iterate; a true return stops that phase early. A joint
                method (spinquant) reports its one solve as phase ``"R1"`` (the first selected phase)
                with all its rotations, and takes ``steps`` of that phase.
    stop:       stopping criteria passed to :func:`~orthoopt.solvers.solve` (``min_grad_norm``,
                ``min_rel_decrease``, ``window``, ``max_seconds``); ``steps`` stays the maximum.
    checkpoint, checkpoint_every, resume: exact resume, see the module doc. ``steps`` are the phases'
                totals (a resumed phase takes the steps left). The file is left in place when the run
                ends; the caller removes it once the output is safely written.
    sim_quant, batch_size, micro_batch_size: spinquant only (:func:`build_objective`).
    schedule_steps: length of the cosine step-size decay of spinquant (default: the phase's steps).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    device = check_device(device, "device")
    phases = [p for p in PHASES if p in set(rotations)]
    unknown = set(rotations) - set(PHASES)
    if unknown or not phases:
        raise ValueError(f"rotations must be a non-empty subset of {PHASES}, got {sorted(set(rotations))}")
    phase_steps = dict(steps) if isinstance(steps, Mapping) else {p: steps for p in phases}
    stop = dict(stop or {})
    if not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be a non-negative int, got {checkpoint_every!r}")
    if (checkpoint_every or resume) and checkpoint is None:
        raise ValueError("checkpoint_every and resume need checkpoint=PATH")
    start = time.perf_counter()
    ref = model_logits(model, verify_ids) if verify_ids is not None else None
    learned = method in LEARNED_METHODS
    solver_name = (solver or LEARNED_METHODS[method]) if learned else None
    if method != "spinquant" and (sim_quant is not None or batch_size != 1 or micro_batch_size is not None):
        raise ValueError(f"sim_quant, batch_size and micro_batch_size are for method 'spinquant', not {method!r}")
    if method == "spinquant" and sim_quant is None:
        from orthoopt.quant.rotated import SimQuantConfig

        sim_quant = SimQuantConfig()
    if lr is None and solver is None and method in DEFAULT_LR:
        lr = DEFAULT_LR[method]
    kwargs = {} if lr is None else {"lr": lr}
    settings = partial = None
    if checkpoint is not None and (resume or (learned and checkpoint_every)):
        config = make_solver(solver_name, **kwargs).config() if learned else None
        settings = _run_settings(model, method, phases, solver_name, config,
                                 phase_steps, lr, seed, dtype, include_embeddings, sample_fraction, device,
                                 calib, calib_tokens, init, stop)
        if resume and Path(checkpoint).is_file():
            partial = read_partial(checkpoint)
            asked = phase_steps.get(partial.phase, 0)
            if partial.step > asked:
                raise ValueError(f"{checkpoint}: phase {partial.phase} has already taken {partial.step} steps, more "
                                 f"than the {asked} asked for now (--steps {asked}); rerun with the interrupted run's "
                                 f"settings (steps {partial.settings.get('steps')}) to continue, or delete the file "
                                 "to start afresh")
            diff = settings_difference(partial.settings, settings)
            if diff:
                raise ValueError(f"{checkpoint} is the partial checkpoint of a different run ({'; '.join(diff)}); "
                                 "rerun with the same settings, or delete it to start afresh")
    adapter = DecoderAdapter(model)
    adapter.fuse_norms()
    dims = adapter.rotation_dims()
    joint = method in JOINT_METHODS
    groups = [tuple(phases)] if joint else [(p,) for p in phases]
    out: dict[str, torch.Tensor] = {}
    solves: dict[str, SolveResult] = {}
    for gi, group in enumerate(groups):
        phase = group[0]
        pdims = {k: n for p in group for k, n in _phase_names(dims, p).items()}
        if not learned:
            rots = initial_rotations(pdims, FIXED_METHODS[method], seed=seed, dtype=torch.float64)
        elif partial is not None and phase in partial.results:  # finished before the interruption
            rots = {k: partial.done[k] for k in pdims}
            solves[phase] = _saved_result(rots, partial.histories[phase], partial.results[phase])
        else:
            objective = build_objective(method, adapter, group if joint else phase, calib, calib_tokens, seed,
                                        progress, include_embeddings, sample_fraction, device,
                                        **({"sim_quant": sim_quant, "batch_size": batch_size,
                                            "micro_batch_size": micro_batch_size} if method == "spinquant" else {}))
            start_rots = initial_rotations(pdims, "hadamard", seed=seed, dtype=dtype, device=device)
            for k in pdims:
                if init is not None and k in init:
                    start_rots[k] = init[k].to(dtype=dtype, device=start_rots[k].device)
            solver_obj = make_solver(solver_name, **kwargs)
            done, before = 0, []
            if partial is not None and partial.phase == phase and partial.solver is not None:
                if partial.objective:
                    objective.load_state_dict(partial.objective)
                where = next(iter(start_rots.values())).device
                solver_obj.load_state_dict({"tensors": {k: v.to(where) for k, v in partial.solver["tensors"].items()},
                                            "meta": partial.solver["meta"]})
                done, before = partial.step, list(partial.histories.get(phase, []))
            cb = _phase_callback(phase, done, before, callback, out, solves, solver_obj, objective,
                                 checkpoint if checkpoint_every else None, checkpoint_every, settings)
            if method in COSINE_METHODS and hasattr(solver_obj, "lr"):
                total = schedule_steps or phase_steps.get(phase, 0)
                cb = _cosine(solver_obj, float(solver_obj.lr), total, done, cb)
            result = solve(objective, None if done or before else start_rots, solver_obj,
                           max(0, phase_steps.get(phase, 0) - done), callback=cb, progress=progress,
                           prior_history=before, **stop)
            result.history = before + result.history
            result.steps = len(result.history)
            solves[phase] = result
            rots = {k: reorthogonalize(R.detach().to("cpu", torch.float64)) for k, R in result.rotations.items()}
        adapter.apply_rotations(rots)
        out.update(rots)
        if learned and settings is not None and checkpoint_every and gi + 1 < len(groups):  # phase boundary
            write_partial(checkpoint, _partial(settings, groups[gi + 1][0], 0, out, solves))
    report = {
        "method": method,
        "rotations": phases,
        "solver": solver_name,
        "steps": phase_steps if learned else 0,
        "lr": lr,
        "seed": seed,
        "include_embeddings": include_embeddings,
        "sample_fraction": sample_fraction,
        **({"sim_quant": (sim_quant.to_dict() if sim_quant is not None else None), "batch_size": batch_size,
            "micro_batch_size": micro_batch_size or batch_size, "lr_schedule": "cosine"}
           if method == "spinquant" else {}),
        "device": None if device is None else str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": time.perf_counter() - start,
        "orthogonality_error": max(orthogonality_error(R) for R in out.values()),
        "loss": {p: loss_summary(r.history) | {"final": r.final_loss, "orthogonality_error": r.orthogonality_error,
                                               "evaluations": r.num_evaluations, "stop_reason": r.stop_reason,
                                               "reorthogonalizations": r.num_reorthogonalizations}
                 for p, r in solves.items()},
    }
    if stop:
        report["stop"] = stop
    if partial is not None:
        report["resumed"] = {"from": str(checkpoint), "phase": partial.phase, "steps_done": partial.step}
    if ref is not None:
        err = float((model_logits(model, verify_ids) - ref).norm() / ref.norm())
        report["invariance_error"] = err
        param_dtype = next(model.parameters()).dtype
        tol = verify_tol if verify_tol is not None else invariance_tolerance(param_dtype)
        report["invariance_tolerance"] = tol
        if not err <= tol:
            raise ValueError(f"rotated model's logits differ from the original's by {err:.3e} (relative), "
                             f"above the tolerance {tol:.1e}: the write-back is wrong")
    return RotateResult(out, report, solves)
