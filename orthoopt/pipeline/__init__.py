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

Exact resume: with ``checkpoint=PATH`` and ``config.solve.checkpoint_every=k`` the loop writes its whole state
(finished rotations in float64, the solver's state, the objective's sampling generators, the loss
histories; :mod:`orthoopt.resume`) to ``PATH`` every ``k`` steps of a unit and after each unit (so a
streamed run continues from the first unfinished layer); ``resume=True`` continues from ``PATH`` when
it exists, refusing (ValueError naming the differences) a file written with another method, model,
solver or settings. A resumed run gives bit-identical rotations (and weights) to an uninterrupted one
on the same machine with the same number of threads, in memory, streamed and distributed (the store
reads and writes the file: under ``torchrun`` rank 0 writes the collective R1 state of every rank to
``PATH`` and each rank its own R2 layers to ``PATH`` with ``.rankR-of-W`` before the suffix).
"""

from orthoopt.pipeline.api import rotate_model, rotate_streamed
from orthoopt.pipeline.loop import PhaseRun, combine_results, plan_units, run_phases
from orthoopt.pipeline.memory import MemoryStore
from orthoopt.pipeline.objective import build_objective, phase_statistics
from orthoopt.pipeline.report import RotateResult, build_report

__all__ = ["MemoryStore", "PhaseRun", "RotateResult", "build_objective", "build_report", "combine_results",
           "phase_statistics", "plan_units", "rotate_model", "rotate_streamed", "run_phases"]
