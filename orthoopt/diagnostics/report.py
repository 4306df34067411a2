"""Collect a model's weight (and optionally activation) statistics into JSON-able tables.

Diagnosis measures a model as it is stored: it neither fuses norms nor rotates. The weights are the
embedding table and every linear layer's ``[out, in]`` weight (``lm_head`` is left out while it is
tied to the embedding, which then stands for both), located with
:class:`orthoopt.adapters.DecoderAdapter` and named like ``"layers.3.self_attn.q_proj"``.
Statistics are defined in :mod:`orthoopt.diagnostics.stats` and
:mod:`orthoopt.diagnostics.activations`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from orthoopt.adapters.arch_table import GROUPS
from orthoopt.adapters.decoder import DecoderAdapter
from orthoopt.diagnostics.activations import (
    DEFAULT_MASSIVE_RATIO,
    DEFAULT_TOP,
    activation_stats,
)
from orthoopt.diagnostics.stats import (
    DEFAULT_BITS,
    DEFAULT_K,
    aggregate_layers,
    group_of,
    layer_of,
    undefined_stats,
    weight_stats,
)
from orthoopt.errors import InvalidInputError
from orthoopt.quant.calib import read_text, tokenize_text


def stored_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: weight}`` of a decoder's embedding and linear layers, in forward order, as stored.

    Weights are the parameters themselves (not copies): ``embed_tokens`` ``[vocab, hidden]``, then
    per layer every projection of the architecture table ``[out, in]`` (q/k/v/o/gate/up/down for
    Llama; MoE expert tensors one ``...experts.down_proj.{e}`` per expert), then ``lm_head``
    ``[vocab, hidden]`` unless tied. Raises ValueError (``UnsupportedModelError``) for a model the
    adapters do not support.
    """
    m = DecoderAdapter(model).modules
    out = {m.names["embed"]: m.embed.weight.detach()}
    for L in m.layers:
        for role, mod in L.projs.items():
            pr = m.spec.proj(role)
            W = getattr(mod, pr.param).detach()
            if pr.experts:
                out.update({f"{L.names[role]}.{pr.param}.{e}": W[e] for e in range(W.shape[0])})
            else:
                out[L.names[role]] = W
    if not m.tied:
        out[m.names["lm_head"]] = m.lm_head.weight.detach()
    return out


class LayeredWeights(Mapping):
    """:func:`stored_weights` of a :class:`~orthoopt.models.onload.LayeredModel`, read one decoder layer
    at a time: the same names, in the same order, with the same tensors; looking up a weight of another
    layer frees the layer held and reads that one, so iterating in order reads each layer once.

    Parameters
    ----------
    layered : LayeredModel
        The model whose embedding (and untied lm_head) is loaded and whose layers stay on disk.
    """

    def __init__(self, layered) -> None:
        from orthoopt.adapters.archs import locate

        self.layered = layered
        m = locate(layered.model)  # the skeleton's modules (DecoderAdapter refuses its meta parameters)
        self._where: dict[str, tuple[int | None, nn.Module, str, int | None]] = {
            m.names["embed"]: (None, m.embed, "weight", None)}
        for i, L in enumerate(m.layers):
            for role, mod in L.projs.items():
                pr = m.spec.proj(role)
                if pr.experts:
                    experts = getattr(mod, pr.param).shape[0]
                    self._where.update({f"{L.names[role]}.{pr.param}.{e}": (i, mod, pr.param, e)
                                        for e in range(experts)})
                else:
                    self._where[L.names[role]] = (i, mod, pr.param, None)
        if not m.tied:
            self._where[m.names["lm_head"]] = (None, m.lm_head, "weight", None)
        self._held: int | None = None

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self):
        return iter(self._where)

    def __getitem__(self, name: str) -> torch.Tensor:
        layer, module, param, expert = self._where[name]
        if layer is not None and layer != self._held:
            self.release()
            self.layered.load_layer(layer)
            self._held = layer
        W = getattr(module, param).detach()
        return W if expert is None else W[expert]

    def release(self) -> None:
        """Free the layer held, if any."""
        if self._held is not None:
            self.layered.release_layer(self._held)
            self._held = None


