"""Write an orthoopt-quantized model in the ``compressed-tensors`` format (integer weights, and
optionally dynamic int8 activations and the online Hadamard before ``down_proj``).

What is written (OUT, atomically): ``model.safetensors`` where every quantized decoder linear has its
integer codes, ``weight_scale`` (``[out, groups]``, the model's float dtype) and, for an asymmetric
grid, ``weight_zero_point``; every other tensor (embeddings, norms, ``lm_head``) as usual;
``config.json`` with a ``quantization_config`` (``quant_method: compressed-tensors``, one config group
``targets: [Linear]`` with ``ignore`` listing the linears left in full precision); the tokenizer; and
orthoopt's ``quant.json`` with an ``export`` record. Two compression formats, the ones
compressed-tensors itself infers for the scheme:

* weight-only (``W*A16``): ``pack-quantized``, ``weight_packed`` (int32, ``32 / bits`` codes per word
  along the input dimension) and ``weight_shape``;
* with activations (``W4A8``, ``W8A8``: ``input_activations`` int8, ``strategy: token``,
  ``dynamic: true``, symmetric, as compressed-tensors' presets): ``int-quantized``, ``weight`` as int8
  codes ``[out, in]`` (what vLLM's ``W4A8Int``/``W8A8Int8`` schemes read).

With R4 (``--online-hadamard``) ``quantization_config`` also holds a ``transform_config``
(:mod:`orthoopt.export.ct_transform`), for power-of-two intermediate sizes only.

Grid mapping (docs/quantization.md, docs/export.md). compressed-tensors dequantizes a ``b``-bit signed
code ``q'`` in ``[-2^(b-1), 2^(b-1) - 1]`` as ``(q' - z') * scale``; orthoopt's grid is ``scale * (q -
zero)`` with ``q`` in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (symmetric, ``zero = 0``) or ``[0, 2^b - 1]``
(asymmetric). Symmetric codes are stored as they are (``z' = 0``, the code ``-2^(b-1)`` is unused);
asymmetric codes and zero points are shifted by ``2^(b-1)``, which leaves ``q - zero`` unchanged. So
the stored weights dequantize to exactly orthoopt's fake-quantized weights; :func:`save_compressed_tensors`
checks that for every linear before writing.

Activations are not exact: compressed-tensors' dynamic int8 grid is ``scale = absmax / 127.5`` with
codes clamped to ``[-128, 127]`` before rounding, orthoopt's (and vLLM's symmetric int8 kernels') is
``absmax / 127`` with codes ``[-127, 127]``; docs/export.md states what that does to the logits.

Not representable (refused with the reason, :func:`unrepresentable`): activations other than
symmetric int8 without clipping, R4 of a size that is not a power of two, K/V-cache quantization and
R3, GPTQ act-order *with groups* (its groups are in processing order, which needs a per-column group
index ``g_idx``; compressed-tensors has removed ``actorder="group"``), weights left in full precision
(nothing to pack), MoE expert tensors (transformers 5's fused ``[experts, out, in]`` parameters are not
``nn.Linear`` modules, which is what a compressed-tensors config group targets and packs).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from orthoopt.errors import InvalidInputError
from orthoopt.export.ct_transform import applied_r4, r4_linears, r4_size_reason
from orthoopt.quant.model import QUANT_JSON, QuantResult
from orthoopt.quant.quantizer import QuantSpec, WeightQuantParams
from orthoopt.utils.atomic import atomic_dir

FORMAT = "pack-quantized"
"""Compression format of weight-only checkpoints (packed int32 words)."""
ACT_FORMAT = "int-quantized"
"""Compression format when activations are quantized (int8 codes; compressed-tensors infers it for
integer weights with ``input_activations``, and vLLM's int8-activation schemes read it)."""
ACT_BITS = 8
INSTALL_HINT = 'the compressed-tensors package is not installed: pip install "orthoopt[export]" (or compressed-tensors)'


def unrepresentable(settings: dict) -> list[str]:
    """Why a quantization cannot be written as a compressed-tensors checkpoint; empty if it can.

    The one question the CLI asks before any work (and :func:`save_compressed_tensors` again before
    writing).

    Parameters
    ----------
    settings : dict
        orthoopt's quant.json settings or the part known so far: ``wbits``, ``abits``, ``group_size``,
        ``gptq`` (``{"act_order": ...}``), ``act`` (``bits``, ``symmetric``, ``clip_ratio``,
        ``online_hadamard``), ``online_hadamard`` (``{"size": n, ...}``, the R4 record; needed to judge
        R4, e.g. ``{"size": intermediate_size}`` before quantizing), ``kvbits``/``kv``/``r3``,
        ``experts``. Missing keys count as "off".

    Returns
    -------
    list of str
        One sentence per problem, each naming what would work instead.
    """
    reasons = []
    if settings.get("wbits", 16) >= 16:
        reasons.append("weights are not quantized (--wbits 16): there is nothing to pack; save the float checkpoint")
    act = settings.get("act") or {}
    abits = settings.get("abits", act.get("bits", 16))
    if abits < 16 and abits != ACT_BITS:
        reasons.append(
            f"A{abits} activations: compressed-tensors' dynamic int{abits} grid is absmax/{2 ** (abits - 1) - 0.5} "
            f"with codes {-2 ** (abits - 1)}..{2 ** (abits - 1) - 1}, orthoopt's is absmax/{2 ** (abits - 1) - 1} with "
            f"codes +-{2 ** (abits - 1) - 1}, steps {100 / (2 ** abits - 2):.0f}% apart, so the checkpoint would not run "
            "orthoopt's model; only int8 activations are exported (W4A8, W8A8); use --abits 8 or --format orthoopt"
        )
    elif abits < 16 and act.get("symmetric", True) is False:
        reasons.append(
            "asymmetric per-token activations (--act-asym) are not exported: the W*A8 presets compressed-tensors "
            "defines are symmetric, and only those are checked against orthoopt's model; drop --act-asym or keep "
            "--format orthoopt"
        )
    if abits < 16 and act.get("clip_ratio", 1.0) != 1.0:
        reasons.append(
            f"activation clipping (--act-clip {act['clip_ratio']}) has no place in a compressed-tensors dynamic "
            "activation quantizer (its scale is the token's absmax); drop --act-clip or keep --format orthoopt"
        )
    if act.get("online_hadamard"):
        size = (settings.get("online_hadamard") or {}).get("size")
        why = r4_size_reason(size) if size is not None else None
        if why:
            reasons.append(why)
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


def r4_record(model: nn.Module) -> dict:
    """``{"size": n}``: the R4 size of ``model`` (its ``down_proj`` input size) in the shape of quant.json's
    ``online_hadamard`` record, for :func:`unrepresentable` before quantizing."""
    sizes = {lin.in_features for lin in r4_linears(model).values()}
    if len(sizes) != 1:
        raise InvalidInputError(f"online Hadamard needs one intermediate size, the layers have {sorted(sizes)}")
    return {"size": sizes.pop()}


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
    import compressed_tensors.transform as ct_transform
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
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
        "compressor_for": BaseCompressor.get_value_from_registry,
        "transform": ct_transform,
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


def activation_args(ct: dict | None = None):
    """compressed-tensors ``QuantizationArgs`` of the input activations orthoopt exports: int8, one
    scale per token computed at run time, symmetric (the ``input_activations`` of compressed-tensors'
    ``W4A8`` and ``W8A8`` presets)."""
    ct = ct or _import_ct()
    return ct["QuantizationArgs"](num_bits=ACT_BITS, type="int", symmetric=True, strategy="token", dynamic=True)


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
    act = settings.get("act") or {}
    with_act = settings.get("abits", act.get("bits", 16)) < 16
    r4 = settings.get("online_hadamard") if act.get("online_hadamard") else None
    if act.get("online_hadamard") and not (r4 or {}).get("size"):
        raise InvalidInputError("the settings ask for the online Hadamard (R4) but record no size (quant.json's "
                         "online_hadamard); quantize with QuantizeConfig(act=ActQuantConfig(online_hadamard=True))")
    ct = _import_ct()
    out_dir = Path(out_dir)
    fmt = ACT_FORMAT if with_act else FORMAT

    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(result.params) - set(linears))
    if unknown:
        raise InvalidInputError(f"quantized modules not found in the model: {unknown[:3]}")
    targets = {name: linears[name] for name in result.params}
    ignore = sorted(set(linears) - set(targets))
    if with_act:  # one config group: its input_activations apply to exactly the weight-quantized linears
        _check_act_targets(model, set(targets))

    originals = {name: m.weight for name, m in targets.items()}
    ct["apply_quantization_config"](model, frozen_config(spec, ignore, with_act, fmt, ct), show_progress=False)
    compressor = None
    try:
        set_grids(targets, result)
        with _r4(model, r4, ct, progress):
            compressor = ct["ModelCompressor"].from_pretrained_model(model, quantization_format=fmt)
            with _bars(progress):
                compressor.compress_model(model)
            _check_codes(targets, originals, ct["compressor_for"](fmt))
            ct_record = {"format": "compressed-tensors", "compression_format": fmt,
                         "compressed_tensors_version": ct["version"]}
            if with_act:
                ct_record["input_activations"] = activation_args(ct).model_dump(mode="json", exclude_none=True)
            if r4:
                ct_record["transform_config"] = compressor.transform_config.model_dump(mode="json")
            settings["export"] = ct_record
            with atomic_dir(out_dir) as tmp:
                model.save_pretrained(tmp)
                compressor.update_config(str(tmp))
                tokenizer.save_pretrained(tmp)
                (tmp / QUANT_JSON).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    finally:
        _restore(model, targets, originals, ct, compressor)
    return out_dir


