"""Norm fusion: fold each residual pre-norm's scale into the projections that read it (from the table).

An RMSNorm computes ``n(x) = x / rms(x) * s`` with ``s = w`` (kind ``"rms"``) or ``s = 1 + w`` (Gemma's
``"rms1p"``); a linear layer reading it computes ``n(x) @ W.T = (x / rms(x)) @ (W * s).T`` (``W * s``
scales column ``j`` of ``W`` by ``s[j]``; expert tensors ``[experts, out, in]`` alike). After fusion
every pre-norm has ``s == 1`` exactly (``w = 1``, or ``w = 0`` for ``rms1p``), so it commutes with any
orthogonal ``R1``: ``(x @ R) / rms(x @ R) = (x / rms(x)) @ R`` because ``||x @ R|| = ||x||``.

Which norm feeds which readers is the table's (:data:`orthoopt.adapters.arch_table.ARCHS`, ``Norm.readers``);
the final norm feeds ``lm_head``. Post-norms (OLMo-2, Gemma 2/3: on branch outputs) have no reader and
are left as they are, as are q/k norms. :func:`fold_layer` is the tensor-level step shared with the
streamed path (:mod:`orthoopt.streaming.fused`).
"""

from __future__ import annotations

import torch
from torch import nn

from orthoopt.adapters.archs import ArchSpec, DecoderModules, effective_scale, identity_weight
from orthoopt.adapters.writeback import layer_params
from orthoopt.core.rowwise import by_row_blocks


def unfused_norms(m: DecoderModules) -> list[str]:
    """Names of residual pre-norms (and the final norm) whose effective scale is not exactly all ones."""
    kinds = {n: k for n, (_, k) in m.all_norms().items()}
    return [name for name, norm in m.residual_norms().items()
            if not bool((effective_scale(norm.weight, kinds[name]) == 1).all())]


def fold_scale(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W * w``: an RMSNorm scale ``w`` (``[in]``) folded into a reader's weight ``W`` (``[out, in]``,
    or ``[..., in]``; column ``j`` scaled by ``w[j]``), formed in float64 and cast back to ``W``'s dtype.

    Rows are done in blocks (:func:`orthoopt.core.rowwise.by_row_blocks`: the same values as the
    whole-tensor product, each element one float64 product rounded once, with no float64 copy of ``W``). The tensor-level step
    of :func:`fuse_norms`, shared with the streamed path (:mod:`orthoopt.streaming`), which folds
    weights read from disk the same way.
    """
    s = scale.detach().to(torch.float64)[None, :]
    return by_row_blocks(weight.detach(), lambda rows: rows.to(torch.float64) * s)


def fold_layer(spec: ArchSpec, t: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The norm-fused tensors of one layer: ``{key: tensor}`` (in each tensor's dtype) for every key
    that changes. ``t`` maps ``f"{prefix}.{path}.{param}"`` to the layer's tensors (norm weights and
    projection weights; absent readers are skipped). Each pre-norm whose effective scale is not all
    ones is folded into its readers (:func:`fold_scale`) and set to its identity weight. ``t`` is not
    modified."""
    out: dict[str, torch.Tensor] = {}
    for n in spec.pre_norms:
        nk = f"{prefix}.{n.path}.weight"
        w = t[nk]
        s = effective_scale(w, n.kind)
        if bool((s == 1).all()):
            continue
        for role in n.readers:
            pr = next((p for p in spec.projs if p.role == role), None)
            rk = None if pr is None else f"{prefix}.{pr.path}.{pr.param}"
            if rk is not None and rk in t:
                out[rk] = fold_scale(t[rk], s)
        out[nk] = identity_weight(w, n.kind)
    return out


@torch.no_grad()
def untie_lm_head(model: nn.Module, m: DecoderModules) -> None:
    """Give ``lm_head`` its own copy of the (tied) embedding and set ``tie_word_embeddings=False``.

    Updates ``m.lm_head`` in place; a no-op when already untied.
    """
    if not m.tied:
        return
    m.lm_head.weight = nn.Parameter(m.embed.weight.detach().clone(), requires_grad=m.embed.weight.requires_grad)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False


@torch.no_grad()
def fuse_norms(model: nn.Module, m: DecoderModules) -> None:
    """Fold every residual pre-norm's scale into its readers and set it to the identity (in place).

    Output-preserving up to the rounding of the parameter dtype (products are formed in float64).
    Idempotent: a norm whose scale is already all ones is left alone. If ``lm_head`` is tied to the
    embedding and the final norm is not the identity, ``lm_head`` is untied first (see
    :func:`untie_lm_head`), since after fusion it differs from the embedding.
    """
    for L in m.layers:
        t = layer_params(m, L)
        for n in m.spec.pre_norms:
            t[f"{L.names[n.role]}.weight"] = L.norms[n.role].weight
        for k, v in fold_layer(m.spec, {k: p.detach() for k, p in t.items()}, L.prefix).items():
            t[k].data.copy_(v)
    kind = m.spec.final_norm_kind
    s = effective_scale(m.final_norm.weight, kind)
    if not bool((s == 1).all()):
        untie_lm_head(model, m)
        m.lm_head.weight.data.copy_(fold_scale(m.lm_head.weight, s))
        m.final_norm.weight.data.copy_(identity_weight(m.final_norm.weight, kind))
