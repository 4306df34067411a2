"""What a decoder's layers receive: the hidden states entering layer 0 and each layer's keyword
arguments (attention mask, position embeddings, cache flags), recorded by one forward per batch in
which stand-ins replace the layers and the last one ends the pass (:class:`StopForward`). The
layer-by-layer paths then run the real layers one at a time on these inputs: GPTQ's sequential
calibration (:mod:`orthoopt.quant.sequential`), the streamed evaluation and statistics
(:mod:`orthoopt.eval.layered`)."""

from __future__ import annotations

import torch
from torch import nn

from orthoopt.errors import InvalidInputError, OrthooptError


class StopForward(OrthooptError):
    """Raised inside a forward (by a stand-in layer or a hook) to end it early; caught by the caller."""


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index``: records its input (layer 0) and keyword arguments."""

    def __init__(self, index: int, last: bool, store: dict) -> None:
        super().__init__()
        self.index, self.last, self.store = index, last, store

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if args:
            raise InvalidInputError("decoder layers are expected to receive only hidden_states positionally")
        if self.index == 0:
            self.store["hidden"] = hidden_states.detach()
        self.store["kwargs"].append(kwargs)
        if self.last:
            raise StopForward
        return hidden_states


def swap_layers(layers: nn.ModuleList, stand_ins: list[nn.Module]) -> list[nn.Module]:
    """Put ``stand_ins`` in place of ``layers``' modules; returns the originals (to swap back)."""
    originals = list(layers)
    for i, m in enumerate(stand_ins):
        layers[i] = m
    return originals


@torch.no_grad()
def record_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches,
                        device: torch.device | str | None = None) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """For each batch of token ids ``[batch, seq]``, the hidden states entering ``layers[0]`` and the
    keyword arguments ``model`` hands each layer (``kwargs[b][i]``: batch ``b``, layer ``i``); no
    decoder layer runs. ``device``: where the ids go (default: the model's first parameter's)."""
    if device is None:
        device = next(model.parameters()).device
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = []
    store: dict = {}
    originals = swap_layers(layers, [_Recorder(i, i == len(layers) - 1, store) for i in range(len(layers))])
    try:
        for batch in batches:
            store.update(hidden=None, kwargs=[])
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
            hidden.append(store["hidden"])
            kwargs.append(store["kwargs"])
    finally:
        swap_layers(layers, originals)
    return hidden, kwargs


__all__ = ["StopForward", "record_layer_inputs", "swap_layers"]
