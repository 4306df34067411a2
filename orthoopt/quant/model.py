"""Quantize a whole Hugging Face decoder, save it with ``quant.json``, load it back.

Only the linears of the decoder layers (q/k/v/o, gate/up/down) and, on MoE models, the expert tensors
(every expert's ``[out, in]`` slice of ``mlp.experts.gate_up_proj`` / ``down_proj``, as its own linear:
:mod:`orthoopt.quant.experts`) are quantized; the token embedding, ``lm_head`` and the MoE routers stay
in full precision, as in GPTQ, QuaRot and SpinQuant (``ArchSpec.full_precision``). Weights are *fake*-quantized:
the checkpoint stores the dequantized floats (a normal ``save_pretrained`` folder), and ``quant.json``
records the settings, including activation quantization, which :func:`load_quantized` re-installs
as forward pre-hooks (:mod:`orthoopt.quant.act`), and the online R3 / K-V cache quantization, which it
re-installs around the attention function (:mod:`orthoopt.quant.kv`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from orthoopt.adapters.archs import ARCHS, locate
from orthoopt.models.io import load_model, load_tokenizer
from orthoopt.errors import InvalidInputError
from orthoopt.quant.act import (
    ActQuantConfig,
    _r4_linears,
    ActQuantHooks,
    hadamard_fingerprint,
    install_act_quant,
    rotate_down_proj_weights,
)
from orthoopt.quant.config import QuantizeConfig
from orthoopt.quant.experts import check_experts_module, expert_params, quantize_experts_rtn, quantized_expert_tensors
from orthoopt.quant.kv import KVQuantConfig, install_kv_quant, r3_size
from orthoopt.quant.quantizer import QuantSpec, WeightQuantParams
from orthoopt.quant.rtn import quantize_rtn_params
from orthoopt.quant.sequential import check_calib, gptq_quantize_model
from orthoopt.utils.atomic import atomic_dir
from orthoopt.utils.checks import check_model_weights

QUANT_JSON = "quant.json"
QUANT_FORMAT = "orthoopt.quant/1"
FULL_PRECISION = ARCHS["llama"].full_precision
"""Llama's full-precision modules; quant.json records the model's own (``ArchSpec.full_precision``)."""


@dataclass
class QuantResult:
    """What :func:`quantize_model` did.

    settings: JSON-ready record (the content of quant.json; callers may add keys, e.g. the
              calibration file).
    hooks:    the activation and R3/KV hooks now installed on the model (empty when nothing is
              quantized online and there is no online Hadamard); ``hooks.remove()`` takes them out.
    losses:   GPTQ's loss estimate per linear (empty for RTN).
    params:   the grid of every quantized linear, keyed by its full module name
              (``"model.layers.0.self_attn.q_proj"``), and of every MoE expert tensor, keyed by its full
              parameter name (``"model.layers.0.mlp.experts.gate_up_proj"``) with a leading expert
              dimension (``scale``/``zero`` ``[experts, out, groups]``, ``group_index`` ``[experts, in]``);
              empty when weights are not quantized. Exporters that store integer codes
              (:mod:`orthoopt.export`) read it.
    spec:     the weight quantizer (None when weights are not quantized).
    """

    settings: dict
    hooks: ActQuantHooks
    losses: dict[str, float]
    params: dict[str, WeightQuantParams] = field(default_factory=dict)
    spec: QuantSpec | None = None


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: QuantizeConfig | None = None,
    calib: torch.Tensor | None = None,
    *,
    progress: bool = True,
    onload=None,
) -> QuantResult:
    """Quantize ``model`` in place and install its activation hooks; the model is then ready to evaluate.

    Parameters
    ----------
    model : nn.Module
        A decoder of an architecture in :data:`orthoopt.adapters.archs.ARCHS`.
    config : QuantizeConfig, optional
        What to do (:class:`orthoopt.quant.config.QuantizeConfig`; default W4 RTN per output channel).
    calib : torch.Tensor, optional
        GPTQ's calibration token ids, a ``[nsamples, seq_len]`` LongTensor.
    progress : bool
        Progress bars on stderr.
    onload : object, optional
        For a model whose decoder layers stay on disk (:func:`quantize_layered`): ``onload.load_layer(i)``
        is called before layer ``i`` is touched and ``onload.finish_layer(i)`` once it is quantized
        (and, for GPTQ, its outputs computed), one layer after the other; None: the whole model is in
        memory. The arithmetic per layer is the same either way.

    Returns
    -------
    QuantResult
        The settings record (quant.json), the installed hooks, GPTQ's losses and every grid.

    MoE models: every expert's slice of the expert tensors is quantized like a linear (RTN per slice;
    GPTQ with a Hessian per expert from the tokens routed to it, RTN for an expert no calibration token
    reaches, listed in ``settings["experts_rtn_fallback"]``); routers stay in full precision
    (:mod:`orthoopt.quant.experts`).

    Order of operations: the weight half of the online Hadamard (``W_down -> W_down @ H``), weight
    quantization (GPTQ calibrates with the activation half of the Hadamard active and activations and
    K/V in full precision, as QuaRot does), then activation hooks, then R3/KV hooks.
    """
    config = QuantizeConfig() if config is None else config
    if not isinstance(config, QuantizeConfig):
        raise InvalidInputError(f"config must be a QuantizeConfig (orthoopt.quant.QuantizeConfig), got "
                                f"{type(config).__name__}")
    method, wbits, group_size, sym, mse_clip = config.method, config.wbits, config.group_size, config.sym, config.mse_clip
    act, kv, gptq = config.act, config.kv, config.gptq
    if onload is None:  # (a layered model's reader checks each tensor as it reads it)
        check_model_weights(model)  # no meta tensors, no NaN/inf weights (they would be written as they are)
    spec = config.weight_spec
    if config.uses_calibration:
        if calib is None:
            raise InvalidInputError("GPTQ needs calibration data: pass calib (a [nsamples, seq_len] LongTensor)")
        check_calib(calib)
    located = locate(model)  # raises for an unsupported architecture before anything changes
    expert_tensors = {n: t for L in located.layers for n, t in quantized_expert_tensors(located.spec, L).items()}
    for L in located.layers if spec is not None or act.enabled else ():
        for role, (mod, _) in expert_params(located.spec, L).items():
            check_experts_module(mod, L.names[role])
    if kv.r3:
        r3_size(model)  # head_dim without a Hadamard matrix: fail before anything changes
    if kv.group_size is not None and located.head_dim % kv.group_size:
        raise InvalidInputError(f"KV-cache group_size {kv.group_size} does not divide head_dim {located.head_dim}")
    if group_size is not None and spec is not None:
        for L in located.layers:
            for role, lin in L.quant_linears(located.spec).items():
                if lin.in_features % group_size:
                    raise InvalidInputError(
                        f"group_size {group_size} does not divide {L.names[role]}'s {lin.in_features} input columns"
                    )
        for name, t in expert_tensors.items():
            if t.shape[-1] % group_size:
                raise InvalidInputError(f"group_size {group_size} does not divide {name}'s {t.shape[-1]} input columns")

    start = time.perf_counter()
    layered = _LayerSteps(model, onload, act.online_hadamard)
    hadamard = layered.hadamard_record()
    losses: dict[str, float] = {}
    full_name = {id(m): n for n, m in model.named_modules()}
    params: dict[str, WeightQuantParams] = {}
    rtn_experts: dict[str, list[int]] = {}
    prefix = located.spec.decoder + "."
    if spec is not None and method == "rtn":
        for L in located.layers:
            layered.load_layer(L.index)
            for lin in L.quant_linears(located.spec).values():
                q, params[full_name[id(lin)]] = quantize_rtn_params(lin.weight, spec)
                lin.weight.copy_(q)
            for name, t in quantized_expert_tensors(located.spec, L).items():  # read after the layer is loaded
                q, params[prefix + name] = quantize_experts_rtn(t, spec)
                t.copy_(q)
            layered.finish_layer(L.index)
    elif spec is not None:
        by_decoder_name: dict[str, WeightQuantParams] = {}
        with install_act_quant(model, ActQuantConfig(online_hadamard=act.online_hadamard)):
            losses = gptq_quantize_model(
                model, calib, spec, act_order=gptq.act_order, percdamp=gptq.percdamp, block_size=gptq.block_size,
                progress=progress, true_sequential=gptq.true_sequential,
                params=by_decoder_name, rtn_experts=rtn_experts, onload=layered,
            )
        for L in located.layers:
            for role, lin in L.quant_linears(located.spec).items():
                params[full_name[id(lin)]] = by_decoder_name[L.names[role]]
        for name in expert_tensors:
            params[prefix + name] = by_decoder_name[name]
    hooks = install_act_quant(model, act)
    if kv.active:
        hooks.add(install_kv_quant(model, kv))
    settings = {
        "format": QUANT_FORMAT,
        "method": method,
        "wbits": wbits,
        "abits": act.bits,
        "group_size": group_size,
        "sym": sym,
        "mse_clip": mse_clip,
        "gptq": gptq.to_dict() if method == "gptq" else None,
        "act": act.to_dict(),
        "online_hadamard": hadamard,
        "kvbits": kv.bits,
        "kv": kv.to_dict(),
        "r3": _r3_record(model) if kv.r3 else None,
        "calibration": (
            {"nsamples": int(calib.shape[0]), "seq_len": int(calib.shape[1])}
            if method == "gptq" and spec is not None
            else None
        ),
        "full_precision": list(located.spec.full_precision),
        "experts": sorted(expert_tensors) if spec is not None else [],
        "experts_rtn_fallback": {k: v for k, v in rtn_experts.items() if v} or None,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return QuantResult(settings, hooks, losses, params, spec)


class _LayerSteps:
    """What :func:`quantize_model` does when it reaches and leaves a decoder layer: the weight half of
    the online Hadamard on its ``down_proj`` (so a layer read from disk is rotated when it is read),
    and the caller's ``onload`` steps. With the whole model in memory the rotation of every layer
    happens up front, as the same per-layer arithmetic."""

    def __init__(self, model: nn.Module, onload, online_hadamard: bool) -> None:
        self.model, self.onload, self.online_hadamard = model, onload, online_hadamard
        self._record = None
        if online_hadamard and onload is None:
            self._record = rotate_down_proj_weights(model)

    def hadamard_record(self) -> dict | None:
        if not self.online_hadamard:
            return None
        return self._record if self._record is not None else rotate_down_proj_weights(self.model, layers=())

    def load_layer(self, i: int) -> None:
        if self.onload is not None:
            self.onload.load_layer(i)
            if self.online_hadamard:
                rotate_down_proj_weights(self.model, layers=(i,))

    def finish_layer(self, i: int) -> None:
        if self.onload is not None:
            self.onload.finish_layer(i)


def _r3_record(model: nn.Module) -> dict:
    """quant.json's record of the R3 matrix: its size (head_dim) and fingerprint."""
    d = r3_size(model)
    return {"size": d, "sha256": hadamard_fingerprint(d)}


