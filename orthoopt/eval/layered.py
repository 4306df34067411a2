"""Perplexity with one decoder layer in memory: the windows go through the model layer by layer.

:func:`perplexity_layered` scores the same windows as :func:`orthoopt.eval.perplexity`, in three passes
over a :class:`orthoopt.models.onload.LayeredModel`:

1. **record** -- for each batch of windows the model runs with its decoder layers swapped for
   recorders, which keep the hidden states entering layer 0 and the keyword arguments (masks,
   position embeddings, ...) the model hands each layer, and stop the forward;
2. **layers** -- each decoder layer is read from disk, applied to every batch's hidden states with
   that batch's arguments, and freed;
3. **head** -- each batch runs through the model once more with layer 0 swapped for a stand-in that
   returns the batch's final hidden states and the other layers for pass-throughs, so the model's own
   final norm, lm_head (and any logit post-processing) make the logits.

Every operation is the one the whole model performs on the same inputs, so the result is bit-identical
to :func:`~orthoopt.eval.perplexity` on the model loaded whole (``tests/test_layered.py``). Memory: the
non-layer weights, one layer, the hidden states of every evaluated window (``windows x seq_len x
hidden`` in the model's dtype) and one batch's logits.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from tqdm.auto import tqdm

from orthoopt.adapters.archs import layer_output
from orthoopt.adapters.recording import record_layer_inputs as _record, swap_layers
from orthoopt.eval.perplexity import default_seq_len, score_windows, window_ids
from orthoopt.quant.calib import check_context


class _Replay(nn.Module):
    """Stands in for decoder layer 0 (returns ``hidden``) or a later one (returns its input)."""

    def __init__(self, hidden: torch.Tensor | None) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return hidden_states if self.hidden is None else self.hidden


@torch.no_grad()
def record_layer_inputs(layered, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Pass 1 of the module docstring: for each batch of token ids ``[batch, seq]``, the hidden states
    entering decoder layer 0 and the keyword arguments the model hands each layer
    (``kwargs[b][i]``: batch ``b``, layer ``i``); no decoder layer is loaded
    (:func:`orthoopt.adapters.recording.record_layer_inputs`)."""
    return _record(layered.model, layered.layers, batches, layered.device)


def run_head(layered, hidden: torch.Tensor, batch: torch.Tensor):
    """Pass 3 of the module docstring for one batch: the model's output (its own final norm and lm_head)
    on the final hidden states ``hidden`` of the token ids ``batch``."""
    layers = layered.layers
    originals = swap_layers(layers, [_Replay(hidden)] + [_Replay(None) for _ in range(len(layers) - 1)])
    try:
        return layered.model(input_ids=batch.to(layered.device), use_cache=False)
    finally:
        swap_layers(layers, originals)


@torch.no_grad()
def perplexity_layered(
    layered,
    tokenizer_or_ids,
    text: str | None = None,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """:func:`orthoopt.eval.perplexity` of a model read one decoder layer at a time.

    Parameters
    ----------
    layered : orthoopt.models.onload.LayeredModel
        The model; its decoder layers are loaded and released in turn (none stays loaded).
    tokenizer_or_ids, text, seq_len, max_tokens, batch_size, progress
        As in :func:`orthoopt.eval.perplexity`.

    Returns
    -------
    dict
        The same keys and values as :func:`orthoopt.eval.perplexity` on the model loaded whole.

    Raises
    ------
    InvalidInputError
        As :func:`orthoopt.eval.perplexity` does for bad windows or arguments.
    """
    model, layers = layered.model, layered.layers
    seq_len = default_seq_len(model) if seq_len is None else seq_len
    check_context(model, seq_len, "seq_len")
    ids = window_ids(tokenizer_or_ids, text, seq_len, max_tokens, batch_size)
    batches = [ids[s : s + batch_size] for s in range(0, ids.shape[0], batch_size)]
    hidden, kwargs = record_layer_inputs(layered, batches)
    for i in tqdm(range(len(layers)), desc="layers", unit="layer", disable=not progress, file=sys.stderr):
        layer = layered.load_layer(i)
        try:
            for b, kw in enumerate(kwargs):  # one batch's states replaced at a time: no second copy of all
                hidden[b] = layer_output(layer(hidden[b], **kw[i]))
        finally:
            layered.release_layer(i)

    def logits_of(b: int, batch: torch.Tensor) -> torch.Tensor:
        try:
            return run_head(layered, hidden[b], batch).logits
        finally:
            hidden[b] = None  # free the batch's states once its logits are made

    return score_windows(logits_of, ids, batch_size, progress)


__all__ = ["perplexity_layered", "record_layer_inputs", "run_head"]
