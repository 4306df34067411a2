"""``OrthogonalGroup``: the one object every solver of orthoopt calls for the geometry of O(n).

Rotations are ``[n, n]`` matrices acting as ``x -> x @ R`` (``docs/conventions.md``); the metric is
the one O(n) inherits from ``R^{n x n}`` (``<A, B> = tr(A^T B)``). A tangent vector at ``R`` is written
``W @ R`` with a skew-symmetric *generator* ``W`` (left trivialization), so every solver works with
generators:

=========================  ======================================================================
``skew(A)``                ``(A - A.T) / 2``
``generator(R, G)``        ``skew(G @ R.T)``: the Riemannian gradient of a loss with Euclidean gradient
                           ``G`` is ``generator(R, G) @ R`` (= ``R @ skew(R.T @ G)``, the projection)
``egrad2rgrad(R, G)``      that tangent vector, ``R @ skew(R.T @ G)``
``grad_norm(R, G)``        ``||skew(R.T @ G)||_F`` (= ``||generator(R, G)||_F``)
``cayley(R, W, step)``     exact Cayley retraction ``(I - step/2 W)^{-1} (I + step/2 W) @ R``
``cayley_fixed_point``     the ICLR 2020 fixed-point estimate of it (matrix products only)
``polar_factor(M)``        nearest orthogonal matrix ``U @ Vh`` (SVD): Procrustes and re-projection
``reorthogonalize(R)``     ``R`` projected back onto O(n) in float64 (polar or QR)
``random(n, seed)``        a Haar-random point
``error(R)``               ``||R.T R - I||_F``
``tolerance(n, dtype)``    the one tolerance policy (:mod:`orthoopt.core.tolerance`)
=========================  ======================================================================

geoopt's ``RiemannianAdam`` / ``RiemannianSGD`` keep geoopt's own ``Stiefel`` manifold (its
retraction-transport and Adam moments are what geoopt does well); everything orthoopt computes
itself goes through this class. It holds no state: :data:`O_N` is the shared instance.
"""

from __future__ import annotations

import torch

from orthoopt.core.tolerance import orthogonality_tolerance

from .orthogonal import orthogonality_error, project_tangent, random_orthogonal, skew
from .retractions import cayley_retraction, cayley_retraction_iterative, polar_factor, reorthogonalize


class OrthogonalGroup:
    """The orthogonal group O(n) with the Euclidean metric; see the module docstring for the methods."""

    @staticmethod
    def skew(A: torch.Tensor) -> torch.Tensor:
        """``(A - A.T) / 2``."""
        return skew(A)

    def generator(self, R: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """Skew generator ``skew(G @ R.T)`` of the Riemannian gradient (``grad = generator @ R``)."""
        return self.skew(G @ R.T)

    def egrad2rgrad(self, R: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """Riemannian gradient ``R @ skew(R.T @ G)`` (tangent projection of ``G``) at ``R``."""
        return project_tangent(R, G)

    def grad_norm(self, R: torch.Tensor, G: torch.Tensor) -> float:
        """``||skew(R.T @ G)||_F`` in float64: the norm of the Riemannian gradient."""
        return float(torch.linalg.matrix_norm(self.skew(R.detach().T @ G.detach())).double())

    def cayley(self, R: torch.Tensor, W: torch.Tensor, step: float) -> torch.Tensor:
        """Exact Cayley retraction ``(I - step/2 W)^{-1} (I + step/2 W) @ R`` for skew ``W``."""
        return cayley_retraction(R, W, step)

    def cayley_fixed_point(self, R: torch.Tensor, W: torch.Tensor, step: float, n_iters: int = 2) -> torch.Tensor:
        """Li et al.'s fixed-point estimate of :meth:`cayley` (``n_iters`` iterations, products only)."""
        return cayley_retraction_iterative(R, W, step, n_iters)

    @staticmethod
    def polar_factor(M: torch.Tensor) -> torch.Tensor:
        """Orthogonal polar factor ``U @ Vh`` of ``M = U S Vh``: the orthogonal matrix nearest to ``M``."""
        return polar_factor(M)

    @staticmethod
    def reorthogonalize(R: torch.Tensor, method: str = "polar") -> torch.Tensor:
        """``R`` projected onto O(n) in float64 (``"polar"``: nearest; ``"qr"``), in ``R``'s dtype."""
        return reorthogonalize(R, method)

    @staticmethod
    def random(n: int, seed: int = 0, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """A Haar-random ``[n, n]`` orthogonal matrix (:func:`~orthoopt.manifold.random_orthogonal`)."""
        return random_orthogonal(n, seed=seed, dtype=dtype, device=device)

    @staticmethod
    def error(R: torch.Tensor) -> float:
        """``||R.T @ R - I||_F`` in float64."""
        return orthogonality_error(R)

    @staticmethod
    def tolerance(n: int, dtype: torch.dtype) -> float:
        """:func:`orthoopt.core.tolerance.orthogonality_tolerance`."""
        return orthogonality_tolerance(n, dtype)

    def __repr__(self) -> str:
        return "OrthogonalGroup()"


O_N = OrthogonalGroup()
"""The shared instance solvers use."""
