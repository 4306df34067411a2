"""``rotate_model`` (a module in memory) and ``rotate_streamed`` (a folder, layer by layer): the
phase loop over a store, the report, the invariance check and the one output writer."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from orthoopt.adapters.verify import logits as model_logits
from orthoopt.config import PHASES, RotateConfig
from orthoopt.core.tolerance import invariance_ok, invariance_tolerance
from orthoopt.errors import InvalidInputError
from orthoopt.pipeline.loop import PhaseRun, combine_results, run_phases
from orthoopt.pipeline.memory import MemoryStore
from orthoopt.pipeline.output import run_and_write
from orthoopt.pipeline.report import RotateResult, build_report
from orthoopt.solvers import SolveResult


def _as_config(config: RotateConfig | str | None, rotations, kwargs: dict) -> RotateConfig:
    """A :class:`RotateConfig` from ``config``, or from a method name and keyword settings (the
    keyword form of :func:`rotate_model` / :func:`rotate_streamed`)."""
    if isinstance(config, RotateConfig):
        if kwargs or rotations is not None:
            raise InvalidInputError(f"pass settings either as a RotateConfig or as keywords, not both "
                             f"(got {sorted(kwargs) + (['rotations'] if rotations is not None else [])})")
        return config
    if config is not None and not isinstance(config, str):
        raise InvalidInputError(f"config must be a RotateConfig or a method name, got {type(config).__name__}")
    if "dtype" in kwargs and isinstance(kwargs["dtype"], torch.dtype):
        kwargs["dtype"] = str(kwargs["dtype"]).removeprefix("torch.")
    if "method" in kwargs and config is not None:
        raise InvalidInputError(f"method given twice: {config!r} and method={kwargs['method']!r}")
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
    out: str | os.PathLike | None = None,
    tokenizer=None,
    report_extra: Mapping | None = None,
    extras: Callable[[Path, RotateResult], None] | None = None,
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
    out:        write the rotated model to this folder as ``orthoopt rotate`` does, through the one output
                writer of both stores (:func:`orthoopt.pipeline.output.run_and_write`: ``save_pretrained``
                files, ``tokenizer``'s files when given, ``orthoopt/rotations.safetensors``, ``report.json``
                with ``report_extra`` merged in; ``extras(folder, result)`` may add files), atomically: a
                failed check leaves no folder. Without ``out`` nothing is written.
    """
    config = _as_config(config, rotations, settings)
    start = time.perf_counter()
    ref = model_logits(model, verify_ids) if verify_ids is not None else None
    store = MemoryStore(model, tokenizer)

    def loop() -> PhaseRun:
        return run_phases(store, config, calib=calib, init=init, progress=progress, callback=callback,
                          checkpoint=checkpoint, resume=resume)

    def finish(run: PhaseRun, rots: dict[str, torch.Tensor], results: dict[str, SolveResult]) -> RotateResult:
        solves = combine_results(run.units, results)
        report = build_report(config, rots, solves, time.perf_counter() - start, run.resumed, checkpoint)
        if ref is not None:
            after = model_logits(model, verify_ids)
            err = float((after.double() - ref.double()).norm() / ref.double().norm())
            report["invariance_error"] = err
            param_dtype = next(model.parameters()).dtype
            tol = verify_tol if verify_tol is not None else invariance_tolerance(param_dtype)
            report["invariance_tolerance"] = tol
            if not invariance_ok(after, ref, param_dtype, rtol=tol):
                raise InvalidInputError(f"rotated model's logits differ from the original's by {err:.3e} (relative), "
                                 f"above the tolerance {tol:.1e} ({str(param_dtype).removeprefix('torch.')} model): "
                                 "the write-back is wrong")
        report = {**dict(report_extra or {}), **report}
        return RotateResult(rots, report, solves)

    if out is None:
        run = loop()
        return finish(run, run.rotations, run.results)
    return run_and_write(store, out, loop, finish, extras)


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

    return run_and_write(store, out_dir, lambda: run_phases(store, config, init=init,
                                                           progress=progress and store.rank == 0,
                                                           callback=callback, checkpoint=checkpoint, resume=resume),
                         finish, extras)
