"""Weight blocks of a decoder and the write-back of rotations into its weights.

Rotation names and sides follow ``docs/conventions.md``:

* ``R1`` ``[hidden, hidden]`` (residual stream): side "in" (``W @ R1``) for the embedding and every
  layer that reads the residual (q, k, v, gate, up, lm_head); side "out" (``R1.T @ W``, bias
  ``b @ R1``) for the layers that write it (o_proj, down_proj).
* ``R2.{i}`` ``[head_dim, head_dim]`` (value/output head space of layer ``i``, one matrix shared by
  all heads, so grouped-query attention stays consistent): side "out" for the rows of each kv head of
  v_proj (``W_v[h*d:(h+1)*d, :]``, bias ``b_v[h*d:(h+1)*d] @ R2``), side "in" for the columns of each
  query head of o_proj (``W_o[:, h*d:(h+1)*d]``). q/k (and Qwen3's q_norm/k_norm) are never touched
  by R2, since RoPE and the q/k norms act on them.

All functions require fused norms (see :mod:`orthoopt.adapters.fusion`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from orthoopt.adapters.archs import DecoderModules
from orthoopt.core import WeightBlock
from orthoopt.core.tolerance import orthogonality_tolerance  # noqa: F401  (the one policy, re-exported)


def rotation_dims(m: DecoderModules) -> dict[str, int]:
    """``{"R1": hidden, "R2.0": head_dim, ..., "R2.{L-1}": head_dim}``."""
    return {"R1": m.hidden, **{f"R2.{L.index}": m.head_dim for L in m.layers}}


def _select(m: DecoderModules, rotations: Iterable[str]) -> list[str]:
    """Expand ``("R1", "R2")`` (``"R2"`` = every ``R2.i``) into rotation names, checked."""
    dims = rotation_dims(m)
    if isinstance(rotations, str):
        rotations = (rotations,)
    out: list[str] = []
    for r in rotations:
        names = [k for k in dims if k.startswith("R2.")] if r == "R2" else [r]
        for k in names:
            if k not in dims:
                raise ValueError(f"unknown rotation {k!r}; this model has R1, R2 and R2.0 .. R2.{len(m.layers) - 1}")
            if k not in out:
                out.append(k)
    return out


def block_entries(m: DecoderModules, rotations: Iterable[str] = ("R1", "R2")) -> list[tuple[WeightBlock, str | None, slice | None]]:
    """``(block, input module, input column slice)`` for every block of the selected rotations.

    The block weights are detached views of the parameters (no copy). The input module is the
    ``nn.Linear`` whose input activations pair with the block (None for the embedding); the slice
    selects the block's columns of that input (the head of an o_proj block), None for all.
    Order: ``R1`` blocks in forward order, then ``R2.0``, ``R2.1``, ...
    """
    names = _select(m, rotations)
    out: list[tuple[WeightBlock, str | None, slice | None]] = []
    if "R1" in names:
        out.append((WeightBlock(m.embed.weight.detach(), "R1", "in", m.names["embed"]), None, None))
        for L in m.layers:
            for role in ("q", "k", "v", "o", "gate", "up", "down"):
                side = "out" if role in ("o", "down") else "in"
                W = getattr(L, role).weight.detach()
                out.append((WeightBlock(W, "R1", side, L.names[role]), L.names[role], None))
        if not m.tied:  # a tied lm_head is the embedding block
            out.append((WeightBlock(m.lm_head.weight.detach(), "R1", "in", m.names["lm_head"]), m.names["lm_head"], None))
    d = m.head_dim
    for L in m.layers:
        r = f"R2.{L.index}"
        if r not in names:
            continue
        Wv, Wo = L.v.weight.detach(), L.o.weight.detach()
        for h in range(m.num_kv_heads):
            out.append((WeightBlock(Wv[h * d:(h + 1) * d, :], r, "out", f"{L.names['v']}.head{h}"), L.names["v"], None))
        for h in range(m.num_heads):
            s = slice(h * d, (h + 1) * d)
            out.append((WeightBlock(Wo[:, s], r, "in", f"{L.names['o']}.head{h}"), L.names["o"], s))
    return out


def validate_rotations(m: DecoderModules, rotations: Mapping[str, torch.Tensor], tol: float | None = None) -> None:
    """Raise ValueError naming the first bad rotation: unknown name, wrong shape, non-finite, or
    ``||R.T @ R - I||_F`` (in float64) above ``tol`` (default :func:`orthogonality_tolerance`)."""
    dims = rotation_dims(m)
    for name, R in rotations.items():
        if name not in dims:
            raise ValueError(f"unknown rotation {name!r}; this model has R1 and R2.0 .. R2.{len(m.layers) - 1}")
        if not isinstance(R, torch.Tensor) or not R.is_floating_point():
            raise ValueError(f"rotation {name!r} must be a floating-point tensor, got {type(R).__name__}")
        n = dims[name]
        if tuple(R.shape) != (n, n):
            raise ValueError(f"rotation {name!r} has shape {tuple(R.shape)}, expected ({n}, {n})")
        if not bool(torch.isfinite(R).all()):
            raise ValueError(f"rotation {name!r} has NaN or inf entries")
        R64 = R.detach().to(torch.float64)
        err = torch.linalg.matrix_norm(R64.T @ R64 - torch.eye(n, dtype=torch.float64, device=R.device)).item()
        limit = orthogonality_tolerance(n, R.dtype) if tol is None else tol
        if not err <= limit:
            raise ValueError(f"rotation {name!r} is not orthogonal: ||R.T R - I||_F = {err:.3e} > tolerance {limit:.3e}")


def check_finite(model: nn.Module) -> None:
    """Raise ValueError naming the first parameter with NaN or inf entries."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"parameter {name!r} has NaN or inf entries")


