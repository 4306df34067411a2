"""The one uniform quantization grid: weights (RTN, GPTQ), activations, K/V and the objectives (DFRot).

A quantizer maps each row ``x`` of a ``[rows, n]`` tensor to a grid ``scale * (q - zero)`` with integer
codes ``q``; the parameters ``scale`` and ``zero`` are per row (a row is one output channel of a weight,
one group of a grouped weight, or one token of an activation). Formulas (``b`` bits, clip ratio ``c``):

* symmetric: ``scale = c * max|x| / (2^(b-1) - 1)``, ``zero = 0``, codes ``q in [-(2^(b-1)-1), 2^(b-1)-1]``
  (the grid is symmetric about 0, so ``Q(-x) = -Q(x)``);
* asymmetric: ``lo = c * min(min x, 0)``, ``hi = c * max(max x, 0)``, ``scale = (hi - lo) / (2^b - 1)``,
  ``zero = round(-lo / scale)``, codes ``q in [0, 2^b - 1]`` (0 is always exactly representable).

``fake_quantize(x) = scale * (clamp(round(x / scale) + zero, qmin, qmax) - zero)``. A row that is all
zeros gets ``scale = 1`` (any positive scale maps it to 0 exactly). Without clipping (``c = 1``, no MSE
search) every element is within ``scale / 2`` of its quantized value.

The optional MSE search (GPTQ's ``mse`` option) tries shrink ratios ``p = 1, 1 - 1/grid, ...`` down to
``1 - max_shrink`` and keeps, per row, the ``p`` minimizing ``sum |Q(x) - x|^norm``. See
docs/quantization.md.

Differentiability: ``round`` has derivative 0, so under autograd the codes are constants and the
gradient of ``fake_quantize`` flows through ``scale`` (and the clip range) only; for a loss of
``x - Q(x)`` that is the exact derivative wherever no value sits on a rounding boundary (what DFRot's
objective uses). :func:`straight_through` is the straight-through estimator instead (forward value
``Q(x)``, gradient of the identity), as in SpinQuant's training.

This module depends on torch only, so objectives use the same grid as ``orthoopt.quant`` (which
re-exports it) without importing model-side code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orthoopt.errors import InvalidInputError

MIN_BITS, MAX_BITS = 2, 8


def check_bits_or_off(bits: object, what: str) -> None:
    """Raise ValueError unless ``bits`` is 16 (quantization off) or an int in ``[MIN_BITS, MAX_BITS]``;
    ``what`` names the setting (``"weight"``, ``"activation"``, ``"KV-cache"``)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not (bits == 16 or MIN_BITS <= bits <= MAX_BITS):
        raise InvalidInputError(f"{what} bits must be 16 (off) or in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: bit width, grid type, grouping and clipping.

    bits:           2..8.
    symmetric:      symmetric grid (zero = 0) or asymmetric grid with an integer zero point.
    group_size:     ``None`` for one scale per row (per output channel of a weight); otherwise the
                    number of consecutive columns sharing a scale (must divide the row length).
    clip_ratio:     fixed shrink of the range, in (0, 1] (1 = no clipping).
    mse:            search the shrink ratio per row instead (GPTQ's ``mse`` option); the search
                    starts from ``clip_ratio``.
    mse_grid, mse_max_shrink, mse_norm: the search tries ``p = 1 - i / mse_grid`` for
                    ``i < mse_max_shrink * mse_grid`` and minimizes ``sum |Q(x) - x| ** mse_norm``.
    """

    bits: int
    symmetric: bool = True
    group_size: int | None = None
    clip_ratio: float = 1.0
    mse: bool = False
    mse_grid: int = 100
    mse_max_shrink: float = 0.8
    mse_norm: float = 2.4

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise InvalidInputError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise InvalidInputError(f"group_size must be a positive integer or None, got {self.group_size!r}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise InvalidInputError(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")
        if self.mse_grid < 1 or not 0.0 < self.mse_max_shrink < 1.0 or self.mse_norm <= 0:
            raise InvalidInputError(
                f"bad MSE search settings: grid={self.mse_grid}, max_shrink={self.mse_max_shrink}, norm={self.mse_norm}"
            )

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def _params_for_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` for ranges ``[lo, hi]`` with ``lo <= 0 <= hi`` (same shapes)."""
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    scale = (hi - lo) / (spec.qmax - spec.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / scale)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize: ``scale * (clamp(round(x / scale) + zero, qmin, qmax) - zero)``.

    ``scale`` and ``zero`` broadcast against ``x`` (e.g. ``[rows, 1]`` for ``x`` of ``[rows, n]``).
    """
    q = torch.clamp(torch.round(x / scale) + zero, spec.qmin, spec.qmax)
    return scale * (q - zero)


def find_params(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row quantization parameters of ``x`` (``[rows, n]``): ``(scale, zero)``, each ``[rows, 1]``.

    ``spec.group_size`` is ignored here: callers reshape groups into rows (see :func:`quantize_rows`).
    """
    if x.ndim != 2:
        raise InvalidInputError(f"find_params expects a 2-D [rows, n] tensor, got shape {tuple(x.shape)}")
    zeros = torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)
    lo = torch.minimum(x.amin(dim=1, keepdim=True), zeros) * spec.clip_ratio
    hi = torch.maximum(x.amax(dim=1, keepdim=True), zeros) * spec.clip_ratio
    scale, zero = _params_for_range(lo, hi, spec)
    if not spec.mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(int(spec.mse_max_shrink * spec.mse_grid)):
        p = 1.0 - i / spec.mse_grid
        s, z = _params_for_range(p * lo, p * hi, spec)
        err = (fake_quantize(x, s, z, spec) - x).abs().pow(spec.mse_norm).sum(dim=1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def quantize_rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize a ``[rows, n]`` tensor with per-row or per-group parameters (round to nearest).

    With ``spec.group_size = g`` (which must divide ``n``) each row is split into ``n / g`` groups of
    ``g`` consecutive columns, each with its own scale. Returns a tensor of the same shape and dtype.
    """
    return quantize_groups(x, spec, "quantize_rows")[0]


def quantize_groups(x: torch.Tensor, spec: QuantSpec, caller: str = "quantize_groups"):
    """``(Q, scale, zero)``: ``x`` (``[rows, n]``) fake-quantized per row or per group of
    ``spec.group_size`` consecutive columns, with the grid it used (``scale``/``zero`` of shape
    ``[rows * groups, 1]``, groups in row-major order). ``caller`` names the function in errors."""
    if x.ndim != 2:
        raise InvalidInputError(f"{caller} expects a 2-D [rows, n] tensor, got shape {tuple(x.shape)}")
    rows, n = x.shape
    g = spec.group_size or n
    if n % g:
        raise InvalidInputError(f"group_size {g} does not divide the row length {n}")
    flat = x.reshape(rows * (n // g), g)
    scale, zero = find_params(flat, spec)
    return fake_quantize(flat, scale, zero, spec).reshape(rows, n), scale, zero


def quantize_tokens(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize each row ``x[..., :]`` of an ``[..., n]`` tensor on its own grid (one scale and zero
    per token; ``spec.group_size`` must be None). Same shape and dtype; differentiable as described
    in the module docstring (gradient through the scales)."""
    if spec.group_size is not None:
        raise InvalidInputError("per-token quantization has one scale per row; group_size must be None")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise InvalidInputError(f"quantize_tokens expects an [..., n] tensor with n > 0, got shape {tuple(x.shape)}")
    return quantize_rows(x.reshape(-1, x.shape[-1]), spec).reshape(x.shape)


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` in the forward pass; under autograd (``x.requires_grad``) the gradient of the identity,
    ``x + (q - x).detach()`` (the straight-through estimator). Without autograd returns ``q`` itself."""
    if torch.is_grad_enabled() and x.requires_grad:
        return x + (q - x).detach()
    return q
