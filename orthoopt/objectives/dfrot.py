"""DFRot's objective: weighted per-token quantization error of rotated activations.

Xiang & Zhang, "DFRot: Achieving Outlier-Free and Massive Activation-Free for Rotated LLMs with
Refined Rotation" (COLM 2025, openreview.net/forum?id=WzGypILLDb). DFRot observes that tokens with
massive activations are rare but decide accuracy, so it up-weights them, and refines the rotation
by alternating (1) quantizing the rotated activations with the rotation fixed and (2) an orthogonal
Procrustes step toward those quantized targets. For activation rows ``x_t`` rotated as ``y_t = x_t @ R``
(``docs/conventions.md``)::

    L(R) = sum_rotations sum_t w~_t ||y_t - Q(y_t)||^2          w~_t = w_t / sum_s w_s

``Q`` is per-token round-to-nearest fake quantization on the library's one grid
(:func:`orthoopt.core.grid.quantize_tokens`, the grid of ``orthoopt.quant``'s activation quantizer:
symmetric or asymmetric, ``bits`` bits, no clipping). Its
autograd gradient is the exact derivative of this piecewise-smooth loss almost everywhere: the
integer codes are locally constant and the gradient flows through each token's scale. (A
straight-through estimate, ``d round(u)/du = 1``, would cancel the direct term of ``y - Q(y)`` and is
not the derivative of this loss.)

Weights: ``w_t = massive_weight`` for massive tokens, else 1, unless ``token_weights`` are given.
A token is massive here (:func:`peak_share_tokens`; not the same rule as the diagnostics'
``orthoopt.diagnostics.massive_tokens``, which compares a token's peak with the median magnitude)
when its largest entry carries a large share of its norm,
``max_j |x_tj| / ||x_t||_2 > massive_threshold`` (default 0.5: over a quarter of its energy in one
channel). This ratio is unchanged by per-token scaling, so the same threshold works before or after
RMSNorm, where massive-activation tokens differ from ordinary ones by concentration rather than
size. The default suits LLM widths: a Gaussian token's peak share is about ``sqrt(2 ln n / n)``
(0.07 at n = 4096, 0.5 at n = 16); for small ``n`` raise it or pass ``token_weights``. (DFRot's
code selects these tokens by a model-specific absolute threshold on their unrotated 4-bit
quantization error, which is small exactly for such concentrated tokens.) DFRot scales massive
tokens' activations by ``alpha`` (reference code default ``alpha = 100``); with a scale-equivariant
per-token quantizer that weights their squared error by ``alpha^2``, hence ``massive_weight = 1e4``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from orthoopt.core.blocks import Rotations, get_rotation
from orthoopt.core.checks import check_finite_tensor
from orthoopt.core.grid import MAX_BITS, MIN_BITS, QuantSpec, quantize_tokens
from orthoopt.errors import InvalidInputError

from .base import Objective

DEFAULT_MASSIVE_THRESHOLD = 0.5
DEFAULT_MASSIVE_WEIGHT = 1.0e4  # DFRot's alpha = 100 on the activations -> alpha^2 on the squared error


def peak_share_tokens(x: torch.Tensor, threshold: float = DEFAULT_MASSIVE_THRESHOLD) -> torch.Tensor:
    """Boolean ``[T]`` mask of rows of ``x`` (``[T, n]``) with ``max|x_t| / ||x_t||_2 > threshold``
    (DFRot's massive tokens as this objective selects them; see the module doc).

    The ratio lies in ``[1 / sqrt(n), 1]``; all-zero rows are never massive.
    """
    if x.ndim != 2:
        raise InvalidInputError(f"peak_share_tokens expects a 2-D [T, n] tensor, got shape {tuple(x.shape)}")
    a = x.detach().abs()
    peak = a.amax(dim=1)
    norm = torch.linalg.vector_norm(a, dim=1)
    return (peak > threshold * norm) & (norm > 0)


class DFRotLoss(Objective):
    """``sum_rotations sum_t w~_t ||x_t R - Q(x_t R)||^2`` with normalized token weights ``w~``.

    activations:       ``{rotation name: [T, n] tensor}``, the activations the rotation multiplies
                       before they are quantized (e.g. the normalized inputs of the layers reading R1).
    bits:              quantizer bit width (2..8).
    symmetric:         symmetric per-token grid (default) or asymmetric with a zero point.
    massive_threshold: peak share ``max|x_t| / ||x_t||_2`` above which a token is massive (0 < t <= 1).
    massive_weight:    weight of a massive token's squared error (others weigh 1).
    token_weights:     optional ``{rotation name: [T] nonnegative weights}`` replacing the massive rule
                       for those rotations.

    Gradient by autograd (exact almost everywhere, see the module doc). :meth:`procrustes_targets`
    gives DFRot's closed-form alternation step.
    """

    def __init__(
        self,
        activations: Mapping[str, torch.Tensor],
        bits: int = 4,
        symmetric: bool = True,
        massive_threshold: float = DEFAULT_MASSIVE_THRESHOLD,
        massive_weight: float = DEFAULT_MASSIVE_WEIGHT,
        token_weights: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise InvalidInputError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
        if not 0.0 < float(massive_threshold) <= 1.0:
            raise InvalidInputError(f"massive_threshold is a share of the token norm in (0, 1], got {massive_threshold!r}")
        if not 0.0 < float(massive_weight) < float("inf"):
            raise InvalidInputError(f"massive_weight must be positive and finite, got {massive_weight!r}")
        if not isinstance(activations, Mapping) or not activations:
            raise InvalidInputError("DFRotLoss needs a non-empty {rotation name: [T, n] tensor} mapping")
        token_weights = dict(token_weights or {})
        unknown = set(token_weights) - set(activations)
        if unknown:
            raise InvalidInputError(f"token_weights for rotations without activations: {sorted(unknown)}")
        self.bits = bits
        self.symmetric = bool(symmetric)
        self.massive_threshold = float(massive_threshold)
        self.massive_weight = float(massive_weight)
        self.spec = QuantSpec(bits=bits, symmetric=self.symmetric)  # per token, no clipping
        self.activations: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}  # normalized: sum to 1 per rotation, float64
        for name, x in activations.items():
            what = f"activations for rotation {name!r}"
            if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] == 0:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise InvalidInputError(f"{what} must be a non-empty 2-D [T, n] tensor, got {shape}")
            if not x.is_floating_point():
                raise InvalidInputError(f"{what} must be floating point, got {x.dtype}")
            check_finite_tensor(x, what)
            if name in token_weights:
                w = token_weights[name]
                if not isinstance(w, torch.Tensor) or tuple(w.shape) != (x.shape[0],):
                    shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                    raise InvalidInputError(f"token_weights for {name!r} must have shape [{x.shape[0]}], got {shape}")
                w = w.detach().to(device=x.device, dtype=torch.float64)
                check_finite_tensor(w, f"token_weights for {name!r}")
                if bool((w < 0).any()) or float(w.sum()) == 0.0:
                    raise InvalidInputError(f"token_weights for {name!r} must be nonnegative and not all zero")
            else:
                w = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
                w[peak_share_tokens(x, self.massive_threshold)] = self.massive_weight
            self.activations[name] = x
            self.weights[name] = w / w.sum()

    @property
    def dims(self) -> dict[str, int]:
        return {name: x.shape[1] for name, x in self.activations.items()}

    def massive_mask(self, name: str) -> torch.Tensor:
        """Boolean ``[T]`` mask of the tokens of rotation ``name`` that the massive rule selects."""
        return peak_share_tokens(self.activations[name], self.massive_threshold)

    def _rotated(self, rotations: Rotations, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.activations[name]
        R = get_rotation(rotations, name, x.shape[1])
        return x.to(device=R.device, dtype=R.dtype), R

    def token_errors(self, rotations: Rotations) -> dict[str, torch.Tensor]:
        """``{name: [T] ||x_t R - Q(x_t R)||^2}`` (unweighted), in the rotation's dtype."""
        out = {}
        for name in self.activations:
            x, R = self._rotated(rotations, name)
            y = x @ R
            out[name] = (y - quantize_tokens(y, self.spec)).square().sum(dim=1)
        return out

    def loss(self, rotations: Rotations) -> torch.Tensor:
        total = None
        for name, err in self.token_errors(rotations).items():
            w = self.weights[name].to(err.device)
            term = (w * err.to(torch.float64)).sum()
            total = term if total is None else total + term
        return total

    def procrustes_targets(self, rotations: Rotations) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (A, B)}`` with ``A = diag(sqrt(w~)) X`` and ``B = diag(sqrt(w~)) Q(X R)`` (``[T, n]``).

        With ``R`` fixed, ``||A @ R - B||_F^2`` equals :meth:`loss` for that rotation; the orthogonal
        minimizer ``R' = U @ Vh`` of ``||A @ R' - B||_F`` (SVD ``A.T @ B = U S Vh``) is DFRot's
        Procrustes step. It never increases this surrogate; the true loss can still rise a little
        because ``Q``'s per-token scales move with ``R'``.
        """
        out = {}
        with torch.no_grad():
            for name in self.activations:
                x, R = self._rotated(rotations, name)
                target = quantize_tokens(x @ R, self.spec)
                sw = self.weights[name].to(device=x.device, dtype=x.dtype).sqrt().unsqueeze(1)
                out[name] = (sw * x, sw * target)
        return out

    def __repr__(self) -> str:
        massive = {k: int(self.massive_mask(k).sum()) for k in self.activations}
        return (
            f"DFRotLoss(dims={self.dims}, bits={self.bits}, symmetric={self.symmetric}, "
            f"massive tokens={massive}, massive_weight={self.massive_weight})"
        )
