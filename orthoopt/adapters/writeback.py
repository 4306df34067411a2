"""Weight blocks of a decoder and the write-back of rotations into its weights, from the table.

Rotation names and sides follow ``docs/conventions.md``; which weight gets what comes from the
architecture table (:data:`orthoopt.adapters.arch_table.ARCHS`), never from a list here:

* ``R1`` ``[hidden, hidden]`` (residual stream): side "in" (``W @ R1``) for the embedding, ``lm_head``
  and every projection that reads the residual (q, k, v, qkv, gate, up, gate_up, routers, experts'
  gate/up); side "out" (``R1.T @ W``, bias ``b @ R1``) for those that write it (o_proj, down_proj,
  experts' down). Expert tensors ``[experts, out, in]`` are rotated per expert.
* ``R2.{i}`` ``[head_dim, head_dim]`` (value/output head space of layer ``i``, one matrix shared by
  all heads, so grouped-query attention stays consistent): side "out" for the rows of each kv head
  of the value rows (``spec.v_rows``: v_proj, or the v part of Phi-3's qkv_proj; bias per head
  ``b_v[h] @ R2``), side "in" for the columns of each query head of o_proj. q/k (and q/k norms) are
  never touched by R2, since RoPE and the q/k norms act on them.

The tensor-level functions (:func:`rotate_layer`, :func:`layer_r1_entries`, :func:`layer_r2_entries`)
work on a ``{key: tensor}`` mapping with keys ``f"{prefix}.{path}.{param}"``, so the in-memory adapter
(keys = parameter names relative to the decoder) and the streamed path (keys = safetensors names)
share them. All functions require fused norms (see :mod:`orthoopt.adapters.fusion`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from orthoopt.adapters.archs import ArchSpec, DecoderModules, UnsupportedModelError, part_rows, r1_refusal
from orthoopt.core import WeightBlock
from orthoopt.core.tolerance import check_orthogonal, orthogonality_tolerance  # noqa: F401  (the one policy, re-exported)
from orthoopt.errors import InvalidInputError
from orthoopt.hadamard.signed import SignedHadamard, fast_rotation, t_times, times

F64 = torch.float64

Entry = tuple[WeightBlock, "str | None", "slice | None"]


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
                raise InvalidInputError(f"unknown rotation {k!r}; this model has R1, R2 and R2.0 .. R2.{len(m.layers) - 1}")
            if k not in out:
                out.append(k)
    return out


def check_r1_exact(m: DecoderModules) -> None:
    """Raise :class:`UnsupportedModelError` with the reason when ``R1`` cannot be fused exactly
    (a post-norm with a non-uniform scale: :func:`orthoopt.adapters.archs.r1_refusal`)."""
    reason = r1_refusal(m.post_norm_scales())
    if reason:
        raise UnsupportedModelError(f"model_type {m.spec.model_type!r}: {reason}")


def _key(prefix: str, path: str, param: str) -> str:
    return f"{prefix}.{path}.{param}"


def layer_r1_entries(spec: ArchSpec, t: Mapping[str, torch.Tensor], key_prefix: str, name_prefix: str) -> list[Entry]:
    """``(block, input module name, None)`` of the ``R1`` blocks of one layer, in table order.

    ``t`` maps ``f"{key_prefix}.{path}.{param}"`` to the layer's weights (roles absent from ``t`` are
    skipped: optional roles). Blocks are views of ``t``'s tensors; block names are module names
    ``f"{name_prefix}.{path}"`` (expert tensors: one block per expert, ``...experts.down_proj.{e}``).
    The input module is the block's module for side-"in" blocks and linear layers; None for the
    side-"out" expert tensors (their input is routed per expert, not captured).
    """
    out: list[Entry] = []
    for pr in spec.projs:
        k = _key(key_prefix, pr.path, pr.param)
        if k not in t:
            continue
        W, name = t[k], f"{name_prefix}.{pr.path}"
        if pr.experts:
            source = name if pr.side == "in" else None
            out += [(WeightBlock(W[e], "R1", pr.side, f"{name}.{pr.param}.{e}"), source, None) for e in range(W.shape[0])]
        else:
            out.append((WeightBlock(W, "R1", pr.side, name), name, None))
    return out


def layer_r2_entries(spec: ArchSpec, t: Mapping[str, torch.Tensor], key_prefix: str, name_prefix: str, index: int,
                     num_heads: int, num_kv_heads: int, head_dim: int) -> list[Entry]:
    """``(block, input module name, column slice)`` of ``R2.{index}``: the value rows per kv head (side
    "out"), then o_proj's columns per query head (side "in", with the head's input columns)."""
    vrole, vpart = spec.v_rows
    vp, op = spec.proj(vrole), spec.proj(spec.o_role)
    Wv, Wo = t[_key(key_prefix, vp.path, vp.param)], t[_key(key_prefix, op.path, op.param)]
    rows = part_rows(spec, vrole, Wv.shape[0], num_heads, num_kv_heads, head_dim)[vpart or vrole]
    vname, oname, d, r = f"{name_prefix}.{vp.path}", f"{name_prefix}.{op.path}", head_dim, f"R2.{index}"
    label = vname if vpart is None else f"{vname}.{vpart}"
    out: list[Entry] = []
    for h in range(num_kv_heads):
        a = rows.start + h * d
        out.append((WeightBlock(Wv[a:a + d, :], r, "out", f"{label}.head{h}"), vname, None))
    for h in range(num_heads):
        s = slice(h * d, (h + 1) * d)
        out.append((WeightBlock(Wo[:, s], r, "in", f"{oname}.head{h}"), oname, s))
    return out


def layer_params(m: DecoderModules, L) -> dict[str, torch.Tensor]:
    """``{parameter name relative to the decoder: parameter}`` of layer ``L``'s projections (weights and
    biases), the mapping the tensor-level functions take for the in-memory model (prefix ``L.prefix``)."""
    out: dict[str, torch.Tensor] = {}
    for role, mod in L.projs.items():
        pr = m.spec.proj(role)
        out[L.param_name(m.spec, role)] = getattr(mod, pr.param)
        b = L.bias(m.spec, role)
        if b is not None:
            out[L.param_name(m.spec, role, pr.bias_param)] = b
    return out


def block_entries(m: DecoderModules, rotations: Iterable[str] = ("R1", "R2")) -> list[Entry]:
    """``(block, input module, input column slice)`` for every block of the selected rotations.

    The block weights are detached views of the parameters (no copy). The input module is the
    module whose input activations pair with the block (None for the embedding and the experts'
    down tensors); the slice selects the block's columns of that input (the head of an o_proj block),
    None for all. Order: ``R1`` blocks in forward order, then ``R2.0``, ``R2.1``, ...
    Raises :class:`UnsupportedModelError` when ``R1`` is selected but cannot be fused exactly.
    """
    names = _select(m, rotations)
    out: list[Entry] = []
    spec = m.spec
    if "R1" in names:
        check_r1_exact(m)
        out.append((WeightBlock(m.embed.weight.detach(), "R1", "in", m.names["embed"]), None, None))
        for L in m.layers:
            t = {k: v.detach() for k, v in layer_params(m, L).items()}
            out += layer_r1_entries(spec, t, L.prefix, L.prefix)
        if not m.tied:  # a tied lm_head is the embedding block
            out.append((WeightBlock(m.lm_head.weight.detach(), "R1", "in", m.names["lm_head"]), m.names["lm_head"], None))
    for L in m.layers:
        r = f"R2.{L.index}"
        if r not in names:
            continue
        t = {k: v.detach() for k, v in layer_params(m, L).items()}
        out += layer_r2_entries(spec, t, L.prefix, L.prefix, L.index, m.num_heads, m.num_kv_heads, m.head_dim)
    return out


def validate_rotations(m: DecoderModules, rotations: Mapping[str, torch.Tensor], tol: float | None = None) -> None:
    """Raise ValueError naming the first bad rotation: unknown name, wrong shape, non-finite, or
    ``||R.T @ R - I||_F`` (in float64) above ``tol`` (default :func:`orthogonality_tolerance`);
    :class:`UnsupportedModelError` when ``R1`` is given but cannot be fused exactly."""
    dims = rotation_dims(m)
    if "R1" in rotations:
        check_r1_exact(m)
    for name, R in rotations.items():
        if name not in dims:
            raise InvalidInputError(f"unknown rotation {name!r}; this model has R1 and R2.0 .. R2.{len(m.layers) - 1}")
        if not isinstance(R, torch.Tensor) or not R.is_floating_point():
            raise InvalidInputError(f"rotation {name!r} must be a floating-point tensor, got {type(R).__name__}")
        n = dims[name]
        if tuple(R.shape) != (n, n):
            raise InvalidInputError(f"rotation {name!r} has shape {tuple(R.shape)}, expected ({n}, {n})")
        check_orthogonal(R, name, tol)


def blockdiag_left(W: torch.Tensor, R: torch.Tensor, heads: int) -> torch.Tensor:
    """``blockdiag(R, ..., R).T @ W`` for ``W`` ``[heads*d, k]``: each head's rows ``R.T @ W_h``."""
    d = R.shape[0]
    return torch.einsum("ji,hjk->hik", R, W.reshape(heads, d, -1)).reshape(W.shape)