def frozen_config(spec: QuantSpec, ignore: list[str], with_act: bool, fmt: str, ct: dict):
    """The export's compressed-tensors ``QuantizationConfig``: one group ``targets: [Linear]`` with the
    weight (and, ``with_act``, int8 input-activation) arguments, ``ignore`` left in full precision,
    status frozen (the grids are set, not calibrated)."""
    scheme = ct["QuantizationScheme"](targets=["Linear"], weights=quantization_args(spec, ct),
                                      input_activations=activation_args(ct) if with_act else None)
    return ct["QuantizationConfig"](config_groups={"group_0": scheme}, ignore=ignore, format=fmt,
                                    quantization_status=ct["QuantizationStatus"].FROZEN)


def set_grids(targets: dict[str, nn.Module], result: QuantResult) -> None:
    """Set each target linear's ``weight_scale`` / ``weight_zero_point`` (attached by
    ``apply_quantization_config``) to orthoopt's grid of it in ``result`` (:func:`_ct_params`)."""
    for name, m in targets.items():
        scale, zero = _ct_params(result.params[name], result.spec, m.weight.dtype)
        if m.weight_scale.shape != scale.shape:
            raise RuntimeError(f"{name}: scale shape {tuple(scale.shape)} != expected {tuple(m.weight_scale.shape)}")
        m.weight_scale.data = scale.to(m.weight.device)
        m.weight_zero_point.data = zero.to(m.weight.device)


