"""Pluggable losses of named rotations (``{"R1": [n, n], "R2.3": [d, d], ...}`` -> scalar).

Conventions (row vectors, ``x -> x @ R``, side "in" ``W @ R``, side "out" ``R.T @ W``):
``docs/conventions.md``. Formulas, defaults and sources of each objective: ``docs/objectives.md``.

* :class:`FourthPower`      OptRot: fourth power of the rotated weights (closed-form gradient).
* :class:`HessianWeighted`  OptRot+-style: fourth power of ``W H^(1/2)`` rotated (closed-form gradient).
* :class:`Kurtosis`         KurTail-style: ``|kurtosis(x R) - target|`` of activations or weight rows.
* :class:`DFRotLoss`        DFRot: weighted per-token quantization error, with Procrustes targets.
* :class:`QuantizedLMLoss`  SpinQuant: causal-LM loss of the rotated, fake-quantized network (through
                            a model-side callable, :class:`orthoopt.quant.rotated.RotatedQuantLM`).

Objectives compose: ``a + 0.5 * b`` is an objective (:class:`Sum`). :class:`Objective` is an ABC;
:class:`SupportsProcrustes` is the Protocol of objectives with a closed-form Procrustes step.
"""

from orthoopt.core.blocks import Rotations, WeightBlock, block_dims

from .base import Objective, Sum, SupportsProcrustes
from .dfrot import DFRotLoss, peak_share_tokens
from .fourth_power import FourthPower
from .hessian import HessianWeighted, hessian_sqrt
from .kurtosis import Kurtosis, row_kurtosis
from .lm_loss import QuantizedLMLoss

__all__ = [
    "DFRotLoss",
    "FourthPower",
    "HessianWeighted",
    "Kurtosis",
    "Objective",
    "QuantizedLMLoss",
    "Rotations",
    "Sum",
    "SupportsProcrustes",
    "WeightBlock",
    "block_dims",
    "hessian_sqrt",
    "peak_share_tokens",
    "row_kurtosis",
]