def blockdiag_right(W: torch.Tensor, R: torch.Tensor, heads: int) -> torch.Tensor:
    """``W @ blockdiag(R, ..., R)`` for ``W`` ``[k, heads*d]``: each head's columns ``W_h @ R``."""
    d = R.shape[0]
    return (W.reshape(W.shape[0], heads, d) @ R).reshape(W.shape)


def rotate_layer(spec: ArchSpec, t: Mapping[str, torch.Tensor], prefix: str,
                 R1: torch.Tensor | SignedHadamard | None = None,
                 R2: torch.Tensor | None = None, *, num_heads: int, num_kv_heads: int,
                 dtype: torch.dtype | None = F64, cast_back: bool = False) -> dict[str, torch.Tensor]:
    """The rotated tensors of one layer: ``{key: float64 tensor}`` for every key of ``t`` that changes.

    ``t`` maps ``f"{prefix}.{path}.{param}"`` (and ``.bias``) to the layer's projection tensors (absent
    roles are skipped); ``R1`` ``[hidden, hidden]`` and ``R2`` ``[head_dim, head_dim]`` are float64
    on the tensors' device, or None; ``R1`` may also be a :class:`~orthoopt.hadamard.SignedHadamard`
    (the same products without the dense matrix, :func:`~orthoopt.hadamard.fast_rotation`). Each weight is transformed once in ``dtype`` (float64; None: the
    tensors' own dtype, as SpinQuant's differentiable path uses it), and the caller casts it back:
    side "in" ``W @ R1``; side "out" ``R1.T @ W`` with bias ``b @ R1``; then the value rows
    ``blockdiag(R2).T @ W_v`` (bias per head ``b_v[h] @ R2``) and o_proj's columns ``W_o @ blockdiag(R2)``.
    With ``cast_back=True`` each tensor is instead returned in its own dtype in ``t``, cast as soon as its
    products are done, so one weight's float64 copy is alive at a time rather than the layer's (the
    same values as casting the float64 results afterwards). ``t`` is not modified.
    """
    out: dict[str, torch.Tensor] = {}
    vrole, vpart = spec.v_rows
    for pr in spec.projs:
        wk = _key(prefix, pr.path, pr.param)
        if wk not in t:
            continue
        bk = _key(prefix, pr.path, pr.bias_param) if pr.bias_param else None
        W = t[wk]  # cast to dtype by the R1 product (block by block for a SignedHadamard), else below
        r2 = R2 is not None and pr.role in (vrole, spec.o_role)
        if R1 is None and not r2:
            continue  # nothing to do: no cast either
        b = None if bk is None or bk not in t else (t[bk] if dtype is None else t[bk].to(dtype))
        w_changed = b_changed = False
        if R1 is not None:
            W = times(W, R1, dtype) if pr.side == "in" else t_times(R1, W, dtype)
            w_changed = True
            if pr.side == "out" and b is not None:
                b, b_changed = times(b, R1), True
        W = W if dtype is None else W.to(dtype)  # the same tensor when the product above made it
        if R2 is not None and pr.role == vrole:
            d = R2.shape[0]
            rows = part_rows(spec, vrole, W.shape[0], num_heads, num_kv_heads, d)[vpart or vrole]
            heads = (rows.stop - rows.start) // d
            if rows.start == 0 and rows.stop == W.shape[0]:
                W = blockdiag_left(W, R2, heads)
            else:
                W = torch.cat([W[:rows.start], blockdiag_left(W[rows], R2, heads), W[rows.stop:]])
            w_changed = True
            if b is not None:
                bv = blockdiag_left(b[rows][:, None], R2, heads)[:, 0]
                b = bv if bv.shape[0] == b.shape[0] else torch.cat([b[:rows.start], bv, b[rows.stop:]])
                b_changed = True
        if R2 is not None and pr.role == spec.o_role:
            W = blockdiag_right(W, R2, W.shape[-1] // R2.shape[0])
            w_changed = True
        if w_changed:
            out[wk] = W.to(t[wk].dtype) if cast_back else W
        if b_changed:
            out[bk] = b.to(t[bk].dtype) if cast_back else b
    return out


@torch.no_grad()
def apply_rotations(m: DecoderModules, rotations: Mapping[str, torch.Tensor]) -> None:
    """Fuse the given rotations into the weights in place (missing names act as the identity).

    Each parameter is transformed once in float64 and cast back to its dtype: embedding and lm_head
    ``E @ R1``; every layer by :func:`rotate_layer` (the table's sides). An ``R1`` that is a random
    Hadamard matrix ``D H / sqrt(n)`` is applied by the fast transform (:func:`~orthoopt.hadamard.fast_rotation`;
    equal to the dense products to float64 rounding). Call :func:`validate_rotations` first; this
    function does not validate.
    """
    def f64(R):
        return None if R is None else R.detach().to(F64)

    def put(p: torch.Tensor, value: torch.Tensor) -> None:
        p.data.copy_(value.to(p.dtype))

    R1 = rotations.get("R1")
    R1 = None if R1 is None else fast_rotation(f64(R1).to(m.embed.weight.device))
    if R1 is not None:
        put(m.embed.weight, times(m.embed.weight.detach(), R1, F64))
        if not m.tied:
            put(m.lm_head.weight, times(m.lm_head.weight.detach(), R1.to(m.lm_head.weight.device), F64))
    for L in m.layers:
        params = layer_params(m, L)
        dev = next(iter(params.values())).device
        r1 = None if R1 is None else R1.to(dev)
        R2 = rotations.get(f"R2.{L.index}")
        r2 = None if R2 is None else f64(R2).to(dev)
        if r1 is None and r2 is None:
            continue
        new = rotate_layer(m.spec, params, L.prefix, r1, r2, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                           cast_back=True)
        for k, v in new.items():
            put(params[k], v)