def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike, settings: dict) -> Path:
    """Write ``model`` (``save_pretrained``, safetensors), ``tokenizer`` and ``quant.json`` atomically."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / QUANT_JSON).write_text(json.dumps(settings, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return out_dir


def load_checkpoint(model_dir: str | os.PathLike, dtype: torch.dtype | str = "auto"):
    """``(model, tokenizer)`` from a model source with a tokenizer (a Hugging Face folder, a ``.gguf``
    file, a registered name, ``planted``, a Hub id; see :func:`orthoopt.adapters.load_model`); model
    in eval mode, in ``dtype`` (``"auto"``: the checkpoint's own, :mod:`orthoopt.models.dtypes`).

    Raises FileNotFoundError naming the source when it or its tokenizer files are missing.
    """
    from orthoopt.models.sources import resolve_source

    source = resolve_source(model_dir)
    spec = str(source.path) if source.path is not None else source.spec
    tokenizer = load_tokenizer(spec)
    if tokenizer is None:
        folder = source.path if source.path.is_dir() else source.path.parent
        raise FileNotFoundError(
            f"{folder} has no tokenizer (tokenizer.json / tokenizer_config.json / tokenizer.model); "
            "copy the tokenizer files into it"
        )
    return load_model(spec, dtype=dtype), tokenizer


def read_quant_settings(model_dir: str | os.PathLike) -> dict | None:
    """The content of ``model_dir/quant.json``, or None when the folder has none."""
    path = Path(model_dir) / QUANT_JSON
    if not path.is_file():
        return None
    settings = json.loads(path.read_text(encoding="utf-8"))
    if settings.get("format") != QUANT_FORMAT:
        raise InvalidInputError(f"{path}: unknown format {settings.get('format')!r}, expected {QUANT_FORMAT!r}")
    return settings


def install_from_settings(model: nn.Module, settings: dict) -> ActQuantHooks:
    """Install the activation and R3/KV hooks that quant.json ``settings`` describe on a loaded checkpoint.

    With online Hadamard, checks that the stored fingerprint matches the Hadamard this version builds
    for the model's intermediate size (so the rotated weights and the activation hook agree); with R3,
    that the recorded matrix is the one this version builds for the model's head_dim. quant.json files
    written before R3/KV quantization existed (no ``"kv"`` key) mean both off.
    """
    act = ActQuantConfig.from_dict(settings["act"])
    if act.online_hadamard:
        stored = settings.get("online_hadamard") or {}
        n = {lin.in_features for lin in _r4_linears(model)}
        if {stored.get("size")} != n:
            raise InvalidInputError(f"quant.json online Hadamard size {stored.get('size')} does not match the model's {sorted(n)}")
        if stored.get("sha256") != hadamard_fingerprint(stored["size"]):
            raise InvalidInputError(
                f"quant.json online Hadamard fingerprint does not match hadamard_matrix({stored['size']}) "
                "of this orthoopt version; the checkpoint's down_proj weights were rotated by another matrix"
            )
    kv = KVQuantConfig.from_dict(settings.get("kv") or {})
    if kv.r3:
        stored = settings.get("r3") or {}
        d = locate(model).head_dim
        if stored.get("size") != d or stored.get("sha256") != hadamard_fingerprint(d):
            raise InvalidInputError(f"quant.json R3 record {stored} does not match hadamard_matrix({d}) of this orthoopt "
                             "version for the model's head_dim")
    kv_hooks = install_kv_quant(model, kv)  # raises before the activation hooks go in
    hooks = install_act_quant(model, act)
    if kv.active:
        hooks.add(kv_hooks)
    return hooks


@dataclass
class LoadedModel:
    """A checkpoint ready to evaluate: ``quant`` is quant.json (None if absent), ``hooks`` its hooks;
    ``layered`` the :class:`~orthoopt.models.onload.LayeredModel` when its layers stay on disk."""

    model: nn.Module
    tokenizer: object
    quant: dict | None
    hooks: ActQuantHooks | None
    layered: object | None = None  # the LayeredModel of load_layered (None: loaded whole)


def load_quantized(model_dir: str | os.PathLike, dtype: torch.dtype | str = "auto") -> LoadedModel:
    """Load a checkpoint in ``dtype`` (``"auto"``: its own, :mod:`orthoopt.models.dtypes`) and, if it
    has quant.json, install its activation quantization / online Hadamard."""
    from orthoopt.models.sources import resolve_source

    source = resolve_source(model_dir)
    model, tokenizer = load_checkpoint(str(source.path) if source.path is not None else source.spec, dtype)
    settings = read_quant_settings(source.folder) if source.folder is not None else None
    hooks = install_from_settings(model, settings) if settings is not None else None
    return LoadedModel(model, tokenizer, settings, hooks)


def load_layered(model_dir: str | os.PathLike, dtype: torch.dtype | str = "auto",
                 device: str | torch.device | None = None) -> LoadedModel:
    """:func:`load_quantized` with the decoder layers left on disk (:class:`orthoopt.models.onload.LayeredModel`):
    only the embedding, final norm and lm_head are loaded; quant.json's hooks are installed on the
    skeleton and act on each layer while it is loaded. ``model_dir``: a Hugging Face folder (or a
    registered name) with safetensors weights; anything else is refused with the reason."""
    from orthoopt.models.io import check_model_folder, load_tokenizer
    from orthoopt.models.onload import LayeredModel
    from orthoopt.models.dtypes import resolve_model_dtype
    from orthoopt.models.sources import resolve_source

    source = resolve_source(model_dir)
    if source.folder is None:
        raise InvalidInputError(f"{model_dir} is a {source.kind} source: layer-by-layer loading (--streamed) reads "
                                "a Hugging Face folder with safetensors weights; evaluate it without --streamed")
    check_model_folder(source.folder)
    layered = LayeredModel(source.folder, resolve_model_dtype(source, dtype), device)
    tokenizer = load_tokenizer(source.folder)
    settings = read_quant_settings(source.folder)
    hooks = install_from_settings(layered.model, settings) if settings is not None else None
    return LoadedModel(layered.model, tokenizer, settings, hooks, layered)