def blockdiag_left(W: torch.Tensor, R: torch.Tensor, heads: int) -> torch.Tensor:
    """``blockdiag(R, ..., R).T @ W`` for ``W`` ``[heads*d, k]``: each head's rows ``R.T @ W_h``."""
    d = R.shape[0]
    return torch.einsum("ji,hjk->hik", R, W.reshape(heads, d, -1)).reshape(W.shape)


def blockdiag_right(W: torch.Tensor, R: torch.Tensor, heads: int) -> torch.Tensor:
    """``W @ blockdiag(R, ..., R)`` for ``W`` ``[k, heads*d]``: each head's columns ``W_h @ R``."""
    d = R.shape[0]
    return (W.reshape(W.shape[0], heads, d) @ R).reshape(W.shape)


@torch.no_grad()
def apply_rotations(m: DecoderModules, rotations: Mapping[str, torch.Tensor]) -> None:
    """Fuse the given rotations into the weights in place (missing names act as the identity).

    Each parameter is transformed once in float64 and cast back to its dtype:
    embedding ``E @ R1``; q, k, gate, up, lm_head ``W @ R1``; v ``blockdiag(R2).T @ W @ R1`` with
    bias ``b @ blockdiag(R2)``; o ``R1.T @ W @ blockdiag(R2)``; down ``R1.T @ W``; o/down biases
    ``b @ R1``. Call :func:`validate_rotations` first; this function does not validate.
    """
    def f64(R):
        return None if R is None else R.detach().to(torch.float64)

    def put(p: torch.Tensor, value: torch.Tensor) -> None:
        p.data.copy_(value.to(p.dtype))

    R1 = rotations.get("R1")
    R1 = None if R1 is None else f64(R1).to(m.embed.weight.device)
    if R1 is not None:
        put(m.embed.weight, m.embed.weight.to(torch.float64) @ R1)
        if not m.tied:
            put(m.lm_head.weight, m.lm_head.weight.to(torch.float64) @ R1.to(m.lm_head.weight.device))
    for L in m.layers:
        dev = L.q.weight.device
        r1 = None if R1 is None else R1.to(dev)
        R2 = rotations.get(f"R2.{L.index}")
        r2 = None if R2 is None else f64(R2).to(dev)
        if r1 is not None:
            for lin in (L.q, L.k, L.gate, L.up):
                put(lin.weight, lin.weight.to(torch.float64) @ r1)
            put(L.down.weight, r1.T @ L.down.weight.to(torch.float64))
            if L.down.bias is not None:
                put(L.down.bias, L.down.bias.to(torch.float64) @ r1)
        # v: rows per kv head by R2 (output side), columns by R1 (input side).
        Wv = L.v.weight.to(torch.float64)
        Wv = Wv @ r1 if r1 is not None else Wv
        if r2 is not None:
            Wv = blockdiag_left(Wv, r2, L.v.out_features // r2.shape[0])
            if L.v.bias is not None:
                put(L.v.bias, blockdiag_left(L.v.bias.to(torch.float64)[:, None], r2, L.v.out_features // r2.shape[0])[:, 0])
        if r1 is not None or r2 is not None:
            put(L.v.weight, Wv)
        # o: columns per query head by R2 (input side), rows by R1 (output side).
        Wo = L.o.weight.to(torch.float64)
        Wo = r1.T @ Wo if r1 is not None else Wo
        if r2 is not None:
            Wo = blockdiag_right(Wo, r2, L.o.in_features // r2.shape[0])
        if r1 is not None or r2 is not None:
            put(L.o.weight, Wo)
        if r1 is not None and L.o.bias is not None:
            put(L.o.bias, L.o.bias.to(torch.float64) @ r1)