INPUT_ROLES = {**GROUPS, "head_in": "final hidden state (lm_head input)"}
"""Roles of the linear-layer inputs of a decoder, in forward order: the input-sharing groups of the
architecture table (:data:`orthoopt.adapters.arch_table.GROUPS`, with their labels) and ``head_in``. R1 rotates ``attn_in``,
``mlp_in`` and ``head_in`` (the residual stream after a norm), ``R2`` the value heads that make up
``attn_out``; ``mlp_hidden`` is rotated by neither (only by an online Hadamard, R4)."""


def input_roles(model: nn.Module) -> dict[str, str]:
    """``{module name: role}`` (a key of :data:`INPUT_ROLES`: the table's group) for every module owning
    a projection, and ``lm_head``."""
    m = DecoderAdapter(model).modules
    out: dict[str, str] = {}
    for L in m.layers:
        for r in L.projs:  # a module owning several tensors (MoE experts) is hooked at its input
            out.setdefault(L.names[r], m.spec.group_of(r))
    out[m.names["lm_head"]] = "head_in"
    return out


def weight_report(
    weights: Mapping[str, torch.Tensor],
    k: float = DEFAULT_K,
    bits: int = DEFAULT_BITS,
    progress: bool = True,
) -> dict:
    """``{"blocks": [...], "layers": [...]}`` for named 2-D weights.

    ``blocks``: one :func:`~orthoopt.diagnostics.stats.weight_stats` row per weight (plus ``name``),
    in the given order; a block whose statistics are undefined (all zeros, constant) gets None figures
    and an ``error`` (:func:`~orthoopt.diagnostics.stats.undefined_stats`); ``layers``: :func:`~orthoopt.diagnostics.stats.aggregate_layers` of them.
    """
    if not weights:
        raise InvalidInputError("weight_report needs at least one weight")
    rows = []
    for name, W in tqdm(weights.items(), desc="weight stats", disable=not progress, leave=False):
        try:
            rows.append({"name": name, **weight_stats(W, k=k, bits=bits)})
        except ValueError as e:  # all-zero or constant block: its figures are undefined, not an error
            rows.append({"name": name, **undefined_stats(W, str(e), k=k, bits=bits)})
    return {"blocks": rows, "layers": aggregate_layers(rows)}


def activation_report(
    inputs: Mapping[str, torch.Tensor],
    massive_ratio: float = DEFAULT_MASSIVE_RATIO,
    massive_min_abs: float = 0.0,
    top: int = DEFAULT_TOP,
    roles: Mapping[str, str] | None = None,
    progress: bool = True,
) -> dict:
    """``{"inputs": [...], "layers": [...]}`` for captured linear-layer inputs ``{module: X [T, in]}``.

    Modules given the same tensor object (q/k/v, and gate/up, read one normalized input; see
    ``DecoderAdapter.linear_inputs``) are measured once: each ``inputs`` row is
    :func:`~orthoopt.diagnostics.activations.activation_stats` without the per-channel list, plus
    ``name`` (the first module), ``modules`` (all modules reading it) and ``role`` (``roles[name]``,
    e.g. from :func:`input_roles`; None without ``roles``). ``layers`` aggregates per decoder layer
    (see :func:`aggregate_activation_layers`).
    """
    if not inputs:
        raise InvalidInputError("activation_report needs at least one captured input")
    shared: dict[int, list[str]] = {}
    first: dict[int, torch.Tensor] = {}
    for name, X in inputs.items():
        shared.setdefault(id(X), []).append(name)
        first.setdefault(id(X), X)
    rows = []
    for key, names in tqdm(shared.items(), desc="activation stats", disable=not progress, leave=False):
        try:
            stats = activation_stats(first[key], massive_ratio, massive_min_abs, top, per_channel=False)
        except ValueError as e:
            raise InvalidInputError(f"input of {names[0]!r}: {e}") from None
        rows.append({"name": names[0], "modules": names, "role": (roles or {}).get(names[0]), **stats})
    return {"inputs": rows, "layers": aggregate_activation_layers(rows)}


