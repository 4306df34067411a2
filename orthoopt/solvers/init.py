"""Starting rotations for ``solve``: identity, Haar-random, or randomized Hadamard."""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch

from orthoopt.errors import InvalidInputError

from ..manifold import random_orthogonal

INIT_KINDS = ("identity", "random", "hadamard")


def derived_seed(seed: int, name: str) -> int:
    """A deterministic 63-bit seed for rotation ``name`` under the run seed ``seed``.

    SHA-256 of ``"{seed}:{name}"`` (Python's ``hash`` of a str is salted per process, so not used):
    every rotation gets its own stream, and the same ``(seed, name)`` always gives the same one.
    """
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def initial_rotations(
    dims: Mapping[str, int],
    kind: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: [n, n] orthogonal}`` for ``dims = {name: n}``.

    kind: ``"identity"``; ``"random"`` (Haar, :func:`orthoopt.manifold.random_orthogonal`);
    ``"hadamard"`` (:func:`orthoopt.hadamard.random_hadamard`: a Hadamard matrix with random signs,
    scaled to be orthonormal; raises for sizes it cannot build). Each rotation's seed is
    :func:`derived_seed` ``(seed, name)``. Built in float64 on the CPU, returned in ``dtype`` on
    ``device``.
    """
    if kind not in INIT_KINDS:
        raise InvalidInputError(f"unknown init kind {kind!r}; choose one of {', '.join(INIT_KINDS)}")
    if not isinstance(dims, Mapping) or not dims:
        raise InvalidInputError("dims must be a non-empty dict {rotation name: n}")
    if not dtype.is_floating_point:
        raise InvalidInputError(f"dtype must be floating point, got {dtype}")
    out = {}
    for name, n in dims.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InvalidInputError(f"rotation {name!r}: size must be a positive int, got {n!r}")
        if kind == "identity":
            R = torch.eye(n, dtype=torch.float64)
        elif kind == "random":
            R = random_orthogonal(n, seed=derived_seed(seed, name), dtype=torch.float64)
        else:
            from ..hadamard import random_hadamard  # imported lazily: optional until needed

            R = random_hadamard(n, seed=derived_seed(seed, name), dtype=torch.float64)
        out[name] = R.to(dtype=dtype, device=device)
    return out