def _check_act_targets(model: nn.Module, weight_targets: set[str]) -> None:
    """orthoopt quantizes the inputs of every decoder-layer linear; the export's config group quantizes
    the inputs of the weight-quantized linears. Refuse if the two sets differ."""
    from orthoopt.adapters.archs import locate

    m = locate(model)
    full = {id(mod): name for name, mod in model.named_modules()}
    act_targets = {full[id(lin)] for L in m.layers for lin in L.quant_linears(m.spec).values()}
    if act_targets != weight_targets:
        diff = sorted(act_targets ^ weight_targets)
        raise InvalidInputError(f"activation-quantized and weight-quantized linears differ ({diff[:3]} ...): one "
                         "compressed-tensors config group cannot describe that")


@contextmanager
def _r4(model: nn.Module, record: dict | None, ct: dict, progress: bool):
    """Attach compressed-tensors' R4 transform while the model is compressed and saved (a no-op
    without ``record``); see :func:`orthoopt.export.ct_transform.applied_r4`. Without ``progress``
    the factory's "Applying R4 transforms" bar is disabled (its module's ``tqdm`` name is swapped for
    one whose bars are off, as :func:`_bars` does)."""
    if not record:
        yield None
        return
    from compressed_tensors.transform.factory import base as factory_base

    original = factory_base.tqdm
    if not progress:
        factory_base.tqdm = SimpleNamespace(tqdm=lambda *a, **kw: original.tqdm(*a, **{**kw, "disable": True}))
    try:
        with applied_r4(model, record["size"], ct["transform"]) as config:
            yield config
    finally:
        factory_base.tqdm = original


def _check_codes(targets: dict, originals: dict, compressor_cls) -> None:
    """Every compressed linear must decompress to exactly orthoopt's fake-quantized weight (float32;
    one rounding of the stored scale's dtype otherwise); RuntimeError names the first that does not."""
    for name, m in targets.items():
        sd = {k: v for k, v in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))}
        back = compressor_cls.decompress(sd, m.quantization_scheme)["weight"]
        w = originals[name]
        err = (back.to(w.dtype) - w).abs().max().item()
        eps = torch.finfo(w.dtype).eps  # float32: the two agree exactly; bf16/fp16: to one rounding
        if err > (8 * eps if w.dtype in (torch.float32, torch.float64) else 2 * eps) * max(w.abs().max().item(), 1e-30):
            raise RuntimeError(
                f"{name}: the stored weight dequantizes to within {err:.3g} of orthoopt's, not exactly; "
                "the grid mapping is wrong"
            )


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