def aggregate_activation_layers(rows: list[dict]) -> list[dict]:
    """Per decoder layer (groups as :func:`~orthoopt.diagnostics.stats.group_of`) over its inputs'
    :func:`activation_report` rows: ``max_abs`` (max), ``channel_max_ratio`` (max),
    ``token_kurtosis_mean`` (mean over inputs of their mean per-token kurtosis), ``massive_count``
    (max over inputs of massive tokens), ``inputs`` (names), and ``by_role``: ``{role:
    {"max_abs", "channel_max_ratio", "token_kurtosis_mean", "massive_count"}}`` of each input with
    a role (one input per role and layer)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(group_of(row["name"]), []).append(row)
    out = []
    for g, rs in groups.items():
        ratios = [r["channel_max_ratio"] for r in rs if r["channel_max_ratio"] is not None]
        kurt = [r["token_kurtosis"]["mean"] for r in rs if r["token_kurtosis"] is not None]
        out.append({
            "group": g,
            "layer": layer_of(g),
            "inputs": [r["name"] for r in rs],
            "max_abs": max(r["max_abs"] for r in rs),
            "channel_max_ratio": max(ratios) if ratios else None,
            "token_kurtosis_mean": sum(kurt) / len(kurt) if kurt else None,
            "massive_count": max(r["massive"]["count"] for r in rs),
            "by_role": {
                r["role"]: {
                    "max_abs": r["max_abs"],
                    "channel_max_ratio": r["channel_max_ratio"],
                    "token_kurtosis_mean": None if r["token_kurtosis"] is None else r["token_kurtosis"]["mean"],
                    "massive_count": r["massive"]["count"],
                }
                for r in rs if r.get("role") is not None
            },
        })
    return out


def calibration_tokens(text_file: str | os.PathLike, tokenizer, num_tokens: int) -> torch.Tensor:
    """The first ``num_tokens`` token ids (1-D LongTensor) of a text file, or all of them if fewer.

    Tokenizes a prefix of the text first (``8 * num_tokens`` characters) and the whole text only if
    that is too short. Raises FileNotFoundError / ValueError for a missing or empty file.
    """
    if num_tokens < 1:
        raise InvalidInputError(f"calibration token count must be >= 1, got {num_tokens}")
    text = read_text(text_file)
    prefix = text[: 8 * num_tokens + 64]
    ids = tokenize_text(prefix, tokenizer) if prefix.strip() else torch.empty(0, dtype=torch.long)
    if ids.numel() < num_tokens and len(prefix) < len(text):
        ids = tokenize_text(text, tokenizer)
    return ids[:num_tokens]


def capture_inputs(model: nn.Module, ids: torch.Tensor, seq_len: int = 512, progress: bool = True) -> dict[str, torch.Tensor]:
    """``{module name: X float32 [T, in]}`` of every linear layer on the token ids ``ids`` (1-D).

    ``ids`` is cut into consecutive sequences of ``seq_len`` tokens (the last may be shorter), each
    run separately from position 0. All ``T = len(ids)`` tokens are kept in order, so row ``t`` of
    ``X`` is token ``t`` (position ``t % seq_len`` of its sequence).
    """
    if ids.ndim != 1 or ids.numel() == 0:
        raise InvalidInputError(f"token ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
    if seq_len < 1:
        raise InvalidInputError(f"seq_len must be >= 1, got {seq_len}")
    batches = [chunk.reshape(1, -1) for chunk in ids.split(seq_len)]
    return DecoderAdapter(model).linear_inputs(batches, max_tokens=ids.numel(), progress=progress)
