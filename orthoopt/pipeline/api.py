"""``rotate_model`` (a module in memory) and ``rotate_streamed`` (a folder, layer by layer): the
phase loop over a store, the report, the invariance check and the one output writer."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace
from pathlib import Path
from typing import Callable, Mapping

import torch

from orthoopt.adapters.verify import logits as model_logits
from orthoopt.config import RotateConfig
from orthoopt.core.tolerance import invariance_ok, invariance_tolerance
from orthoopt.errors import InvalidInputError
from orthoopt.pipeline.loop import PhaseRun, combine_results, run_phases
from orthoopt.pipeline.memory import MemoryStore
from orthoopt.pipeline.output import run_and_write
from orthoopt.pipeline.report import RotateResult, build_report
from orthoopt.solvers import SolveResult


def _as_config(config: RotateConfig | None) -> RotateConfig:
    """``config``, or the default :class:`RotateConfig` (optrot) when None; anything else is refused."""
    if config is None:
        return RotateConfig()
    if not isinstance(config, RotateConfig):
        hint = f" (RotateConfig({config!r}))" if isinstance(config, str) else ""
        raise InvalidInputError(f"config must be a RotateConfig{hint}, got {type(config).__name__}")
    return config


def rotate_model(
    model,
    config: RotateConfig | None = None,
    *,
    calib=None,
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
) -> RotateResult:
    """Fuse norms, learn (or draw) the rotations of ``config`` and fuse them into ``model`` in place.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A decoder of an architecture in :data:`orthoopt.adapters.archs.ARCHS`.
    config : RotateConfig, optional
        The run's settings (:class:`~orthoopt.config.RotateConfig`; default optrot with its budget),
        e.g. ``RotateConfig("optrot", seed=1, solve={"steps": 50})``. The only way settings are given.
    calib : torch.Tensor or str or os.PathLike or CalibSource, optional
        Calibration data for the methods that need it (``Method.needs_calibration``): token ids
        ``[N, L]``, or text (a file, ``hf:NAME[:CONFIG]``, a
        :class:`~orthoopt.quant.calib_source.CalibSource`) cut with ``tokenizer`` into the windows of
        ``config.calib.tokens`` / ``config.calib.seq_len`` (:func:`orthoopt.pipeline.calibration.rotation_calibration`,
        the windows ``orthoopt rotate --calib`` takes).
    init : mapping of str to torch.Tensor, optional
        Starting rotations (e.g. a previous run's, :func:`~orthoopt.models.load_rotations`); the
        rotations it names start there instead of at a random Hadamard. A fixed method ignores it.
    verify_ids : torch.Tensor, optional
        Token ids ``[B, L]`` on which the logits before and after must agree; the relative error goes
        into the report and a ValueError is raised above ``verify_tol`` (default the model dtype's
        ``rtol`` of :data:`orthoopt.core.tolerance.INVARIANCE`, with its ``atol``: 1e-4 for float32
        models, 1e-6 for float64, 16 unit roundoffs for bfloat16 / float16, ``docs/conventions.md``).
    verify_tol : float, optional
        See ``verify_ids``.
    progress : bool
        Progress bars on stderr.
    callback : callable, optional
        ``callback(phase, step, loss, rotations)`` after each solver step (``step`` counts from the
        unit's start, also in a resumed run: R1, then each layer's R2 from 0, reported as phase
        ``"R2"``), with the rotations of the finished units (as fused) and the current iterate; a true
        return stops that unit early (one layer's R2: the next layer still runs). A joint method
        (spinquant) reports its one solve as phase ``"R1"`` (the first selected phase) with all its
        rotations, and takes ``steps`` of that phase.
    checkpoint : str or Path, optional
        The partial checkpoint file (exact resume, see the package doc); every
        ``config.solve.checkpoint_every`` steps and at each unit's end. ``steps`` are per unit (R1; each
        ``R2.i``). The file is left in place when the run ends; the caller removes it once the output
        is safely written.
    resume : bool
        Continue from ``checkpoint`` if it exists (refused if written with other settings).
    out : str or os.PathLike, optional
        Write the rotated model to this folder as ``orthoopt rotate`` does, through the one output
        writer of both stores (:func:`orthoopt.pipeline.output.run_and_write`: ``save_pretrained``
        files, ``tokenizer``'s files when given, ``orthoopt/rotations.safetensors``, ``report.json``),
        atomically: a failed check leaves no folder. Without ``out`` nothing is written.
    tokenizer : optional
        The model's tokenizer (written with ``out``; cuts text ``calib``).
    report_extra : mapping, optional
        Entries merged into the report (``report.json``).
    extras : callable, optional
        ``extras(folder, result)`` may add files to the output folder before it is renamed into place.

    Returns
    -------
    RotateResult
        The rotations, the report and each phase's :class:`~orthoopt.solvers.SolveResult`.
    """
    config = _as_config(config)
    if calib is not None and not isinstance(calib, torch.Tensor):
        from orthoopt.pipeline.calibration import rotation_calibration

        calib = rotation_calibration(config, calib, tokenizer, getattr(model, "config", None))
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
    config: RotateConfig | None = None,
    *,
    calib=None,
    tokenizer=None,
    init: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
    callback: Callable[[str, int, float, dict], bool | None] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    report_extra: Mapping | None = None,
    extras: Callable[[Path, RotateResult], None] | None = None,
) -> RotateResult:
    """Rotate the checkpoint in ``model_dir`` and write it to ``out_dir``, streaming (the safetensors
    store, :class:`orthoopt.streaming.rotate.SafetensorsStore`: about one layer in memory).

    Parameters
    ----------
    model_dir : str or os.PathLike
        A Hugging Face folder with safetensors weights.
    out_dir : str or os.PathLike
        The output folder (sharded safetensors, config, side files, ``orthoopt/rotations.safetensors``,
        ``report.json``), written to a temporary sibling and renamed into place.
    config : RotateConfig, optional
        The run's settings (default optrot), of a method that streams (``Method.supports_streamed``,
        ``docs/solvers.md``); ``checkpoint`` (dtype, layers_per_shard, arch) and
        ``compute.chunk_rows`` are the store's settings.
    calib : torch.Tensor or str or os.PathLike or CalibSource, optional
        Calibration data of a data method (optrot+, kurtosis, dfrot), as in :func:`rotate_model`;
        text is cut with ``tokenizer`` (default: the folder's own). The statistics are taken one
        decoder layer at a time (:mod:`orthoopt.streaming.statistics`): kurtosis and dfrot hold
        ``calib.tokens`` rows per input-sharing group and layer for the phase, as in memory; optrot+
        writes its weighted blocks to a scratch folder inside the temporary output.
    tokenizer : optional
        Cuts text ``calib`` (default: ``AutoTokenizer`` of ``model_dir``).
    init, progress, callback, checkpoint, resume : optional
        As in :func:`rotate_model`; R2 is solved layer by layer, each layer's solve reported as phase
        ``"R2"`` with steps from 0. Under ``torchrun`` rank 0 writes R1's collective state to
        ``checkpoint`` and in R2 each rank writes its own file (:func:`orthoopt.streaming.rotate.rank_partial`).
    report_extra : mapping, optional
        Entries merged into ``report.json``.
    extras : callable, optional
        ``extras(folder, result)`` may add files before the folder is renamed into place.

    Returns
    -------
    RotateResult
        With the same settings the weights equal :func:`rotate_model`'s bit for bit on one machine.
        Under ``torchrun`` every rank returns the result; rank 0 writes.

    Raises
    ------
    InvalidInputError, FileNotFoundError
        For bad arguments or inputs, before anything is written.
    """
    from orthoopt.streaming.rotate import SafetensorsStore
    from orthoopt.utils.paths import prepare_output

    config = _as_config(config)
    config.check_streamed()
    out_dir = Path(out_dir)
    prepare_output(out_dir, {"model_dir": model_dir}, what="out_dir")
    began = time.perf_counter()
    store = SafetensorsStore(model_dir, config, progress=progress)
    if calib is not None and not isinstance(calib, torch.Tensor):
        from orthoopt.pipeline.calibration import rotation_calibration

        if tokenizer is None and config.entry.needs_calibration:
            from orthoopt.models.io import load_tokenizer

            tokenizer = load_tokenizer(model_dir)
        context = SimpleNamespace(max_position_embeddings=store.ckpt.config.get("max_position_embeddings"))
        calib = rotation_calibration(config, calib, tokenizer, context)

    def finish(run: PhaseRun, rots: dict[str, torch.Tensor], results: dict[str, SolveResult]) -> RotateResult:
        solves = combine_results(run.units, results)
        report = build_report(config, rots, solves, time.perf_counter() - began, run.resumed, checkpoint)
        report.update(store.report())
        report.update(dict(report_extra or {}))
        return RotateResult(rots, report, solves)

    return run_and_write(store, out_dir, lambda: run_phases(store, config, calib=calib, init=init,
                                                           progress=progress and store.rank == 0,
                                                           callback=callback, checkpoint=checkpoint, resume=resume),
                         finish, extras)
