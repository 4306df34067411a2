"""A causal LM whose decoder layers stay on disk until they are needed: one layer in memory at a time.

:class:`LayeredModel` builds the model's skeleton from ``config.json`` with every parameter on the
``meta`` device (buffers such as the rotary ``inv_freq`` are computed for real, as in a normal
load), loads the weights that are not in a decoder layer (embedding, final norm, lm_head) from the
safetensors files, and reads one decoder layer on :meth:`~LayeredModel.load_layer` and frees it on
:meth:`~LayeredModel.release_layer`. The tensors are those ``from_pretrained`` would load (the same
files, cast to the same dtype), so a layer computes exactly what it computes in a model loaded whole:
layer-by-layer evaluation and quantization give bit-identical results to the in-memory paths
(``tests/test_layered.py``).

Only folders whose tensor names are the model's parameter names are read this way (the Llama family
as saved by ``save_pretrained``; checked when the skeleton is built); compressed-tensors folders
(``quantization_config`` in ``config.json``) are refused: they load through their own decompressor.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from orthoopt.adapters.archs import locate
from orthoopt.errors import InvalidInputError
from orthoopt.models.safetensors_folder import SafetensorsCheckpoint
from orthoopt.utils.tensorfile import read_json_object


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside the block is created on ``meta`` (buffers stay real)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _to_meta(modules) -> None:
    """Replace each module's own parameters by ``meta`` ones (freeing their memory; buffers stay)."""
    for module in modules:
        for name, p in module._parameters.items():
            if p is not None and not p.is_meta:
                module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)


class LayeredModel:
    """The ``*ForCausalLM`` of a Hugging Face folder with its decoder layers read one at a time.

    Parameters
    ----------
    folder : str or os.PathLike
        A Hugging Face model folder with ``config.json`` and safetensors weights.
    dtype : torch.dtype
        The dtype every floating parameter is loaded in (as ``from_pretrained(..., dtype=dtype)``).
    device : str or torch.device, optional
        Where the non-layer weights live and where each loaded layer is moved (default: the CPU).

    Attributes
    ----------
    model : torch.nn.Module
        The eval-mode skeleton: embedding, final norm and lm_head loaded; each decoder layer's
        parameters on ``meta`` except while it is loaded.
    layers : torch.nn.ModuleList
        The decoder layers of ``model`` (from the architecture table).
    prefixes : list of str
        The state-dict prefix of each decoder layer (``"model.layers.3."``).

    Raises
    ------
    InvalidInputError
        A compressed-tensors folder, or a checkpoint whose tensor names are not the model's
        parameter names (named in the message).
    FileNotFoundError
        A missing folder, config or weight file.
    """

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype,
                 device: str | torch.device | None = None) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = Path(folder)
        self.checkpoint = SafetensorsCheckpoint(self.folder)
        if "quantization_config" in read_json_object(self.folder / "config.json"):
            raise InvalidInputError(f"{self.folder} is a compressed-tensors checkpoint: layer-by-layer loading reads "
                                    "plain safetensors weights only; load it whole (without --streamed)")
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        config = AutoConfig.from_pretrained(self.folder, trust_remote_code=False)
        with _parameters_on_meta(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        model.eval()
        self.model = model
        located = locate(model)
        decoder = located.spec.decoder
        self.layers: nn.ModuleList = getattr(getattr(model, decoder), located.spec.layers)
        self.prefixes = [f"{decoder}.{located.spec.layers}.{i}." for i in range(len(self.layers))]
        names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        in_layer = tuple(self.prefixes)
        outside = [n for n in names if not n.startswith(in_layer)]
        tied = self._tied_names(outside)
        missing = [n for n in names if n not in self.checkpoint and n not in tied]
        if missing:
            raise InvalidInputError(
                f"{self.folder}: the safetensors files lack {len(missing)} parameter(s) of the model, e.g. "
                f"{missing[:3]} (layer-by-layer loading needs tensors named as the model's parameters; "
                "load it whole instead)")
        state = self.checkpoint.read([n for n in outside if n not in tied], dtype=dtype)
        model.load_state_dict({n: t.to(self.device) for n, t in state.items()}, strict=False, assign=True)
        if tied:
            model.tie_weights()
        leftover = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(in_layer)]
        if leftover:
            raise InvalidInputError(f"{self.folder}: parameters {leftover[:3]} were not loaded")
        for name, buf in model.named_buffers():
            if buf.device != self.device:
                module_name, _, attr = name.rpartition(".")
                model.get_submodule(module_name)._buffers[attr] = buf.to(self.device)

    def _tied_names(self, outside: list[str]) -> set[str]:
        """lm_head's weight when the config ties it to the embedding and the files do not store it."""
        tie = getattr(self.model.config, "tie_word_embeddings", False)
        get_text = getattr(self.model.config, "get_text_config", None)
        if get_text is not None:
            tie = getattr(get_text(), "tie_word_embeddings", tie)
        head = self.model.get_output_embeddings()
        if not tie or head is None:
            return set()
        head_names = {n for n in outside if n.endswith("lm_head.weight")}
        return {n for n in head_names if n not in self.checkpoint}

    def __len__(self) -> int:
        return len(self.layers)

    def layer_names(self, i: int) -> list[str]:
        """The checkpoint's tensor names of decoder layer ``i`` (the full state-dict names)."""
        return [self.prefixes[i] + n for n, _ in self.layers[i].named_parameters(remove_duplicate=False)]

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Decoder layer ``i``'s tensors by checkpoint name, in ``dtype``: what :meth:`load_layer` loads
        (a subclass may transform them, e.g. fuse norms)."""
        return self.checkpoint.read(self.layer_names(i), dtype=self.dtype)

    def load_layer(self, i: int) -> nn.Module:
        """Read decoder layer ``i`` (:meth:`layer_state`, on ``device``) and return it."""
        prefix = self.prefixes[i]
        state = self.layer_state(i)
        layer = self.layers[i]
        # a tensor already in dtype views the memory-mapped file: clone so the pages are not kept mapped
        layer.load_state_dict({n[len(prefix):]: t.to(self.device, copy=True) for n, t in state.items()},
                              strict=True, assign=True)
        return layer

    def release_layer(self, i: int) -> None:
        """Free decoder layer ``i``'s parameters (back on ``meta``; its buffers stay)."""
        _to_meta(self.layers[i].modules())

    def release_nonlayer(self) -> None:
        """Free the weights outside the decoder layers (embedding, final norm, lm_head: back on ``meta``)
        once the caller has no more use for them: a quantizer writes them out and drops them before its
        first layer. The model cannot run a forward afterwards."""
        in_layer = tuple(self.prefixes)
        _to_meta(m for n, m in self.model.named_modules() if not (n + ".").startswith(in_layer))

    def nonlayer_state(self) -> dict[str, torch.Tensor]:
        """The loaded tensors outside the decoder layers, by checkpoint name (lm_head left out when tied)."""
        tied = self._tied_names([n for n, _ in self.model.named_parameters(remove_duplicate=False)
                                 if not n.startswith(tuple(self.prefixes))])
        return {n: p for n, p in self.model.named_parameters(remove_duplicate=False)
                if not n.startswith(tuple(self.prefixes)) and n not in tied}


__all__ = ["LayeredModel"]
