"""Fuse rotations into the tensors of one decoder layer (or the embedding / lm_head) held as a dict.

The same arithmetic as :func:`orthoopt.adapters.writeback.apply_rotations`, applied to a ``{key:
tensor}`` dict read from a checkpoint instead of model parameters: each tensor is transformed in
float64 and cast back to its dtype, once per rotation phase (``R1`` first, then ``R2.i``), as the
in-memory pipeline does. Sides and shapes: ``docs/conventions.md``; the table of write-backs:
``docs/adapters.md``.
"""

from __future__ import annotations

import torch

from orthoopt.adapters.writeback import blockdiag_left, blockdiag_right
from orthoopt.core import WeightBlock
from orthoopt.streaming.layout import DecoderLayout

F64 = torch.float64


def _put(t: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    t[key] = value.to(t[key].dtype)


def rotate_rows(W: torch.Tensor, R1: torch.Tensor) -> torch.Tensor:
    """``W @ R1`` for an input-side weight (embedding, lm_head) ``[m, hidden]``, in float64, cast back."""
    return (W.to(F64) @ R1).to(W.dtype)


def apply_r1(t: dict[str, torch.Tensor], layout: DecoderLayout, i: int, R1: torch.Tensor) -> None:
    """Fuse ``R1`` (float64 ``[hidden, hidden]``) into layer ``i``'s tensors in ``t`` (replaced in the dict):
    q, k, v, gate, up ``W @ R1``; o, down ``R1.T @ W`` with biases ``b @ R1``."""
    names, key = layout.layer_modules(i), layout.key
    for role in ("q", "k", "gate", "up", "v"):
        k = key(names[role])
        _put(t, k, t[k].to(F64) @ R1)
    for role in ("down", "o"):
        k = key(names[role])
        _put(t, k, R1.T @ t[k].to(F64))
        b = key(names[role], "bias")
        if b in t:
            _put(t, b, t[b].to(F64) @ R1)


def apply_r2(t: dict[str, torch.Tensor], layout: DecoderLayout, i: int, R2: torch.Tensor) -> None:
    """Fuse ``R2.i`` (float64 ``[head_dim, head_dim]``) into layer ``i``'s tensors in ``t``: v rows per kv
    head ``R2.T @ W_v[h]`` (bias ``b_v[h] @ R2``), o columns per query head ``W_o[:, h] @ R2``."""
    names, key, d = layout.layer_modules(i), layout.key, R2.shape[0]
    v, vb, o = key(names["v"]), key(names["v"], "bias"), key(names["o"])
    kv_heads, heads = t[v].shape[0] // d, t[o].shape[1] // d
    _put(t, v, blockdiag_left(t[v].to(F64), R2, kv_heads))
    if vb in t:
        _put(t, vb, blockdiag_left(t[vb].to(F64)[:, None], R2, kv_heads)[:, 0])
    _put(t, o, blockdiag_right(t[o].to(F64), R2, heads))


def r2_blocks(t: dict[str, torch.Tensor], layout: DecoderLayout, i: int) -> list[WeightBlock]:
    """The ``R2.i`` blocks of layer ``i`` as ``DecoderAdapter.weight_blocks("R2.i")`` gives them: v_proj
    rows per kv head (side "out"), then o_proj columns per query head (side "in"), views of ``t``."""
    names, key, d = layout.layer_modules(i), layout.key, layout.head_dim
    Wv, Wo, r = t[key(names["v"])], t[key(names["o"])], f"R2.{i}"
    out = [WeightBlock(Wv[h * d:(h + 1) * d, :], r, "out", f"{names['v']}.head{h}") for h in range(layout.num_kv_heads)]
    out += [WeightBlock(Wo[:, h * d:(h + 1) * d], r, "in", f"{names['o']}.head{h}") for h in range(layout.num_heads)]
    return out
