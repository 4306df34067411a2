"""OptRot on a checkpoint that need not fit in memory: learn R1 and every R2.i streaming from disk.

:func:`rotate_streamed` is :func:`orthoopt.pipeline.rotate_model` ``(model, "optrot", ...)`` for a model
folder, holding about one layer at a time:

1. **R1.** Each solver step reads the norm-fused R1 blocks layer by layer and accumulates the loss and
   gradient (:class:`~orthoopt.streaming.objective.StreamedFourthPower`); the solver, the start (random
   Hadamard, :func:`orthoopt.solvers.initial_rotations`) and the float64 polar re-orthogonalization
   before fusing are the pipeline's.
2. **R2 and write-back, one pass.** For each layer: read it, fuse the norms, fuse R1 (float64, cast back
   as the pipeline does), learn ``R2.i`` on that layer's R1-rotated v/o blocks alone (they are the only
   blocks next to it), fuse it, and write the layer's shard.

The output folder matches ``save_rotated``'s: sharded safetensors with ``model.safetensors.index.json``,
``config.json`` (``tie_word_embeddings`` cleared when fusion unties lm_head), the other files of the
input folder (tokenizer, generation config), ``rotations.safetensors`` and ``report.json``, written to a
temporary sibling and renamed into place (``orthoopt.utils.atomic.atomic_dir``).

With the same arguments the weights equal the in-memory pipeline's bit for bit on the same machine
(the objective's segments and summation order are the same, :mod:`orthoopt.objectives.row_segments`),
up to the float64 products of the embedding and lm_head, which are formed in row slices here.

Under ``torchrun`` (an initialized process group) the R1 row stream is split across ranks and the
gradient all-reduced (:class:`orthoopt.solvers.distributed.DistributedObjective`); the layers' R2
problems are split too and their results gathered; rank 0 writes the output.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm.auto import tqdm

from orthoopt.adapters.io import REPORT_FILE, ROTATIONS_FILE
from orthoopt.manifold import orthogonality_error, reorthogonalize
from orthoopt.objectives import FourthPower
from orthoopt.pipeline import FULL_PRECISION_BLOCKS, PHASES, RotateResult, loss_summary
from orthoopt.solvers import SolveResult, initial_rotations, make_solver, solve
from orthoopt.solvers.distributed import (
    DistributedObjective,
    all_gather_objects,
    max_rank_difference,
    shard_ranges,
    world,
)
from orthoopt.streaming.checkpoint import INDEX_FILE, SafetensorsCheckpoint
from orthoopt.streaming.fused import FusedReader
from orthoopt.streaming.layer_rotation import apply_r1, apply_r2, r2_blocks, rotate_rows
from orthoopt.streaming.layout import DecoderLayout
from orthoopt.streaming.objective import StreamedFourthPower
from orthoopt.streaming.shards import ShardedWriter
from orthoopt.utils.atomic import atomic_dir
from orthoopt.utils.checks import check_device
from orthoopt.utils.paths import prepare_output

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

STREAMED_METHODS = ("optrot",)
DEFAULT_SOLVER = "cayley-lbfgs"  # the in-memory pipeline's default for optrot
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_NOT_COPIED = {"config.json", INDEX_FILE, "pytorch_model.bin.index.json", ROTATIONS_FILE, REPORT_FILE}
F64 = torch.float64


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process so far, in MiB (``getrusage``: KiB on Linux); None where
    the ``resource`` module is missing (Windows)."""
    if resource is None:  # pragma: no cover
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Streamed:
    """One streamed run: the reader, the settings shared by both phases, and this rank's place."""

    def __init__(self, model_dir, solver, lr, seed, init, dtype, model_dtype, chunk_rows, sample_fraction,
                 device, arch, include_embeddings, progress) -> None:
        self.ckpt = SafetensorsCheckpoint(model_dir)
        self.layout = DecoderLayout.from_checkpoint(self.ckpt, arch)
        self.reader = FusedReader(self.ckpt, self.layout, model_dtype)
        self.solver_name, self.solver_kwargs = solver, ({} if lr is None else {"lr": lr})
        self.seed, self.init, self.dtype = seed, init, dtype
        self.chunk_rows, self.sample_fraction = chunk_rows, sample_fraction
        self.device = None if device is None else torch.device(device)
        self.include_embeddings = include_embeddings
        self.progress = progress
        self.rank, self.world_size = world()
        self.rank_difference = 0.0  # max |R1 - R1 of rank 0| at the end of a distributed R1 solve

    def start(self, name: str, n: int) -> dict[str, torch.Tensor]:
        rots = initial_rotations({name: n}, "hadamard", seed=self.seed, dtype=self.dtype)
        if self.init is not None and name in self.init:
            rots[name] = self.init[name].to(self.dtype)
        return rots

    def solve(self, objective, name: str, n: int, steps: int, callback=None, progress=False) -> SolveResult:
        return solve(objective, self.start(name, n), make_solver(self.solver_name, **self.solver_kwargs), steps,
                     callback=callback, progress=progress, device=self.device)

    # R1 ---------------------------------------------------------------------------------------
    def learn_r1(self, steps: int, callback) -> tuple[torch.Tensor, SolveResult]:
        units = [u for u in self.reader.units()
                 if self.include_embeddings or self.reader.unit_block_name(u) not in FULL_PRECISION_BLOCKS]
        share = shard_ranges([self.reader.unit_numel(u) for u in units], self.world_size)[self.rank]
        local = None
        if len(share):
            local = StreamedFourthPower(self.reader, [units[j] for j in share], chunk_rows=self.chunk_rows,
                                        sample_fraction=self.sample_fraction, seed=self.seed, device=self.device)
        objective = local if self.world_size == 1 else DistributedObjective(local, {"R1": self.layout.hidden})
        cb = None if callback is None else (lambda i, loss, r: callback("R1", i, loss, r))
        result = self.solve(objective, "R1", self.layout.hidden, steps, cb, self.progress and self.rank == 0)
        R1 = result.rotations["R1"]
        if self.world_size > 1:
            self.rank_difference = max_rank_difference({"R1": R1})
            dist.broadcast(R1, src=0)  # identical already (checked above); rank 0's is the one written
        return reorthogonalize(R1.detach().to(F64)).cpu(), result

    # R2 ---------------------------------------------------------------------------------------
    def learn_r2(self, t: dict[str, torch.Tensor], i: int, steps: int) -> tuple[torch.Tensor, SolveResult]:
        """Learn ``R2.i`` on layer ``i``'s tensors ``t`` (norms fused, R1 fused)."""
        objective = FourthPower(r2_blocks(t, self.layout, i), sample_fraction=self.sample_fraction, seed=self.seed,
                                device=self.device)
        result = self.solve(objective, f"R2.{i}", self.layout.head_dim, steps)
        return reorthogonalize(result.rotations[f"R2.{i}"].detach().to(F64)).cpu(), result

    def layer(self, i: int, R1: torch.Tensor | None) -> dict[str, torch.Tensor]:
        t = self.reader.layer(i)
        if R1 is not None:
            apply_r1(t, self.layout, i, R1)
        return t

    def learn_r2_share(self, R1, steps: int) -> dict[int, tuple[torch.Tensor, SolveResult]]:
        """Distributed runs: learn the R2 of this rank's layers, then gather every rank's results."""
        share = shard_ranges([1] * self.layout.num_layers, self.world_size)[self.rank]
        mine = {}
        for i in tqdm(share, desc="R2 (this rank's layers)", disable=not self.progress, file=sys.stderr):
            mine[i] = self.learn_r2(self.layer(i, R1), i, steps)
        out: dict[int, tuple[torch.Tensor, SolveResult]] = {}
        for part in all_gather_objects(mine):
            out.update(part)
        return out


