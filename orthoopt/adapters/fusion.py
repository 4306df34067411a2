"""RMSNorm fusion: fold each residual RMSNorm's scale into the linear layers that read it.

An RMSNorm computes ``n(x) = x / rms(x) * w``; a linear layer reading it computes
``n(x) @ W.T = (x / rms(x)) @ (W * w).T`` (``W * w`` scales column ``j`` of ``W`` by ``w[j]``).
After fusion every residual norm has ``w == 1`` exactly, so it commutes with any orthogonal ``R1``:
``(x @ R) / rms(x @ R) = (x / rms(x)) @ R`` because ``||x @ R|| = ||x||``.

Fused pairs: ``input_layernorm -> q, k, v``; ``post_attention_layernorm -> gate, up``;
final ``norm -> lm_head``. Qwen3's per-head ``q_norm``/``k_norm`` are not on the residual stream and
stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from orthoopt.adapters.archs import DecoderModules


def unfused_norms(m: DecoderModules) -> list[str]:
    """Names of residual RMSNorms whose scale is not exactly all ones."""
    return [name for name, norm in m.residual_norms().items() if not bool((norm.weight == 1).all())]


def fold_scale(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W * w``: an RMSNorm scale ``w`` (``[in]``) folded into a reader's weight ``W`` (``[out, in]``,
    column ``j`` scaled by ``w[j]``), formed in float64 and cast back to ``W``'s dtype.

    The tensor-level step of :func:`fuse_norms`, shared with the streamed path
    (:mod:`orthoopt.streaming`), which folds weights read from disk the same way.
    """
    return (weight.detach().to(torch.float64) * scale.detach().to(torch.float64)[None, :]).to(weight.dtype)


@torch.no_grad()
def _fold(norm: nn.Module, readers: list[nn.Linear]) -> None:
    w = norm.weight.detach()
    if bool((w == 1).all()):
        return
    for lin in readers:
        lin.weight.data.copy_(fold_scale(lin.weight, w))
    norm.weight.data.fill_(1.0)


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
    """Fold every residual RMSNorm scale into its readers and set the scales to one (in place).

    Output-preserving up to the rounding of the parameter dtype (products are formed in float64).
    Idempotent: a norm whose scale is already all ones is left alone. If ``lm_head`` is tied to the
    embedding and the final norm is not all ones, ``lm_head`` is untied first (see
    :func:`untie_lm_head`), since after fusion it differs from the embedding.
    """
    for L in m.layers:
        _fold(L.input_norm, [L.q, L.k, L.v])
        _fold(L.post_attn_norm, [L.gate, L.up])
    if not bool((m.final_norm.weight == 1).all()):
        untie_lm_head(model, m)
    _fold(m.final_norm, [m.lm_head])
