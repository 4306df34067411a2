"""Activation statistics with one decoder layer in memory (``orthoopt diagnose --streamed --calib``).

:func:`layered_activation_report` runs the calibration tokens through a
:class:`~orthoopt.models.onload.LayeredModel` layer by layer (:mod:`orthoopt.eval.layered`: record the
inputs of layer 0, apply each layer to every sequence, then the model's own final norm for
``lm_head``'s input), captures each layer's linear inputs while that layer is loaded, measures them
(:func:`~orthoopt.diagnostics.report.activation_report`) and keeps only the small parts the plots need
(per-channel max and the first rows). The rows are the whole-model
:func:`~orthoopt.diagnostics.report.capture_inputs` + ``activation_report``'s, in the same order and to
the last digit (the same operations on the same inputs; ``tests/test_layered.py``). Memory: the
non-layer weights, one layer, the hidden states of the calibration tokens and one layer's captured
inputs, instead of every layer's.
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from orthoopt.adapters.archs import locate
from orthoopt.adapters.calibration import input_groups
from orthoopt.diagnostics.activations import DEFAULT_MASSIVE_RATIO, channel_max_abs
from orthoopt.diagnostics.report import activation_report, aggregate_activation_layers
from orthoopt.errors import InvalidInputError, OrthooptError
from orthoopt.adapters.archs import layer_output
from orthoopt.eval.layered import record_layer_inputs, run_head


class _Captured(OrthooptError):
    """Ends the head pass once lm_head's input is captured (its logits are not needed)."""


def _roles(m) -> dict[str, str]:
    out: dict[str, str] = {}
    for L in m.layers:
        for r in L.projs:
            out.setdefault(L.names[r], m.spec.group_of(r))
    out[m.names["lm_head"]] = "head_in"
    return out


def _capture(modules: dict, run) -> dict[str, torch.Tensor]:
    """``{leader: X float32 [T, in]}``: the inputs of ``modules`` ({leader: module}) while ``run()`` runs."""
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in modules}

    def hook(name):
        def fn(_module, args):
            parts[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).to("cpu", torch.float32))
        return fn

    handles = [mod.register_forward_pre_hook(hook(n)) for n, mod in modules.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(p) for n, p in parts.items()}


@torch.no_grad()
def layered_activation_report(layered, ids: torch.Tensor, seq_len: int,
                              massive_ratio: float = DEFAULT_MASSIVE_RATIO, massive_min_abs: float = 0.0,
                              keep_rows: int = 128, progress: bool = True) -> tuple[dict, dict]:
    """:func:`~orthoopt.diagnostics.report.activation_report` of every linear input on ``ids``, layer by layer.

    Parameters
    ----------
    layered : LayeredModel
        The model; its layers are loaded and released in turn.
    ids : torch.Tensor
        1-D token ids, cut into consecutive sequences of ``seq_len`` (as ``capture_inputs``).
    seq_len : int
        Tokens per sequence.
    massive_ratio, massive_min_abs : float
        As ``activation_report``.
    keep_rows : int
        How many first rows of each input to keep for the heat map.
    progress : bool
        A bar over the layers on stderr.

    Returns
    -------
    report : dict
        ``{"inputs": [...], "layers": [...]}`` as ``activation_report(capture_inputs(model, ids, seq_len))``.
    kept : dict
        ``{module name: (channel max [in] float64, first keep_rows rows float32)}`` of every module.
    """
    if ids.ndim != 1 or ids.numel() == 0:
        raise InvalidInputError(f"token ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
    if seq_len < 1:
        raise InvalidInputError(f"seq_len must be >= 1, got {seq_len}")
    m = locate(layered.model)
    roles, groups, linears = _roles(m), input_groups(m), m.input_modules()
    batches = [chunk.reshape(1, -1) for chunk in ids.split(seq_len)]
    hidden, kwargs = record_layer_inputs(layered, batches)
    rows: list[dict] = []
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def measure(leaders: list[str], run) -> None:
        X = _capture({n: linears[n] for n in leaders}, run)
        inputs = {name: X[leader] for leader in leaders for name in groups[leader]}
        rows.extend(activation_report(inputs, massive_ratio, massive_min_abs, roles=roles, progress=False)["inputs"])
        for leader in leaders:
            kept.update({name: (channel_max_abs(X[leader]), X[leader][:keep_rows].clone()) for name in groups[leader]})

    def apply(i: int, layer) -> None:
        for b, kw in enumerate(kwargs):
            hidden[b] = layer_output(layer(hidden[b], **kw[i]))

    for i, L in enumerate(tqdm(m.layers, desc="layers", unit="layer", disable=not progress, file=sys.stderr)):
        names = set(L.names.values())
        leaders = [n for n in groups if n in names]
        layer = layered.load_layer(i)
        try:
            measure(leaders, lambda: apply(i, layer))
        finally:
            layered.release_layer(i)
    head = m.names["lm_head"]

    def stop(_module, _args):
        raise _Captured

    def heads() -> None:
        handle = linears[head].register_forward_pre_hook(stop)  # after the capture hook: logits not made
        try:
            for b, batch in enumerate(batches):
                try:
                    run_head(layered, hidden[b], batch)
                except _Captured:
                    pass
        finally:
            handle.remove()

    if head in groups:
        measure([head], heads)
    return {"inputs": rows, "layers": aggregate_activation_layers(rows)}, kept


__all__ = ["layered_activation_report"]