def _shard_plan(layout: DecoderLayout, layers_per_shard: int) -> tuple[int, dict[int, int]]:
    """``(number of shards, {layer: shard})``: shard 0 the embedding, then the layers, last the final
    norm and lm_head."""
    groups = -(-layout.num_layers // layers_per_shard)
    return groups + 2, {i: 1 + i // layers_per_shard for i in range(layout.num_layers)}


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the input folder's top-level files other than weights, config and orthoopt outputs."""
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in _NOT_COPIED or p.name.endswith(_WEIGHT_SUFFIXES) or p.name.startswith("."):
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def _write_config(src: Path, dst: Path, untie: bool, model_dtype: torch.dtype) -> None:
    """``config.json`` as ``save_pretrained`` of the rotated model writes it: the dtype of the saved
    weights, and ``tie_word_embeddings=False`` when fusion untied lm_head."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src)
    if untie:
        for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
            cfg.tie_word_embeddings = False
    config.dtype = model_dtype
    config.save_pretrained(dst)


def _write_model(run: _Streamed, folder: Path, R1, r2: dict | None, r2_steps: int | None,
                 layers_per_shard: int) -> dict[int, tuple[torch.Tensor, SolveResult]]:
    """The R2-and-write-back pass (see the module doc). ``r2``: precomputed ``{layer: (R2, result)}``
    (distributed runs), or None to learn each R2.i here when ``r2_steps`` is not None. Returns the R2s."""
    L, reader, ckpt = run.layout, run.reader, run.ckpt
    num_shards, layer_shard = _shard_plan(L, layers_per_shard)
    writer = ShardedWriter(folder, num_shards)
    learned: dict[int, tuple[torch.Tensor, SolveResult]] = dict(r2 or {})
    layer_keys = {k for i in range(L.num_layers) for k in reader.layer_keys(i)}
    special = {L.key(L.embed), L.key(L.final_norm), L.key(L.lm_head)}

    # shard 0: the embedding (rotated in row slices) and any tensor outside the layers
    E = torch.empty(ckpt.shape(L.key(L.embed)), dtype=reader.dtype)
    start = 0
    for rows in reader.embed_rows():
        E[start:start + rows.shape[0]] = rows if R1 is None else rotate_rows(rows, R1)
        start += rows.shape[0]
    others = [k for k in ckpt if k not in layer_keys and k not in special]
    writer.write(0, {L.key(L.embed): E, **ckpt.read(others, reader.dtype)})
    del E

    pending: dict[str, torch.Tensor] = {}
    for i in tqdm(range(L.num_layers), desc="rotate and write layers", disable=not run.progress, file=sys.stderr):
        t = run.layer(i, R1)
        if r2 is not None or r2_steps is not None:
            if i not in learned:
                learned[i] = run.learn_r2(t, i, r2_steps)
            apply_r2(t, L, i, learned[i][0])
        pending.update(t)
        del t
        if i + 1 == L.num_layers or layer_shard[i + 1] != layer_shard[i]:
            writer.write(layer_shard[i], pending)
            pending = {}

    last = {L.key(L.final_norm): reader.final_norm_identity}
    if reader.has_lm_head_block:
        H = torch.empty(ckpt.shape(reader.lm_head_source), dtype=reader.dtype)
        start = 0
        for rows in reader.lm_head_rows():
            H[start:start + rows.shape[0]] = rows if R1 is None else rotate_rows(rows, R1)
            start += rows.shape[0]
        last[L.key(L.lm_head)] = H
    writer.write(num_shards - 1, last)
    writer.finish()
    return learned


def _combine_r2(learned: dict[int, tuple[torch.Tensor, SolveResult]]) -> SolveResult:
    """One :class:`SolveResult` for all R2.i, as the in-memory pipeline's joint R2 solve reports it:
    histories and final losses summed over layers (in layer order), the worst orthogonality error."""
    results = [learned[i][1] for i in sorted(learned)]
    steps = min(r.steps for r in results)
    history = [sum((r.history[s] for r in results), 0.0) for s in range(steps)]
    return SolveResult(
        rotations={k: R for r in results for k, R in r.rotations.items()},
        history=history,
        orthogonality_error=max(r.orthogonality_error for r in results),
        steps=steps,
        seconds=sum(r.seconds for r in results),
        final_loss=sum((r.final_loss for r in results), 0.0),
    )


def rotate_streamed(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: str = "optrot",
    rotations: Iterable[str] = PHASES,
    *,
    solver: str | None = None,
    steps: int | Mapping[str, int] = 100,
    lr: float | None = None,
    seed: int = 0,
    init: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    model_dtype: torch.dtype = torch.float32,
    chunk_rows: int | None = None,
    sample_fraction: float | None = None,
    device: torch.device | str | None = None,
    layers_per_shard: int = 1,
    arch: str | None = None,
    include_embeddings: bool = False,
    progress: bool = True,
    callback: Callable[[str, int, float, dict], bool | None] | None = None,
    report_extra: Mapping | None = None,
    extras: Callable[[Path, RotateResult], None] | None = None,
) -> RotateResult:
    """Rotate the checkpoint in ``model_dir`` with OptRot and write it to ``out_dir``, streaming.

    method:          ``"optrot"`` (the only data-free learned method; others raise ValueError).
    rotations, solver, steps, lr, seed, init, dtype, include_embeddings: as in
                     :func:`orthoopt.pipeline.rotate_model` (``dtype``: of the learned rotations; the
                     embedding and lm_head are rotated but left out of the R1 objective by default).
    model_dtype:     dtype the weights are read, fused and written in (``load_model``'s ``dtype``).
    chunk_rows, sample_fraction: of the R1 objective (:class:`~orthoopt.objectives.FourthPower`);
                     ``sample_fraction`` applies to the R2 objectives too.
    device:          where the objectives and solvers compute (e.g. ``"cuda"``); weights are read on the
                     CPU and rotated back in float64 on the CPU.
    layers_per_shard: decoder layers per output shard (memory holds one shard being written).
    callback:        ``callback("R1", step, loss, rotations)`` after each R1 step (true stops R1 early);
                     the per-layer R2 solves do not call it.
    report_extra:    entries merged into ``report.json``; ``extras(folder, result)`` may add files.

    Returns a :class:`~orthoopt.pipeline.RotateResult` (float64 fused rotations, the report, the R1
    solve and the R2 solves combined as one). Under ``torchrun`` every rank returns it; rank 0 writes.
    Raises ValueError / FileNotFoundError for bad arguments or inputs before anything is written.
    """
    if method not in STREAMED_METHODS:
        raise ValueError(f"streamed mode supports method {', '.join(STREAMED_METHODS)} only (data-free, weights "
                         f"only); got {method!r}: run it in memory (without --streamed)")
    phases = [p for p in PHASES if p in set(rotations)]
    if set(rotations) - set(PHASES) or not phases:
        raise ValueError(f"rotations must be a non-empty subset of {PHASES}, got {sorted(set(rotations))}")
    if not isinstance(layers_per_shard, int) or layers_per_shard < 1:
        raise ValueError(f"layers_per_shard must be a positive int, got {layers_per_shard!r}")
    phase_steps = dict(steps) if isinstance(steps, Mapping) else {p: steps for p in phases}
    out_dir = Path(out_dir)
    device = check_device(device, "device")
    prepare_output(out_dir, {"model_dir": model_dir}, what="out_dir")
    began = time.perf_counter()
    run = _Streamed(model_dir, solver or DEFAULT_SOLVER, lr, seed, init, dtype, model_dtype, chunk_rows,
                    sample_fraction, device, arch, include_embeddings, progress)
    fused: dict[str, torch.Tensor] = {}
    solves: dict[str, SolveResult] = {}
    R1 = None
    if "R1" in phases:
        R1, solves["R1"] = run.learn_r1(phase_steps.get("R1", 0), callback)
        fused["R1"] = R1
    r2_steps = phase_steps.get("R2", 0) if "R2" in phases else None
    r2 = run.learn_r2_share(R1, r2_steps) if r2_steps is not None and run.world_size > 1 else None

    def report_for(learned) -> dict:
        rots = {**fused, **{f"R2.{i}": learned[i][0] for i in sorted(learned)}}
        return {
            "method": method, "rotations": phases, "solver": run.solver_name, "steps": phase_steps, "lr": lr,
            "seed": seed, "include_embeddings": include_embeddings, "dtype": str(dtype).removeprefix("torch."),
            "seconds": time.perf_counter() - began,
            "orthogonality_error": max(orthogonality_error(R) for R in rots.values()),
            "loss": {p: loss_summary(r.history) | {"final": r.final_loss, "orthogonality_error": r.orthogonality_error}
                     for p, r in solves.items()},
            "streamed": {
                "model_dtype": str(model_dtype).removeprefix("torch."), "chunk_rows": run.chunk_rows,
                "sample_fraction": sample_fraction, "device": None if device is None else str(device),
                "layers_per_shard": layers_per_shard, "world_size": run.world_size,
                "rank_max_abs_difference": run.rank_difference, "peak_rss_mib": peak_rss_mib(),
                "checkpoint_bytes": run.ckpt.nbytes(),
            },
            **dict(report_extra or {}),
        }

    result: RotateResult | None = None
    error: BaseException | None = None
    if run.rank == 0:
        try:
            with atomic_dir(out_dir) as tmp:
                learned = _write_model(run, tmp, R1, r2, r2_steps, layers_per_shard)
                if learned:
                    solves["R2"] = _combine_r2(learned)
                rots = {**fused, **{f"R2.{i}": learned[i][0] for i in sorted(learned)}}
                report = report_for(learned)
                text = json.dumps(report, indent=2, allow_nan=False)
                _write_config(run.ckpt.path, tmp, run.reader.untie, model_dtype)
                _copy_side_files(run.ckpt.path, tmp)
                save_file({k: v.contiguous() for k, v in rots.items()}, str(tmp / ROTATIONS_FILE))
                (tmp / REPORT_FILE).write_text(text + "\n")
                result = RotateResult(rots, report, solves)
                if extras is not None:
                    extras(tmp, result)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = e
    if run.world_size > 1:
        status = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")[0]
        if error is None and status is not None:
            raise RuntimeError(f"rank 0 failed to write {out_dir}: {status}")
        if error is None and result is None:  # other ranks: the rotations and report rank 0 wrote
            learned = r2 or {}
            if learned:
                solves["R2"] = _combine_r2(learned)
            rots = {**fused, **{f"R2.{i}": learned[i][0] for i in sorted(learned)}}
            result = RotateResult(rots, report_for(learned), solves)
    if error is not None:
        raise error
    return result


__all__ = ["STREAMED_METHODS", "peak_rss_mib", "rotate_streamed"]
