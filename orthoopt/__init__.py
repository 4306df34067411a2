"""orthoopt: learned orthogonal rotations for post-training quantization, as one manifold problem.

Data flows one way: model -> adapter -> weight blocks -> objective -> solver -> rotations ->
adapter write-back -> checkpoint. Conventions (row vectors, ``x -> x @ R``, ``W @ R`` for blocks that
read the rotated space, ``R.T @ W`` for blocks that write it) are in ``docs/conventions.md``.

The public face (``docs/architecture.md``, "The public face"): every name of :data:`__all__` is defined
once, in the module :data:`PUBLIC` names, and reached from here. The names are loaded on first use,
so ``import orthoopt`` (and so every ``import orthoopt.x``) stays light: torch and transformers are
imported with the first name that needs them.

* :func:`rotate_model`, :func:`rotate_streamed`: learn and apply rotations (in memory; a safetensors
  folder layer by layer), configured by :class:`RotateConfig`;
* :func:`quantize_model`, configured by :class:`QuantizeConfig`: RTN / GPTQ, activations, K/V;
* :func:`oneshot`: rotate, quantize and export in one call (``orthoopt quantize --rotate``);
* :func:`solve` -> :class:`SolveResult`: minimize any :class:`Objective` with any :class:`Solver`;
* :data:`METHODS` (:class:`Method` entries) and :data:`SOLVERS`: the method and solver registries;
* :class:`OrthooptError`, the base of every exception orthoopt raises, and :class:`InvalidInputError`,
  an input orthoopt's checks refuse.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from orthoopt.errors import InvalidInputError, OrthooptError

if TYPE_CHECKING:  # what static tools see; at run time the names load on first use (PUBLIC)
    from orthoopt.config import RotateConfig
    from orthoopt.jobs.oneshot import oneshot
    from orthoopt.methods import METHODS, Method
    from orthoopt.objectives.base import Objective
    from orthoopt.pipeline.api import rotate_model, rotate_streamed
    from orthoopt.quant.config import QuantizeConfig
    from orthoopt.quant.model import quantize_model
    from orthoopt.solvers.base import Solver
    from orthoopt.solvers.registry import SOLVERS
    from orthoopt.solvers.solve import SolveResult, solve

__version__ = "0.1.0"

PUBLIC: dict[str, str] = {
    "rotate_model": "orthoopt.pipeline.api",
    "rotate_streamed": "orthoopt.pipeline.api",
    "RotateConfig": "orthoopt.config",
    "quantize_model": "orthoopt.quant.model",
    "QuantizeConfig": "orthoopt.quant.config",
    "solve": "orthoopt.solvers.solve",
    "SolveResult": "orthoopt.solvers.solve",
    "Objective": "orthoopt.objectives.base",
    "Solver": "orthoopt.solvers.base",
    "METHODS": "orthoopt.methods",
    "Method": "orthoopt.methods",
    "SOLVERS": "orthoopt.solvers.registry",
    "OrthooptError": "orthoopt.errors",
    "InvalidInputError": "orthoopt.errors",
    "oneshot": "orthoopt.jobs.oneshot",
}
"""``{public name: the module that defines it}``."""

__all__ = ["InvalidInputError", "METHODS", "Method", "Objective", "OrthooptError", "QuantizeConfig", "RotateConfig",
           "SOLVERS", "SolveResult", "Solver", "__version__", "oneshot", "quantize_model", "rotate_model",
           "rotate_streamed", "solve"]
"""The public names: :data:`PUBLIC`'s and ``__version__`` (``tests/test_public_api.py`` checks they agree)."""


def __getattr__(name: str):
    if name in PUBLIC:
        value = getattr(importlib.import_module(PUBLIC[name]), name)
        globals()[name] = value  # loaded once
        return value
    raise AttributeError(f"module 'orthoopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC))
