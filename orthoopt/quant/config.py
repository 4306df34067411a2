"""The settings of one :func:`orthoopt.quant.quantize_model` call: :class:`QuantizeConfig`, validated once.

One frozen dataclass, nested by concern: the weight grid at the top level (``method``, ``wbits``,
``group_size``, ``sym``, ``mse_clip``), the activations (:class:`~orthoopt.quant.act.ActQuantConfig`,
with the online Hadamard R4), the K/V cache and R3 (:class:`~orthoopt.quant.kv.KVQuantConfig`) and
GPTQ's own options (:class:`GPTQConfig`). ``orthoopt quantize`` builds one from its flags
(:meth:`orthoopt.jobs.settings.QuantizeSettings.quantize_config`); Python callers build one directly::

    quantize_model(model, QuantizeConfig("gptq", wbits=4, group_size=128), calib=ids)

Constructing one checks every field and raises :class:`~orthoopt.errors.InvalidInputError` naming
the first bad one, before any model is touched. What depends on the model (a group size dividing
every linear's input columns, a Hadamard matrix for head_dim) is checked by ``quantize_model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orthoopt.core.grid import QuantSpec, check_bits_or_off
from orthoopt.errors import InvalidInputError
from orthoopt.quant.act import ActQuantConfig
from orthoopt.quant.kv import KVQuantConfig

QUANT_METHODS = ("rtn", "gptq")
"""Weight quantizers: round-to-nearest and GPTQ (needs calibration windows)."""


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's options (:func:`orthoopt.quant.gptq.gptq_quantize`, :mod:`orthoopt.quant.sequential`).

    Parameters
    ----------
    act_order : bool
        Quantize the columns in decreasing Hessian-diagonal order (default False).
    true_sequential : bool
        Quantize each layer group by group, each group's Hessians taken with the earlier groups
        quantized (default), or all of a layer's linears from one pass.
    percdamp : float
        Dampening added to the Hessian diagonal, as a fraction of its mean (>= 0; default 0.01).
    block_size : int
        Columns per lazy-update block (>= 1; default 128).
    """

    act_order: bool = False
    true_sequential: bool = True
    percdamp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not self.percdamp >= 0:
            raise InvalidInputError(f"GPTQ percdamp must be a number >= 0, got {self.percdamp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise InvalidInputError(f"GPTQ block_size must be an int >= 1, got {self.block_size!r}")

    def to_dict(self) -> dict:
        """quant.json's ``"gptq"`` record."""
        return {"act_order": self.act_order, "percdamp": self.percdamp, "block_size": self.block_size,
                "true_sequential": self.true_sequential}


@dataclass(frozen=True)
class QuantizeConfig:
    """How :func:`~orthoopt.quant.quantize_model` quantizes a model.

    Parameters
    ----------
    method : {"rtn", "gptq"}
        The weight quantizer; GPTQ needs calibration windows (``quantize_model(..., calib=ids)``).
    wbits : int
        Weight bits, 2..8, or 16 to keep the weights in full precision (e.g. W16A4).
    group_size : int or None
        None: one scale per output channel; else input columns per scale (must divide every
        quantized linear's input columns).
    sym : bool
        Symmetric weight grid (default), else asymmetric with an integer zero point.
    mse_clip : bool
        Per-row MSE search of the clipping ratio (both quantizers).
    act : ActQuantConfig
        Activation quantization and the online Hadamard before ``down_proj`` (default: off).
    kv : KVQuantConfig
        K/V-cache quantization and the online R3 (default: off).
    gptq : GPTQConfig
        GPTQ's options (ignored by RTN).
    """

    method: str = "rtn"
    wbits: int = 4
    group_size: int | None = None
    sym: bool = True
    mse_clip: bool = False
    act: ActQuantConfig = field(default_factory=ActQuantConfig)
    kv: KVQuantConfig = field(default_factory=KVQuantConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise InvalidInputError(f"method must be one of {QUANT_METHODS}, got {self.method!r}")
        check_bits_or_off(self.wbits, "weight")
        for name, kind in (("act", ActQuantConfig), ("kv", KVQuantConfig), ("gptq", GPTQConfig)):
            if not isinstance(getattr(self, name), kind):
                raise InvalidInputError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise InvalidInputError(f"group_size must be a positive int or None (per output channel), got {g!r}")

    @property
    def weight_spec(self) -> QuantSpec | None:
        """The weight quantizer's grid (None when ``wbits`` is 16: weights stay in full precision)."""
        if self.wbits >= 16:
            return None
        return QuantSpec(bits=self.wbits, symmetric=self.sym, group_size=self.group_size, mse=self.mse_clip)

    @property
    def uses_calibration(self) -> bool:
        """True when the weight quantizer reads calibration windows (GPTQ on quantized weights)."""
        return self.method == "gptq" and self.wbits < 16


__all__ = ["GPTQConfig", "QUANT_METHODS", "QuantizeConfig"]
