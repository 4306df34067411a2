"""Write a compressed-tensors checkpoint one decoder layer at a time (``orthoopt quantize --streamed``).

:func:`save_compressed_tensors_layered` reads a fake-quantized model layer by layer (a
:class:`~orthoopt.models.onload.LayeredModel` of the folder the layer-by-layer quantizer wrote) and,
for each decoder layer: attaches compressed-tensors' quantization scheme to the layer's quantized
linears, sets their scales and zero points from the :class:`~orthoopt.quant.model.QuantResult` (the
same grid mapping as :func:`orthoopt.export.compressed_tensors.save_compressed_tensors`), packs them
with compressed-tensors' own compressor, checks that every packed weight dequantizes to orthoopt's
fake-quantized weight, writes the layer as its own shard and frees it. The embedding, final norm and
lm_head form shard 0 (full precision, as in the whole-model export), written and freed first.
``config.json``'s ``quantization_config`` is the one compressed-tensors derives from the model with
the schemes attached, as in the whole-model export; the tensors and the config are the whole-model export's
(``tests/test_ct_layered.py``), only the file layout differs (numbered shards and an index).

With R4 (``--online-hadamard``) the ``transform_config`` and the one ``R4_input`` matrix the layers
share are the whole-model export's too (:func:`orthoopt.export.ct_transform.stored_r4`: built by
compressed-tensors on a probe linear and checked against orthoopt's matrix; written with the first
layer's shard).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from orthoopt.errors import InvalidInputError
from orthoopt.export.compressed_tensors import (
    ACT_FORMAT,
    FORMAT,
    _bars,
    _check_codes,
    _import_ct,
    _restore,
    activation_args,
    check_exportable,
    frozen_config,
    set_grids,
)
from orthoopt.models.onload import LayeredModel
from orthoopt.models.shards import ShardedWriter
from orthoopt.quant.layered import write_nonlayer
from orthoopt.quant.model import QUANT_JSON, QuantResult
from orthoopt.utils.atomic import atomic_dir

def layered_reasons(settings: dict) -> list[str]:
    """Why ``settings`` (as :func:`orthoopt.export.compressed_tensors.unrepresentable` takes them) cannot
    be exported layer by layer beyond what the whole-model export refuses: nothing today (R4 too is
    written layer by layer); kept so that :func:`orthoopt.export.choose.can_carry` asks one place."""
    return []


@torch.no_grad()
def _layer_state(layered: LayeredModel, i: int, result: QuantResult, with_act: bool, fmt: str, ct: dict,
                 progress: bool) -> dict[str, torch.Tensor]:
    """Layer ``i`` packed: ``{checkpoint name: tensor}`` (on the CPU); the layer is freed on return."""
    prefix = layered.prefixes[i]
    layer = layered.load_layer(i)
    try:
        linears = {prefix + n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        targets = {name: m for name, m in linears.items() if name in result.params}
        ignore = sorted(name[len(prefix):] for name in set(linears) - set(targets))
        originals = {name: m.weight for name, m in targets.items()}
        ct["apply_quantization_config"](layer, frozen_config(result.spec, ignore, with_act, fmt, ct),
                                        show_progress=False)
        try:
            set_grids(targets, result)
            with _bars(progress):
                for m in targets.values():
                    ct["compress_module"](m, fmt)
            _check_codes(targets, originals, ct["compressor_for"](fmt))
            state = {prefix + n: t.detach().to("cpu") for n, t in layer.state_dict().items()}
        finally:
            _restore(layer, targets, originals, ct, None)
    finally:
        layered.release_layer(i)
    return state


def save_compressed_tensors_layered(layered: LayeredModel, tokenizer, out_dir: str | os.PathLike,
                                    result: QuantResult, settings: dict | None = None,
                                    progress: bool = True) -> Path:
    """Write the fake-quantized model of ``layered`` as a compressed-tensors checkpoint in ``out_dir``
    (atomically), one decoder layer in memory at a time.

    Parameters
    ----------
    layered : LayeredModel
        The fake-quantized model (as :func:`orthoopt.quant.quantize_layered` writes it), read layer by
        layer; it is used up: its layers and its non-layer weights are left released (on ``meta``).
    tokenizer
        Saved beside the weights.
    out_dir : str or os.PathLike
        The output folder: weight shards and their index, ``config.json`` with ``quantization_config``,
        the tokenizer and ``quant.json`` (``settings`` plus the ``export`` record).
    result : QuantResult
        The quantizer's result: the weight grids (``params``, ``spec``) of every quantized linear.
    settings : dict, optional
        quant.json's settings (default ``result.settings``).
    progress : bool
        compressed-tensors' bars on stderr.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    InvalidInputError
        What :func:`orthoopt.export.compressed_tensors.check_exportable` refuses (R4 of a size that is
        not a power of two among them), a missing compressed-tensors, a result without weight grids;
        before any output.
    RuntimeError
        A packed weight that does not dequantize to the fake-quantized weight (a bug).
    """
    settings = dict(settings if settings is not None else result.settings)
    check_exportable(settings)
    reasons = layered_reasons(settings)
    if reasons:
        raise InvalidInputError("cannot export to compressed-tensors layer by layer: " + "; ".join(reasons))
    if result.spec is None or not result.params:
        raise InvalidInputError("the QuantResult has no weight grids (weights were not quantized): nothing to export")
    experts = sorted(k for k, p in result.params.items() if p.scale.ndim == 3)
    if experts:
        check_exportable({**settings, "experts": experts})
    act = settings.get("act") or {}
    with_act = settings.get("abits", act.get("bits", 16)) < 16
    fmt = ACT_FORMAT if with_act else FORMAT
    ct = _import_ct()
    from compressed_tensors.compressors import compress_module

    ct["compress_module"] = compress_module
    model = layered.model
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(result.params) - linears)
    if unknown:
        raise InvalidInputError(f"quantized modules not found in the model: {unknown[:3]}")
    if with_act:
        from orthoopt.export.compressed_tensors import _check_act_targets

        _check_act_targets(model, set(result.params))
    r4 = None
    if act.get("online_hadamard"):
        from orthoopt.export.ct_transform import stored_r4

        r4 = stored_r4(model, (settings.get("online_hadamard") or {})["size"], ct["transform"], layered.dtype)
    with atomic_dir(out_dir) as tmp:
        writer = ShardedWriter(tmp, len(layered) + 1)
        write_nonlayer(layered, writer)
        for i in range(len(layered)):
            state = _layer_state(layered, i, result, with_act, fmt, ct, progress)
            if r4 is not None and i == 0:
                state[r4[1]] = r4[2]
            writer.write(i + 1, state)
        writer.finish()
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_quantization_config(model, tmp, result, sorted(linears - set(result.params)), with_act, fmt, ct,
                                   None if r4 is None else r4[0])
        settings["export"] = {"format": "compressed-tensors", "compression_format": fmt,
                              "compressed_tensors_version": ct["version"], "layered": True}
        if with_act:
            settings["export"]["input_activations"] = activation_args(ct).model_dump(mode="json", exclude_none=True)
        (tmp / QUANT_JSON).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir)


def _write_quantization_config(model: nn.Module, folder: Path, result: QuantResult, ignore: list[str],
                               with_act: bool, fmt: str, ct: dict, transform=None) -> None:
    """``config.json``'s ``quantization_config`` as the whole-model export writes it: compressed-tensors
    derives it from the skeleton with the schemes attached (its decoder layers on ``meta``, so nothing
    is allocated) and ``transform`` (R4's transform config) as the model's, marked compressed; the
    schemes and the transform config are taken off again."""
    targets = {name: model.get_submodule(name) for name in result.params}
    originals = {name: m.weight for name, m in targets.items()}
    ct["apply_quantization_config"](model, frozen_config(result.spec, ignore, with_act, fmt, ct),
                                    show_progress=False)
    if transform is not None:
        model.transform_config = transform  # where ModelCompressor looks for it (as apply_transform_config sets)
    try:
        compressor = ct["ModelCompressor"].from_pretrained_model(model, quantization_format=fmt)
        compressor.quantization_config.quantization_status = ct["QuantizationStatus"].COMPRESSED
        compressor.update_config(str(folder))
    finally:
        _restore(model, targets, originals, ct, None)
        if "transform_config" in vars(model):
            delattr(model, "transform_config")


__all__ = ["layered_reasons", "save_compressed_tensors_layered"]
