"""Fuse rotations into the tensors of one decoder layer (or the embedding / lm_head) held as a dict.

Thin wrappers over the table-driven tensor functions of :mod:`orthoopt.adapters.writeback`
(:func:`~orthoopt.adapters.writeback.rotate_layer`, :func:`~orthoopt.adapters.writeback.layer_r2_entries`),
the same code the in-memory adapter runs, applied to a ``{safetensors key: tensor}`` dict read from a
checkpoint: each tensor is transformed in float64 and cast back to its dtype, once per rotation phase
(``R1`` first, then ``R2.i``), as the in-memory pipeline does. Sides and shapes: ``docs/conventions.md``.
"""

from __future__ import annotations

import torch

from orthoopt.adapters.writeback import layer_r2_entries, rotate_layer
from orthoopt.core import WeightBlock
from orthoopt.hadamard.signed import SignedHadamard, times
from orthoopt.streaming.layout import DecoderLayout

F64 = torch.float64


def rotate_rows(W: torch.Tensor, R1: torch.Tensor | SignedHadamard) -> torch.Tensor:
    """``W @ R1`` for an input-side weight (embedding, lm_head) ``[m, hidden]``, in float64, cast back."""
    return times(W, R1, F64).to(W.dtype)


def apply_r1(t: dict[str, torch.Tensor], layout: DecoderLayout, i: int, R1: torch.Tensor | SignedHadamard) -> None:
    """Fuse ``R1`` (float64 ``[hidden, hidden]``, or the :class:`~orthoopt.hadamard.SignedHadamard` it is) into layer ``i``'s tensors in ``t`` (replaced in the
    dict): readers ``W @ R1``, writers ``R1.T @ W`` with biases ``b @ R1`` (sides from the table)."""
    t.update(rotate_layer(layout.spec, t, layout.layer_key_prefix(i), R1, None,
                          num_heads=layout.num_heads, num_kv_heads=layout.num_kv_heads, cast_back=True))


def apply_r2(t: dict[str, torch.Tensor], layout: DecoderLayout, i: int, R2: torch.Tensor) -> None:
    """Fuse ``R2.i`` (float64 ``[head_dim, head_dim]``) into layer ``i``'s tensors in ``t``: value rows
    per kv head ``R2.T @ W_v[h]`` (bias ``b_v[h] @ R2``), o columns per query head ``W_o[:, h] @ R2``."""
    t.update(rotate_layer(layout.spec, t, layout.layer_key_prefix(i), None, R2,
                          num_heads=layout.num_heads, num_kv_heads=layout.num_kv_heads, cast_back=True))


def r2_blocks(t: dict[str, torch.Tensor], layout: DecoderLayout, i: int) -> list[WeightBlock]:
    """The ``R2.i`` blocks of layer ``i`` as ``DecoderAdapter.weight_blocks("R2.i")`` gives them: value
    rows per kv head (side "out"), then o_proj columns per query head (side "in"), views of ``t``."""
    name_prefix = f"{layout.spec.layers}.{i}"
    return [b for b, _, _ in layer_r2_entries(layout.spec, t, layout.layer_key_prefix(i), name_prefix, i,
                                              layout.num_heads, layout.num_kv_heads, layout.head_dim)]
