"""Write an orthoopt-quantized model in the ``compressed-tensors`` format (weight-only, packed integers).

What is written (OUT, atomically): ``model.safetensors`` where every quantized decoder linear has
``weight_packed`` (int32, ``32 / bits`` codes per word, along the input dimension), ``weight_scale``
(``[out, groups]``, the model's float dtype), ``weight_shape`` and, for an asymmetric grid,
``weight_zero_point`` (packed like the codes); every other tensor (embeddings, norms, ``lm_head``) as
usual; ``config.json`` with a ``quantization_config`` (``quant_method: compressed-tensors``, format
``pack-quantized``, one config group ``targets: [Linear]`` with ``ignore`` listing the linears left in
full precision); the tokenizer; and orthoopt's ``quant.json`` with an ``export`` record.
``AutoModelForCausalLM.from_pretrained(OUT)`` (transformers' compressed-tensors integration) and vLLM
load it without orthoopt.

Grid mapping (docs/quantization.md, docs/export.md). compressed-tensors dequantizes a ``b``-bit signed
code ``q'`` in ``[-2^(b-1), 2^(b-1) - 1]`` as ``(q' - z') * scale``; orthoopt's grid is ``scale * (q -
zero)`` with ``q`` in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (symmetric, ``zero = 0``) or ``[0, 2^b - 1]``
(asymmetric). Symmetric codes are stored as they are (``z' = 0``, the code ``-2^(b-1)`` is unused);
asymmetric codes and zero points are shifted by ``2^(b-1)``, which leaves ``q - zero`` unchanged. So
the stored weights dequantize to exactly orthoopt's fake-quantized weights; :func:`save_compressed_tensors`
checks that for every linear before writing.

Not representable (refused with the reason, :func:`unrepresentable`): activation quantization,
the online Hadamard before ``down_proj`` (R4), GPTQ act-order *with groups* (its groups are in
processing order, which needs a per-column group index ``g_idx``; compressed-tensors has removed
``actorder="group"``), weights left in full precision (nothing to pack), MoE expert tensors (transformers
5's fused ``[experts, out, in]`` parameters are not ``nn.Linear`` modules, which is what a
compressed-tensors config group targets and packs; see :func:`unrepresentable`).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn

from orthoopt.errors import InvalidInputError
from orthoopt.quant.model import QUANT_JSON, QuantResult
from orthoopt.quant.quantizer import QuantSpec, WeightQuantParams
from orthoopt.utils.atomic import atomic_dir

FORMAT = "pack-quantized"
INSTALL_HINT = 'the compressed-tensors package is not installed: pip install "orthoopt[export]" (or compressed-tensors)'


def unrepresentable(settings: dict) -> list[str]:
    """Why a quantization (orthoopt's quant.json ``settings``: ``wbits``, ``abits``, ``group_size``,
    ``gptq``, ``act``) cannot be written as a compressed-tensors weight-only checkpoint; empty if it can."""
    reasons = []
    if settings.get("wbits", 16) >= 16:
        reasons.append("weights are not quantized (--wbits 16): there is nothing to pack; save the float checkpoint")
    act = settings.get("act") or {}
    if settings.get("abits", act.get("bits", 16)) < 16:
        reasons.append(
            f"activation quantization (A{settings.get('abits', act.get('bits'))}) is orthoopt's per-token fake "
            "quantization with its own grid and clip ratio; this exporter writes weight-only (W*A16) "
            "checkpoints, and a serving engine's dynamic activation quantizer would not reproduce it; "
            "export the weights alone (drop --abits, or use a W*A16 --scheme)"
        )
    if act.get("online_hadamard"):
        reasons.append(
            "the online Hadamard before down_proj (R4) rotates activations at run time; a compressed-tensors "
            "checkpoint loaded by transformers or vLLM runs no orthoopt hook, so down_proj would see unrotated "
            "inputs; drop --online-hadamard (R1/R2 are fused into the weights and need nothing at run time)"
        )
    kv = settings.get("kv") or {}
    if (settings.get("kvbits") or kv.get("bits") or 16) < 16 or settings.get("r3") or kv.get("r3"):
        reasons.append(
            "K/V-cache fake quantization and the online R3 Hadamard on queries and keys are orthoopt hooks "
            "around the attention function; a compressed-tensors checkpoint loaded by transformers or vLLM "
            "runs no orthoopt hook; drop --kvbits/--r3 (or use the serving engine's own KV-cache quantization)"
        )
    if settings.get("experts"):
        reasons.append(
            f"MoE expert tensors ({settings['experts'][0]} ...) are quantized: transformers 5 holds them as fused "
            "[experts, out, in] parameters of one experts module, not nn.Linear modules, and this exporter "
            "packs nn.Linear weights (compressed-tensors' targets: [Linear]); their per-expert integer codes have "
            "no place in the checkpoint; keep the orthoopt format (the default --format) for MoE models"
        )
    gptq = settings.get("gptq") or {}
    if gptq.get("act_order") and settings.get("group_size"):
        reasons.append(
            "GPTQ act-order with groups puts groups in processing order, which needs a per-column group index "
            "(g_idx); compressed-tensors has removed actorder='group', so it cannot be stored; use act-order "
            "per channel (no --group-size) or groups without --act-order"
        )
    return reasons


def check_exportable(settings: dict) -> None:
    """Raise ValueError naming every reason :func:`unrepresentable` finds."""
    reasons = unrepresentable(settings)
    if reasons:
        raise InvalidInputError("cannot export to compressed-tensors: " + "; ".join(reasons))


def _import_ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as e:
        raise InvalidInputError(INSTALL_HINT) from e
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationMetadata,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    return {
        "version": compressed_tensors.__version__,
        "ModelCompressor": ModelCompressor,
        "Packed": PackedQuantizationCompressor,
        "QuantizationArgs": QuantizationArgs,
        "QuantizationConfig": QuantizationConfig,
        "QuantizationMetadata": QuantizationMetadata,
        "QuantizationScheme": QuantizationScheme,
        "QuantizationStatus": QuantizationStatus,
        "apply_quantization_config": apply_quantization_config,
    }


def quantization_args(spec: QuantSpec, ct: dict | None = None):
    """compressed-tensors ``QuantizationArgs`` for orthoopt's weight quantizer ``spec`` (int, static)."""
    ct = ct or _import_ct()
    return ct["QuantizationArgs"](
        num_bits=spec.bits,
        type="int",
        symmetric=spec.symmetric,
        strategy="group" if spec.group_size else "channel",
        group_size=spec.group_size,
    )


