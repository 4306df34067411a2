"""GPTQ for one linear layer (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers").

A linear layer ``y = x @ W.T`` (``W``: ``[out, in]``) is quantized column by column, minimizing the
layer-output error ``||(W - Q) X^T||_F^2`` over calibration inputs ``X`` (``[tokens, in]``). Its
Hessian (for every output row) is ``H = 2 X^T X / tokens`` (``[in, in]``). After quantizing column
``j`` with error ``e_j = (w_j - q_j) / [H_F^-1]_jj``, the not-yet-quantized columns absorb it:
``w_F -= e_j * [H_F^-1]_{j, F}``, where ``F`` is the set of remaining columns. The rows
``[H_F^-1]_{j, F} / sqrt([H_F^-1]_jj)`` are exactly the rows of the upper Cholesky factor of ``H^-1``,
so one factorization serves all steps; updates are applied lazily per block of ``block_size`` columns.

Options: dampening ``H + percdamp * mean(diag H) * I``; act-order (columns in order of decreasing
``diag H``, permutation undone at the end); dead inputs (``diag H = 0``, never active) get weight 0;
grouped scales are computed when the first column of a group is reached, from the weights as updated
so far. With act-order the groups are ``group_size`` consecutive columns in processing order (the
layout the reference calls ``g_idx``); :attr:`GPTQResult.group_index` records it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orthoopt.errors import InvalidInputError
from orthoopt.quant.quantizer import QuantSpec, fake_quantize, find_params


class HessianAccumulator:
    """Running ``H = 2 X^T X / tokens`` over batches of layer inputs ``X`` (``[..., n]`` rows).

    Accumulated as a running mean, so the value does not grow with the number of tokens.
    """

    def __init__(self, n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.n = n
        self.hessian = torch.zeros(n, n, dtype=dtype, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs of shape ``[..., n]`` (every leading index is one token)."""
        if x.shape[-1] != self.n:
            raise InvalidInputError(f"HessianAccumulator of size {self.n} got inputs of width {x.shape[-1]}")
        x = x.detach().reshape(-1, self.n).to(self.hessian.dtype)
        m = x.shape[0]
        if m == 0:
            return
        self.hessian *= self.tokens / (self.tokens + m)
        self.tokens += m
        self.hessian += (2.0 / self.tokens) * (x.T @ x)


