"""The settings of one quantization (``orthoopt quantize``): a scheme name and the flags over it.

:class:`QuantizeSettings` holds what the command line takes, field by field under the flag's name
(``wbits`` is ``--wbits``); None means "not given" where a scheme may decide. :meth:`QuantizeSettings.resolved`
applies the scheme (:func:`orthoopt.quant.schemes.resolve`: an explicit setting wins) and
:meth:`QuantizeSettings.check` refuses bad values naming the flag, before any work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from orthoopt.models.dtypes import DTYPE_CHOICES
from orthoopt.errors import InvalidInputError
from orthoopt.quant.config import QUANT_METHODS, QuantizeConfig
from orthoopt.quant.quantizer import MAX_BITS, MIN_BITS
from orthoopt.quant.schemes import PER_CHANNEL, resolve

DEFAULTS = {"wbits": 4, "group_size": None, "sym": True, "abits": 16, "act_sym": True}
"""The weight/activation settings without a scheme (and without the flags)."""
FORMAT_CHOICES = ("auto", "orthoopt", "compressed-tensors")
"""``--format``: ``auto`` (default) is compressed-tensors when the exporter can carry the settings,
else orthoopt (:func:`orthoopt.export.choose.choose_format`)."""


@dataclass(frozen=True)
class QuantizeSettings:
    """What ``orthoopt quantize`` takes besides MODEL, ``--out``, ``--calib`` and the rotation.

    Every field is the flag of the same name (``docs/quantization.md``): ``scheme`` a
    compressed-tensors preset name (``W4A16``); ``wbits``, ``group_size`` (``-1``: per output
    channel), ``sym`` and ``abits`` None to take the scheme's value (or :data:`DEFAULTS`);
    ``act_asym`` true to make the activation grid asymmetric; the K/V, GPTQ and calibration-window
    settings; ``format`` one of :data:`FORMAT_CHOICES`; ``dtype`` the dtype the model is loaded in
    and its weights written in (``"auto"``: the checkpoint's own, :mod:`orthoopt.models.dtypes`).
    """

    scheme: str | None = None
    method: str = "rtn"
    wbits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    abits: int | None = None
    act_asym: bool = False
    act_clip: float = 1.0
    online_hadamard: bool = False
    mse_clip: bool = False
    kvbits: int = 16
    kv_group_size: int | None = None
    kv_sym: bool = False
    k_clip: float = 1.0
    v_clip: float = 1.0
    r3: bool = False
    nsamples: int = 128
    seq_len: int | None = None
    seed: int = 0
    act_order: bool = False
    true_sequential: bool = True
    damp: float = 0.01
    block_size: int = 128
    format: str = "auto"
    dtype: str = "auto"

    @classmethod
    def from_mapping(cls, values: dict, where: str = "quantize") -> "QuantizeSettings":
        """Settings from a mapping of field names (a recipe's ``quantize`` section); ValueError naming
        an unknown key and the known ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InvalidInputError(f"{where}: unknown setting {unknown[0]!r}; known: {', '.join(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self) -> tuple["QuantizeSettings", dict | None]:
        """``(settings with wbits/group_size/sym/abits/act_asym filled in, quant.json's scheme record)``.

        The scheme's values fill what is not given; an explicit value wins and is listed in the
        record's ``overrides``. The record is None without a scheme. ``group_size`` comes back as
        None for one scale per output channel.
        """
        flags = {k: v for k, v in {"wbits": self.wbits, "sym": self.sym, "abits": self.abits,
                                   "act_sym": False if self.act_asym else None}.items() if v is not None}
        if self.group_size is not None:  # given; PER_CHANNEL is None in the settings
            flags["group_size"] = None if self.group_size == PER_CHANNEL else self.group_size
        settings, overrides = resolve(self.scheme, flags, DEFAULTS)
        out = replace(self, wbits=settings["wbits"], group_size=settings["group_size"], sym=settings["sym"],
                      abits=settings["abits"], act_asym=not settings["act_sym"])
        record = None if self.scheme is None else {"name": self.scheme.upper(), "overrides": overrides}
        return out, record

    def check(self) -> None:
        """Raise ValueError naming the first bad setting (as its flag). Call on :meth:`resolved` settings."""
        if self.method not in QUANT_METHODS:
            raise InvalidInputError(f"--method must be one of {', '.join(QUANT_METHODS)}, got {self.method!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise InvalidInputError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.format not in FORMAT_CHOICES:
            raise InvalidInputError(f"--format must be one of {', '.join(FORMAT_CHOICES)}, got {self.format!r}")
        for name in ("wbits", "kvbits"):
            v = getattr(self, name)
            if not (v == 16 or MIN_BITS <= v <= MAX_BITS):
                raise InvalidInputError(f"--{name} must be in [{MIN_BITS}, {MAX_BITS}] or 16, got {v}")
        if self.abits not in (4, 8, 16):
            raise InvalidInputError(f"--abits must be 16, 8 or 4, got {self.abits}")
        if self.group_size is not None and self.group_size < 1:
            raise InvalidInputError(f"--group-size must be positive or {PER_CHANNEL} (per output channel), got "
                             f"{self.group_size}")
        for name in ("act_clip", "k_clip", "v_clip"):
            if not 0 < getattr(self, name) <= 1:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(self, name)}")
        if self.nsamples < 1:
            raise InvalidInputError(f"--nsamples must be positive, got {self.nsamples}")
        if self.seq_len is not None and self.seq_len < 1:
            raise InvalidInputError(f"--seq-len must be positive, got {self.seq_len}")
        if self.seed < 0:
            raise InvalidInputError(f"--seed must be >= 0, got {self.seed}")
        if not 0 <= self.damp:
            raise InvalidInputError(f"--damp must be non-negative, got {self.damp}")
        if self.block_size < 1:
            raise InvalidInputError(f"--block-size must be positive, got {self.block_size}")

    @property
    def uses_calibration(self) -> bool:
        """True when the weight quantizer reads calibration text (GPTQ on quantized weights)."""
        return self.method == "gptq" and (self.wbits or DEFAULTS["wbits"]) < 16

    def quantize_config(self) -> QuantizeConfig:
        """The library config of these (resolved) settings: what :func:`orthoopt.quant.quantize_model` runs."""
        from orthoopt.quant.act import ActQuantConfig
        from orthoopt.quant.config import GPTQConfig
        from orthoopt.quant.kv import KVQuantConfig

        return QuantizeConfig(
            method=self.method, wbits=self.wbits, group_size=self.group_size, sym=self.sym, mse_clip=self.mse_clip,
            act=ActQuantConfig(bits=self.abits, symmetric=not self.act_asym, clip_ratio=self.act_clip,
                               online_hadamard=self.online_hadamard),
            kv=KVQuantConfig(bits=self.kvbits, group_size=self.kv_group_size, symmetric=self.kv_sym,
                             k_clip_ratio=self.k_clip, v_clip_ratio=self.v_clip, r3=self.r3),
            gptq=GPTQConfig(act_order=self.act_order, true_sequential=self.true_sequential, percdamp=self.damp,
                            block_size=self.block_size))

    def export_settings(self) -> dict:
        """The settings an exporter's representability check reads (quant.json's keys), from resolved settings."""
        return {
            "wbits": self.wbits, "abits": self.abits, "group_size": self.group_size,
            "gptq": {"act_order": self.act_order} if self.method == "gptq" else None,
            "act": {"bits": self.abits, "symmetric": not self.act_asym, "clip_ratio": self.act_clip,
                    "online_hadamard": self.online_hadamard},
            "kvbits": self.kvbits, "r3": self.r3,
        }

    def describe(self, scheme: dict | None, fmt: str) -> str:
        """One line: ``W4A16 rtn (scheme W4A16) g128 (compressed-tensors)``."""
        desc = f"W{self.wbits}A{self.abits}" + (f"KV{self.kvbits}" if self.kvbits < 16 else "") + f" {self.method}"
        if scheme:
            overridden = f", overridden: {', '.join(scheme['overrides'])}" if scheme["overrides"] else ""
            desc += f" (scheme {scheme['name']}{overridden})"
        if self.group_size:
            desc += f" g{self.group_size}"
        if self.r3:
            desc += " +R3"
        if self.online_hadamard:
            desc += " +R4"
        return desc + (f" ({fmt})" if fmt != "orthoopt" else "")


__all__ = ["DEFAULTS", "FORMAT_CHOICES", "QuantizeSettings"]