def _ct_params(params: WeightQuantParams, spec: QuantSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight_scale, weight_zero_point)`` in compressed-tensors' layout: ``[out, groups]`` scale in
    the weight's dtype, int8 zero point on the signed grid (``zero - 2^(b-1)`` when asymmetric)."""
    groups = params.scale.shape[1]
    if groups > 1 and not torch.equal(
        params.group_index.cpu(), torch.arange(params.group_index.numel()) // spec.group_size
    ):
        raise InvalidInputError("groups are not consecutive input columns (act-order g_idx): not representable")
    scale = params.scale.to(dtype)
    shift = 0 if spec.symmetric else 2 ** (spec.bits - 1)
    zero = (params.zero.round() - shift).to(torch.int8)
    return scale, zero


@torch.no_grad()
def save_compressed_tensors(
    model: nn.Module, tokenizer, out_dir: str | os.PathLike, result: QuantResult, settings: dict | None = None,
    progress: bool = True,
) -> Path:
    """Write ``model`` (fake-quantized in place by :func:`orthoopt.quant.quantize_model`, which returned
    ``result``) as a compressed-tensors checkpoint in ``out_dir``, atomically.

    ``settings`` (default ``result.settings``) is written to quant.json. Raises ValueError when the
    settings are not representable (:func:`unrepresentable`) or compressed-tensors is missing, and
    RuntimeError if a packed weight would not dequantize to the model's weight (a bug). The model is
    packed for saving and restored afterwards: on return it is unchanged. ``progress=False`` silences
    compressed-tensors' own "Compressing model" bar.
    """
    settings = dict(settings if settings is not None else result.settings)
    check_exportable(settings)
    spec = result.spec
    if spec is None or not result.params:
        raise InvalidInputError("the QuantResult has no weight grids (weights were not quantized): nothing to export")
    experts = sorted(k for k, p in result.params.items() if p.scale.ndim == 3)
    if experts:  # also when the caller's settings do not list them
        check_exportable({**settings, "experts": experts})
    ct = _import_ct()
    out_dir = Path(out_dir)

    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(result.params) - set(linears))
    if unknown:
        raise InvalidInputError(f"quantized modules not found in the model: {unknown[:3]}")
    targets = {name: linears[name] for name in result.params}
    ignore = sorted(set(linears) - set(targets))

    args = quantization_args(spec, ct)
    scheme = ct["QuantizationScheme"](targets=["Linear"], weights=args)
    qconfig = ct["QuantizationConfig"](
        config_groups={"group_0": scheme}, ignore=ignore, format=FORMAT,
        quantization_status=ct["QuantizationStatus"].FROZEN,
    )

    originals = {name: m.weight for name, m in targets.items()}
    ct["apply_quantization_config"](model, qconfig, show_progress=False)
    compressor = None
    try:
        for name, m in targets.items():
            scale, zero = _ct_params(result.params[name], spec, m.weight.dtype)
            if m.weight_scale.shape != scale.shape:
                raise RuntimeError(f"{name}: scale shape {tuple(scale.shape)} != expected {tuple(m.weight_scale.shape)}")
            m.weight_scale.data = scale.to(m.weight.device)
            m.weight_zero_point.data = zero.to(m.weight.device)
        compressor = ct["ModelCompressor"].from_pretrained_model(model, quantization_format=FORMAT)
        with _bars(progress):
            compressor.compress_model(model)
        for name, m in targets.items():  # the packed codes must give back exactly the fake-quantized weight
            sd = {k: v for k, v in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))}
            back = ct["Packed"].decompress(sd, m.quantization_scheme)["weight"]
            w = originals[name]
            err = (back.to(w.dtype) - w).abs().max().item()
            eps = torch.finfo(w.dtype).eps  # float32: the two agree exactly; bf16/fp16: to one rounding
            if err > (8 * eps if w.dtype in (torch.float32, torch.float64) else 2 * eps) * max(w.abs().max().item(), 1e-30):
                raise RuntimeError(
                    f"{name}: the packed weight dequantizes to within {err:.3g} of orthoopt's, not exactly; "
                    "the grid mapping is wrong"
                )
        ct_record = {"format": "compressed-tensors", "compression_format": FORMAT, "compressed_tensors_version": ct["version"]}
        settings["export"] = ct_record
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp)
            compressor.update_config(str(tmp))
            tokenizer.save_pretrained(tmp)
            (tmp / QUANT_JSON).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    finally:
        _restore(model, targets, originals, ct, compressor)
    return out_dir


@contextmanager
def _bars(progress: bool):
    """compressed-tensors' ``compress_model`` draws a tqdm bar with no switch; without ``progress``,
    its module's ``tqdm`` is swapped for a disabled one while it runs."""
    from compressed_tensors.compressors.model_compressors import model_compressor as mc

    original = mc.tqdm
    if not progress:
        mc.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        mc.tqdm = original


def _restore(model: nn.Module, targets: dict, originals: dict, ct: dict, compressor) -> None:
    """Undo :func:`save_compressed_tensors`'s changes: original weights, no quantization attributes."""
    if compressor is not None:
        compressor.remove_decompression_hook(model)
    for name, m in targets.items():
        ct["QuantizationMetadata"].clear_quantization(m)
        for key in ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight"):
            if key in m._parameters or key in m._buffers:
                delattr(m, key)
        m.weight = originals[name]
        for attr in ("quantization_status", "quantization_enabled"):
            if hasattr(m, attr):
                delattr(m, attr)