@dataclass
class GPTQResult:
    """Output of :func:`gptq_quantize`.

    weight:      fake-quantized (dequantized) weight, ``[out, in]``, the input's dtype.
    scale, zero: quantizer parameters, ``[out, groups]`` (one column when not grouped); group ``k`` in
                 processing order.
    group_index: ``[in]`` long tensor, the group of each (original) input column.
    loss:        GPTQ's estimate ``sum_j ||w_j - q_j||^2 / (2 [H_F^-1]_jj)`` of the added output error.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_index: torch.Tensor
    loss: float


def _cholesky(A: torch.Tensor, upper: bool = False) -> torch.Tensor:
    try:
        return torch.linalg.cholesky(A, upper=upper)
    except torch.linalg.LinAlgError as e:
        raise InvalidInputError(
            "GPTQ: the dampened Hessian is not positive definite; increase percdamp or use more calibration data"
        ) from e


@dataclass
class GPTQFactor:
    """What GPTQ needs of one input Hessian, from :func:`gptq_factor`: one factorization serves every linear
    that reads the same input (q/k/v, gate/up).

    U:         upper Cholesky factor of the dampened ``H^-1`` (in act-order's column order), ``[in, in]``.
    dead:      ``[in]`` bool, the inputs with ``diag H = 0`` (their weight columns are zeroed).
    perm:      ``[in]`` long, the column order (act-order's; ``arange`` without it).
    percdamp, act_order: the settings it was made with.
    """

    U: torch.Tensor
    dead: torch.Tensor
    perm: torch.Tensor
    percdamp: float
    act_order: bool


@torch.no_grad()
def gptq_factor(hessian: torch.Tensor, *, percdamp: float = 0.01, act_order: bool = False,
                dtype: torch.dtype = torch.float32) -> GPTQFactor:
    """Factor the input Hessian ``hessian`` (``[in, in]``) once for :func:`gptq_quantize`.

    Parameters
    ----------
    hessian : torch.Tensor
        ``[in, in]`` input Hessian (not modified).
    percdamp : float
        Dampening: ``H + percdamp * mean(diag H) * I``.
    act_order : bool
        Columns in order of decreasing ``diag H``.
    dtype : torch.dtype
        float64 for float64 weights, else float32 (what :func:`gptq_quantize` computes in).

    Returns
    -------
    GPTQFactor
        ``U``, the dead inputs and the column order. While it is formed at most three ``[in, in]``
        matrices are alive: ``hessian`` and two of its dampened copy, ``L``, ``H^-1`` and ``U`` (with
        act-order the permuted copy adds one for a moment).
    """
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise InvalidInputError(f"the Hessian must be square [in, in], got shape {tuple(hessian.shape)}")
    if percdamp < 0:
        raise InvalidInputError(f"percdamp must be non-negative, got {percdamp}")
    H = hessian.detach().to(dtype=dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        H = H[perm][:, perm]
    else:
        perm = torch.arange(H.shape[0], device=H.device)
    H.diagonal().add_(percdamp * torch.diag(H).mean())  # H + damp I without an [n, n] identity
    return GPTQFactor(_inverse_factor(H), dead, perm, percdamp, act_order)


def _inverse_factor(H: torch.Tensor) -> torch.Tensor:
    """``U``, the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), by the Cholesky factor ``L`` of ``H``
    and ``cholesky_inverse``. Consumes ``H``: its storage is released once ``L`` is formed (``H`` is left
    empty), so at most two ``[n, n]`` matrices are alive at a time although the caller holds ``H``."""
    L = _cholesky(H)
    H.set_()
    H_inv = torch.cholesky_inverse(L)
    del L
    return _cholesky(H_inv, upper=True)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | GPTQFactor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> GPTQResult:
    """Quantize ``weight`` (``[out, in]``) with GPTQ given the input Hessian ``hessian`` (``[in, in]``).

    Computed in float64 if ``weight`` is float64, else float32. ``spec.group_size`` must divide ``in``.
    ``hessian`` may be a :class:`GPTQFactor` of it (:func:`gptq_factor`, made with this ``percdamp`` and
    ``act_order`` and the dtype of this computation): the linears that read one input then share one
    factorization, with the same arithmetic (results equal to passing the Hessian).
    """
    if weight.ndim != 2:
        raise InvalidInputError(f"gptq_quantize expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    shape = tuple((hessian.U if isinstance(hessian, GPTQFactor) else hessian).shape)
    if shape != (cols, cols):
        raise InvalidInputError(f"Hessian of shape {shape} does not match weight with {cols} input columns")
    if block_size < 1:
        raise InvalidInputError(f"block_size must be positive, got {block_size}")
    if percdamp < 0:
        raise InvalidInputError(f"percdamp must be non-negative, got {percdamp}")
    g = spec.group_size or cols
    if cols % g:
        raise InvalidInputError(f"group_size {g} does not divide the number of input columns {cols}")

    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    if isinstance(hessian, GPTQFactor):
        made = (hessian.percdamp, hessian.act_order, hessian.U.dtype)
        if made != (percdamp, act_order, dtype):
            raise InvalidInputError(f"the GPTQFactor was made with percdamp, act_order, dtype = {made}, "
                                    f"this call has {(percdamp, act_order, dtype)}")
        factor = hessian
    else:
        factor = gptq_factor(hessian.to(W.device), percdamp=percdamp, act_order=act_order, dtype=dtype)
    U, perm = factor.U, factor.perm
    W[:, factor.dead] = 0.0
    if act_order:
        W = W[:, perm]

    ngroups = cols // g
    scales = torch.empty(rows, ngroups, dtype=dtype, device=W.device)
    zeros = torch.empty_like(scales)
    if spec.group_size is None:
        scale, zero = find_params(W, spec)
        scales[:, :1], zeros[:, :1] = scale, zero

    Q = torch.empty_like(W)
    loss = torch.zeros((), dtype=dtype, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if spec.group_size is not None and j % g == 0:
                # Current (updated) weights of the group: in-block columns from W1; columns past the
                # block from W with this block's pending updates applied (Err1 is zero from column i).
                stop = j + g
                current = W1[:, i : stop - i1]
                if stop > i2:
                    rest = W[:, i2:stop] - Err1 @ U[i1:i2, i2:stop]
                    current = torch.cat([current, rest], dim=1)
                scale, zero = find_params(current, spec)
                scales[:, j // g : j // g + 1], zeros[:, j // g : j // g + 1] = scale, zero
            w = W1[:, i]
            d = U1[i, i]
            q = fake_quantize(w.unsqueeze(1), scale, zero, spec).squeeze(1)
            Q[:, j] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        loss += 0.5 * (Err1 * Err1).sum()
        # the lazy batch update, in place: one GEMM into W's column slice, no [rows, cols - i2] temporary
        # (the same product, then subtracted: equal to W[:, i2:] -= Err1 @ U[i1:i2, i2:] here)
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)

    group_index = torch.empty(cols, dtype=torch.long, device=W.device)
    group_index[perm] = torch.arange(cols, device=W.device) // g
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return GPTQResult(Q.to(weight.dtype), scales, zeros, group_index, float(loss))
