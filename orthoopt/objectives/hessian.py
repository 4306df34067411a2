"""OptRot+-style data-dependent proxy: the fourth power of Hessian-weighted rotated weights.

OptRot (Gadhikar, Grazzi & Hensman, 2025, arXiv:2512.24124) proposes a data-dependent variant,
OptRot+, "incorporating information on the activation covariance". Its exact formula could not be
retrieved for this implementation (only the abstract and summaries); the proxy below is **our
derivation**, stated and justified in docs/objectives.md:

GPTQ minimizes, per linear layer with input rows ``X`` (``[T, in]``) and ``H = X.T @ X``, the output
error ``||(W - Q(W)) @ X.T||_F^2 = tr(dW H dW.T) = ||dW H^(1/2)||_F^2``. The layer's error depends on
the weight only as seen through ``H^(1/2)``. After rotation:

* side "in" (the layer reads the rotated space): ``W' = W R`` and its input becomes ``X R``, so
  ``H' = R.T H R`` and ``W' H'^(1/2) = W R R.T H^(1/2) R = (W H^(1/2)) R``;
* side "out" (the layer writes the rotated space): ``W' = R.T W`` and its input is unchanged, so
  ``W' H^(1/2) = R.T (W H^(1/2))``.

Either way the data-weighted rotated weight is the block's rotation applied to ``W~ = W H^(1/2)``,
and OptRot's outlier argument applied to it gives ``sum((rotated W~) ** 4)``. So
``HessianWeighted`` is exactly :class:`FourthPower` on the blocks ``W~`` (same closed-form gradient).
With ``H`` proportional to the identity it is OptRot.
"""

from __future__ import annotations

import torch

from orthoopt.core.blocks import Rotations, WeightBlock
from orthoopt.core.checks import check_finite_tensor
from orthoopt.errors import InvalidInputError

from .base import Objective
from .fourth_power import FourthPower


def hessian_sqrt(H: torch.Tensor, what: str = "H", normalize: bool = True) -> torch.Tensor:
    """Symmetric PSD square root of ``H`` ([k, k]) in float64, optionally of ``H * k / tr(H)``.

    Checks that ``H`` is square, finite, symmetric (to 1e-6 relative) and positive semidefinite
    (eigenvalues >= -1e-6 * largest); tiny negative eigenvalues from round-off are clamped to 0.
    """
    if not isinstance(H, torch.Tensor) or H.ndim != 2 or H.shape[0] != H.shape[1]:
        shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise InvalidInputError(f"{what} must be a square 2-D tensor, got {shape}")
    check_finite_tensor(H, what)
    H = H.detach().to(torch.float64)
    scale = float(H.abs().max())
    if scale == 0.0:
        raise InvalidInputError(f"{what} is all zeros")
    if float((H - H.T).abs().max()) > 1e-6 * scale:
        raise InvalidInputError(f"{what} is not symmetric")
    evals, evecs = torch.linalg.eigh(H)
    if float(evals.min()) < -1e-6 * float(evals.max().clamp_min(0)) or float(evals.max()) <= 0:
        raise InvalidInputError(f"{what} is not positive semidefinite (smallest eigenvalue {float(evals.min()):.3g})")
    evals = evals.clamp_min(0.0)
    if normalize:
        evals = evals * (H.shape[0] / float(evals.sum()))
    return (evecs * evals.sqrt()) @ evecs.T


def weighted_block(block: WeightBlock, H: torch.Tensor | None, normalize_hessian: bool = True) -> WeightBlock:
    """``block`` with weight ``W @ H^(1/2)`` (float64 product, stored in the weight's dtype, at least
    float32); ``block`` itself when ``H`` is None. Checks as :class:`HessianWeighted` (``H`` is
    ``[in, in]``, finite, symmetric PSD; the weight finite)."""
    if not isinstance(block, WeightBlock):
        raise InvalidInputError(f"HessianWeighted expects WeightBlock items, got {type(block).__name__}")
    if H is None:
        return block
    k = block.weight.shape[1]
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (k, k):
        shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise InvalidInputError(f"block {block.name!r}: hessian must be [{k}, {k}] (the layer's input size), got {shape}")
    check_finite_tensor(block.weight, f"block {block.name!r} ({block.rotation}, side {block.side!r})")
    S = hessian_sqrt(H, what=f"hessian of block {block.name!r}", normalize=normalize_hessian)
    dtype = torch.promote_types(block.weight.dtype, torch.float32)
    W = (block.weight.detach().to(torch.float64) @ S.to(block.weight.device)).to(dtype)
    return WeightBlock(W, block.rotation, block.side, block.name)


class HessianWeighted(Objective):
    """Fourth power of ``W H^(1/2)`` rotated: ``sum_b c_b * sum((rotated(W_b @ H_b^(1/2))) ** 4)``.

    blocks:   weight blocks as for :class:`FourthPower`.
    hessians: one entry per block: ``None`` (that block is unweighted: plain fourth power of ``W``) or
              ``H_b = X_b.T @ X_b`` of shape ``[in, in]`` with ``in = W_b.shape[1]``, where ``X_b``
              (``[T, in]``) are the rows the layer reads **in the basis of** ``block.weight`` (the
              unrotated basis, i.e. the basis the weight is stored in). For a side-"in" block the input
              is the rotated space itself, so ``H_b`` is ``[n, n]``: the second moment of the hidden
              states before ``R`` is applied. For a side-"out" block the input is the layer's own input
              space (e.g. ``hidden`` for ``W_v`` meeting ``R2``), unaffected by ``R``. Any positive
              multiple of ``X.T @ X`` (a mean instead of a sum, a GPTQ damping-free Hessian ``2 X.T X``)
              gives the same objective when ``normalize_hessian`` is on.
    normalize:          per-block normalization of :class:`FourthPower` (on ``W~``).
    normalize_hessian:  use ``H * in / tr(H)`` (mean eigenvalue 1), so the amount of calibration data
                        and the activation scale do not change the balance between blocks, and
                        ``H = c * I`` gives OptRot exactly. Default True.

    ``W~ = W @ H^(1/2)`` is computed once (float64, stored in the weight's dtype, at least float32).
    """

    def __init__(
        self,
        blocks: list[WeightBlock],
        hessians: list[torch.Tensor | None],
        normalize: bool = False,
        normalize_hessian: bool = True,
    ) -> None:
        blocks, hessians = list(blocks), list(hessians)
        if not blocks:
            raise InvalidInputError("HessianWeighted needs at least one weight block")
        if len(blocks) != len(hessians):
            raise InvalidInputError(
                f"got {len(blocks)} blocks but {len(hessians)} hessians (one per block, None for unweighted)"
            )
        weighted = [weighted_block(b, H, normalize_hessian) for b, H in zip(blocks, hessians)]
        self.blocks = blocks
        self.normalize_hessian = bool(normalize_hessian)
        self._inner = FourthPower(weighted, normalize=normalize)

    @property
    def dims(self) -> dict[str, int]:
        return self._inner.dims

    def loss(self, rotations: Rotations) -> torch.Tensor:
        return self._inner.loss(rotations)

    def value_and_grad(self, rotations: Rotations) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Closed form, as :meth:`FourthPower.value_and_grad` on the weighted blocks."""
        return self._inner.value_and_grad(rotations)

    def __repr__(self) -> str:
        return f"HessianWeighted({len(self.blocks)} blocks, dims={self.dims}, normalize={self._inner.normalize})"
