"""The objective of a learned method for one unit, built from the adapter's weight blocks and the
phase's calibration statistics (the registry entry's factory, :data:`orthoopt.methods.METHODS`).

Learned objectives see only the blocks that get quantized: ``embed_tokens`` and ``lm_head`` stay in
full precision (``include_embeddings=True`` puts them back; see the package doc).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from orthoopt.adapters import DecoderAdapter
from orthoopt.adapters.calibration import rotation_rows
from orthoopt.config import RotateConfig
from orthoopt.errors import InvalidInputError
from orthoopt.methods import ObjectiveInputs, check_sampling
from orthoopt.methods import names as _names
from orthoopt.objectives import Objective


def _blocks(adapter: DecoderAdapter, phase: str, include_embeddings: bool, names=None):
    blocks = adapter.weight_blocks(phase)
    if names is not None:
        blocks = [b for b in blocks if b.rotation in names]
    # the architecture table says what stays in full precision: embedding and lm_head (counted with
    # include_embeddings) and every projection with quantize=False (MoE routers: never counted)
    spec = adapter.modules.spec
    embeddings = {spec.embed, spec.lm_head} if include_embeddings else set()
    return [b for b in blocks if b.name in embeddings or not spec.is_full_precision(b.name)]


def _activations(adapter: DecoderAdapter, phase: str, calib: torch.Tensor, max_tokens: int,
                 seed: int, progress: bool, include_embeddings: bool) -> dict[str, torch.Tensor]:
    """``{rotation: X [rows, n]}``: the rows each rotation of ``phase`` multiplies, i.e. the inputs of
    the side-"in" blocks (q/k/v and gate/up share one input per layer and count once; o_proj heads of
    layer i give ``[T * heads, head_dim]`` rows for ``R2.i``)."""
    blocks = [b for b in _blocks(adapter, phase, include_embeddings) if b.side == "in"]
    sources = adapter.block_sources(phase)
    modules = sorted({sources[b.name][0] for b in blocks if sources[b.name] is not None})
    inputs = adapter.linear_inputs(calib, max_tokens=max_tokens, modules=modules, seed=seed, progress=progress)
    entries = [(b, *sources[b.name]) if sources[b.name] is not None else (b, None, None) for b in blocks]
    return {name: torch.cat(xs) for name, xs in rotation_rows(entries, inputs).items()}


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


def phase_statistics(config: RotateConfig, adapter: DecoderAdapter, phase: str, calib: torch.Tensor | None,
                     progress: bool = True) -> dict:
    """The calibration statistics the objective of ``config.method`` needs for ``phase`` on the
    adapter's current weights, by the entry's ``statistics``: ``{"hessians": ...}``, ``{"activations":
    {rotation: X}}`` (``config.calib.tokens`` rows sampled with ``config.seed``), or ``{}`` (data-free
    methods, and ``"model"``, which reads batches itself)."""
    take = _PHASE_STATISTICS.get(config.entry.statistics)
    return {} if take is None else take(adapter, phase, calib, config.calib.tokens, config.seed, progress,
                                        config.include_embeddings)


def _block_hessians(adapter: DecoderAdapter, phase: str, blocks, H: Mapping) -> list:
    """The input Hessian of each block (its rows and columns of its module's; None without a source)."""
    sources = adapter.block_sources(phase)
    out = []
    for b in blocks:
        src = sources[b.name]
        out.append(None if src is None else (H[src[0]] if src[1] is None else H[src[0]][src[1], src[1]]))
    return out


def build_objective(config: RotateConfig, adapter: DecoderAdapter, phase: str | Iterable[str],
                    calib: torch.Tensor | None = None, *, progress: bool = True, names: Iterable[str] | None = None,
                    cache: dict | None = None) -> Objective:
    """The objective of a learned method for the rotations of ``phase`` on the adapter's current weights.

    The registry entry's ``objective`` factory (:data:`orthoopt.methods.METHODS`) applied to the
    blocks and the statistics of its ``statistics`` kind, with what ``config`` says.

    Parameters
    ----------
    config : RotateConfig
        The run's settings: ``method``, and what its objective reads (``include_embeddings``,
        ``calib.tokens``, ``seed``; ``compute.sample_fraction`` for methods with ``sampling``;
        ``compute.device`` for every learned method; one that simulates quantization also reads the
        ``spinquant`` group, and its loss runs where the model is).
    adapter : DecoderAdapter
        The model's adapter (fused, possibly partly rotated weights).
    phase : str or iterable of str
        ``"R1"`` or ``"R2"``; several phases for a joint method (learned together).
    calib : torch.Tensor, optional
        Calibration token ids ``[N, L]``, needed by the data-driven methods.
    progress : bool
        Progress bars while statistics are taken.
    names : iterable of str, optional
        Only these rotations of ``phase`` (one layer's ``R2.i``).
    cache : dict, optional
        The phase's statistics (:func:`phase_statistics`) when already taken, so that a phase solved
        layer by layer runs the calibration forward pass once.

    Returns
    -------
    Objective
    """
    method, entry = config.method, config.entry
    if not entry.learned:
        raise InvalidInputError(f"method {method!r} learns nothing; learned methods: "
                         f"{', '.join(_names(lambda m: m.learned))}")
    check_sampling(entry, config.compute.sample_fraction, config.compute.device)
    if entry.needs_calibration and calib is None:
        raise InvalidInputError(f"method {method!r} needs calibration text (--calib TEXT_FILE)")
    inputs = ObjectiveInputs(calib=calib, sample_fraction=config.compute.sample_fraction, seed=config.seed,
                             device=config.compute.device, batch_size=config.spinquant.batch_size,
                             micro_batch_size=config.spinquant.micro_batch_size)
    if entry.simulates_quantization:
        from orthoopt.quant.rotated import RotatedQuantLM

        phases = (phase,) if isinstance(phase, str) else tuple(phase)
        inputs.model_loss = RotatedQuantLM(adapter.model, config.spinquant.sim_quant, rotations=phases)
        return entry.objective(inputs)
    if cache is None:
        cache = phase_statistics(config, adapter, phase, calib, progress)
    inputs.blocks = _blocks(adapter, phase, config.include_embeddings, names)
    if "hessians" in cache:
        inputs.hessians = _block_hessians(adapter, phase, inputs.blocks, cache["hessians"])
    if "activations" in cache:
        inputs.activations = {k: v for k, v in cache["activations"].items() if names is None or k in names}
    return entry.objective(inputs)
