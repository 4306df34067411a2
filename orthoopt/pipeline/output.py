"""The one output writer of a rotate run, in memory and streamed alike.

A run's folder is written to a temporary sibling and renamed into place only when complete
(:func:`orthoopt.utils.atomic.atomic_dir`): the store's weights and side files
(:meth:`~orthoopt.store.WeightStore.write_weights`), then ``orthoopt/rotations.safetensors`` and
``report.json`` (:func:`orthoopt.models.io.write_run_files`), then the caller's extra files (plots).
A streamed store writes its layers into the folder while the loop runs (it is opened before the loop,
:meth:`~orthoopt.store.WeightStore.open_output`); the in-memory store writes the module at the end.
Under ``torchrun`` every rank runs the loop, the rotations are gathered, rank 0 writes and every rank
learns whether it succeeded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from orthoopt.models.io import write_run_files
from orthoopt.pipeline.loop import PhaseRun
from orthoopt.pipeline.report import RotateResult
from orthoopt.solvers.distributed import all_gather_objects
from orthoopt.store import WeightStore
from orthoopt.utils.atomic import atomic_dir

Finish = Callable[[PhaseRun, dict, dict], RotateResult]
"""``finish(run, rotations, results)``: the run's :class:`RotateResult` (report built, checks done)."""


def _write(store: WeightStore, folder: Path, run: PhaseRun, rotations: dict, results: dict, finish: Finish,
           extras: Callable[[Path, RotateResult], None] | None) -> RotateResult:
    store.write_weights(folder)
    result = finish(run, rotations, results)
    write_run_files(folder, result.rotations, result.report)
    if extras is not None:
        extras(folder, result)
    return result


def run_and_write(store: WeightStore, out_dir: str | Path, loop: Callable[[], PhaseRun], finish: Finish,
                  extras: Callable[[Path, RotateResult], None] | None = None) -> RotateResult:
    """Run ``loop()`` (the phase loop over ``store``) and write ``out_dir`` atomically.

    Parameters
    ----------
    store : WeightStore
        The store the loop rotates; it writes the weights.
    out_dir : str or Path
        The output folder; replaced only when everything is written.
    loop : callable
        Runs the phase loop and returns its :class:`~orthoopt.pipeline.loop.PhaseRun`.
    finish : callable
        ``finish(run, rotations, results)`` builds the :class:`RotateResult` (report, checks); an
        exception here leaves no output.
    extras : callable, optional
        ``extras(folder, result)`` adds files to the temporary folder before the rename.

    Returns
    -------
    RotateResult
        The result, on every rank.
    """
    if store.world_size == 1:
        with atomic_dir(out_dir) as tmp:
            store.open_output(tmp)
            run = loop()
            return _write(store, tmp, run, run.rotations, run.results, finish, extras)
    run = loop()
    rotations, results = store.gather(run.rotations, run.results)
    error: BaseException | None = None
    result = None
    if store.rank == 0:
        try:
            with atomic_dir(out_dir) as tmp:
                store.open_output(tmp)
                result = _write(store, tmp, run, rotations, results, finish, extras)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = e
    status = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")[0]
    if error is not None:
        raise error
    if status is not None:
        raise RuntimeError(f"rank 0 failed to write {out_dir}: {status}")
    return result if result is not None else finish(run, rotations, results)


__all__ = ["run_and_write"]
