"""Quantize a checkpoint with one decoder layer in memory: read a layer, quantize it, write its shard.

:func:`quantize_layered` runs :func:`orthoopt.quant.quantize_model` on a
:class:`orthoopt.models.onload.LayeredModel`: each decoder layer is read from the safetensors files
when the quantizer reaches it (with its ``down_proj`` rotated there when the online Hadamard is on),
quantized (RTN, or GPTQ on the calibration activations carried from the layer before), written as
its own shard and freed. The embedding, final norm and lm_head (full precision) form shard 0, written
and freed before the first layer is read. The weights written are bit-identical to ``quantize_model``
on the model loaded whole followed by ``save_quantized`` (``tests/test_layered.py``); only the file
layout differs (numbered shards and an index, which ``from_pretrained`` reads).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from orthoopt.errors import InvalidInputError
from orthoopt.models.onload import LayeredModel
from orthoopt.models.shards import ShardedWriter
from orthoopt.quant.config import QuantizeConfig
from orthoopt.quant.model import QUANT_JSON, QuantResult, quantize_model
from orthoopt.utils.atomic import atomic_dir


def write_nonlayer(layered: LayeredModel, writer: ShardedWriter) -> None:
    """Write ``layered``'s weights outside the decoder layers as shard 0, as read, and free them (a
    layer-by-layer writer calls it before its first layer, so they are not resident beside the layers)."""
    writer.write(0, layered.nonlayer_state())
    layered.release_nonlayer()


class _ShardPerLayer:
    """``quantize_model``'s ``onload``: read a layer before it is quantized, write and free it after.

    The weights outside the decoder layers (the quantizer leaves them as they are) are written as shard 0
    and freed before the first layer is read: GPTQ has embedded its calibration windows by then, and
    nothing later needs the embedding or lm_head, so they are not resident beside the layers."""

    def __init__(self, layered: LayeredModel, writer: ShardedWriter) -> None:
        self.layered, self.writer = layered, writer
        self.nonlayer_written = False

    def write_nonlayer(self) -> None:
        write_nonlayer(self.layered, self.writer)
        self.nonlayer_written = True

    def load_layer(self, i: int) -> None:
        if not self.nonlayer_written:
            self.write_nonlayer()
        self.layered.load_layer(i)

    def finish_layer(self, i: int) -> None:
        prefix = self.layered.prefixes[i]
        self.writer.write(i + 1, {prefix + n: p.detach() for n, p in self.layered.layers[i].named_parameters()})
        self.layered.release_layer(i)


def write_layered(layered: LayeredModel, tokenizer, folder: str | os.PathLike, config: QuantizeConfig | None = None,
                  calib: torch.Tensor | None = None, *, progress: bool = True) -> QuantResult:
    """Quantize ``layered`` layer by layer into the existing empty ``folder``: the weight shards and
    their index, ``config.json`` and the tokenizer (not quant.json: the caller writes the settings,
    which it may extend). Arguments as :func:`quantize_layered`; returns ``quantize_model``'s result.
    ``layered`` is used up: its non-layer weights are freed once written (reload the output to run it)."""
    folder = Path(folder)
    writer = ShardedWriter(folder, len(layered) + 1)
    onload = _ShardPerLayer(layered, writer)
    result = quantize_model(layered.model, config, calib, progress=progress, onload=onload)
    if not onload.nonlayer_written:
        onload.write_nonlayer()
    writer.finish()
    layered.model.config.save_pretrained(folder)
    if getattr(layered.model, "generation_config", None) is not None and layered.model.can_generate():
        layered.model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return result


def quantize_layered(model_dir: str | os.PathLike, out_dir: str | os.PathLike, config: QuantizeConfig | None = None,
                     calib: torch.Tensor | None = None, *, dtype: torch.dtype | str = "auto",
                     device: str | torch.device | None = None, progress: bool = True) -> QuantResult:
    """Quantize the checkpoint in ``model_dir`` into ``out_dir`` holding one decoder layer at a time.

    Parameters
    ----------
    model_dir : str or os.PathLike
        A Hugging Face folder (or registered name) with safetensors weights and a tokenizer.
    out_dir : str or os.PathLike
        The output folder, written atomically: weight shards, ``config.json``, the tokenizer and
        ``quant.json`` (orthoopt's format, as :func:`orthoopt.quant.save_quantized` writes it).
    config : QuantizeConfig, optional
        As :func:`orthoopt.quant.quantize_model` (default W4 RTN per output channel).
    calib : torch.Tensor, optional
        GPTQ's ``[nsamples, seq_len]`` calibration token ids.
    dtype : torch.dtype or str
        The load and write dtype (``"auto"``: the checkpoint's own).
    device : str or torch.device, optional
        Where each layer is quantized (default the CPU); the shards are written from the host.
    progress : bool
        Progress bars on stderr.

    Returns
    -------
    QuantResult
        As :func:`orthoopt.quant.quantize_model`; its hooks sit on the skeleton, which is not kept.

    Raises
    ------
    InvalidInputError
        Everything :func:`orthoopt.quant.quantize_model` refuses, and folders
        :class:`~orthoopt.models.onload.LayeredModel` cannot read layer by layer, before any output.
    """
    from orthoopt.models.dtypes import resolve_model_dtype
    from orthoopt.models.io import check_model_folder, load_tokenizer
    from orthoopt.models.sources import resolve_source

    source = resolve_source(model_dir, progress=progress)
    if source.folder is None:
        raise InvalidInputError(f"{model_dir} is a {source.kind} source: layer-by-layer quantization reads a Hugging "
                                "Face folder with safetensors weights")
    check_model_folder(source.folder)
    tokenizer = load_tokenizer(source.folder)
    if tokenizer is None:
        raise FileNotFoundError(f"{source.folder} has no tokenizer (tokenizer.json / tokenizer_config.json / "
                                "tokenizer.model); copy the tokenizer files into it")
    layered = LayeredModel(source.folder, resolve_model_dtype(source, dtype), device)
    with atomic_dir(out_dir) as tmp:
        result = write_layered(layered, tokenizer, tmp, config, calib, progress=progress)
        (tmp / QUANT_JSON).write_text(json.dumps(result.settings, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return result


__all__ = ["quantize_layered", "write_layered"]
