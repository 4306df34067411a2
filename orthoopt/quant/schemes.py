"""Quantization schemes by name: compressed-tensors' preset names (``W4A16``, ``W8A8``, ...) as
orthoopt's quantizer settings.

:data:`SCHEMES` is the table. Each entry is the compressed-tensors preset of that name (as llm-compressor's
``QuantizationModifier(scheme=...)`` / ``GPTQModifier(scheme=...)`` reads it) written in orthoopt's
terms: integer weights of ``wbits`` bits, ``group_size`` input columns per scale (``None``: one scale
per output channel, compressed-tensors' ``strategy="channel"``), symmetric or not; input activations
of ``abits`` bits (16: not quantized), which orthoopt always quantizes per token and dynamically
(compressed-tensors' ``strategy="token"``, ``dynamic=True``). The table does not need compressed-tensors
at run time; ``tests/test_schemes.py`` checks every entry against the installed package's
``PRESET_SCHEMES`` and that every integer preset orthoopt can represent is in it.

Presets orthoopt cannot represent (float formats: FP8, NVFP4, MXFP4, ...; static or block-wise
activations) are refused; :func:`get_scheme` says why when compressed-tensors is installed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from orthoopt.errors import InvalidInputError

PER_CHANNEL = -1
"""``--group-size -1``: one scale per output channel (as AutoGPTQ's ``group_size=-1``), to override a
grouped scheme."""


@dataclass(frozen=True)
class Scheme:
    """orthoopt's quantizer settings for one compressed-tensors preset.

    Attributes
    ----------
    wbits : int
        Weight bits (integer grid).
    group_size : int or None
        Input columns per weight scale; None for one scale per output channel.
    sym : bool
        Symmetric weight grid (compressed-tensors' ``symmetric``).
    abits : int
        Input-activation bits; 16 when activations are not quantized. Quantized activations are per
        token and dynamic.
    act_sym : bool
        Symmetric activation grid.
    """

    wbits: int
    group_size: int | None
    sym: bool = True
    abits: int = 16
    act_sym: bool = True

    def settings(self) -> dict:
        """The fields as a dict (``wbits``, ``group_size``, ``sym``, ``abits``, ``act_sym``)."""
        return asdict(self)


_G = 128  # compressed-tensors' deployment default group size for its W*A* integer presets
SCHEMES: dict[str, Scheme] = {
    "W2A16": Scheme(2, _G), "W3A16": Scheme(3, _G), "W4A16": Scheme(4, _G), "W4A16_ASYM": Scheme(4, _G, sym=False),
    "W5A16": Scheme(5, _G), "W6A16": Scheme(6, _G), "W7A16": Scheme(7, _G), "W8A16": Scheme(8, _G),
    "W2A4": Scheme(2, _G, abits=4), "W3A4": Scheme(3, _G, abits=4), "W4A4": Scheme(4, _G, abits=4),
    "W2A8": Scheme(2, _G, abits=8), "W3A8": Scheme(3, _G, abits=8), "W4A8": Scheme(4, _G, abits=8),
    "W5A8": Scheme(5, _G, abits=8), "W6A8": Scheme(6, _G, abits=8), "W7A8": Scheme(7, _G, abits=8),
    "W8A8": Scheme(8, None, abits=8), "INT8": Scheme(8, None, abits=8),
}
"""compressed-tensors preset name -> orthoopt settings (every integer preset with per-channel or grouped
weights and per-token dynamic activations)."""


def get_scheme(name: str) -> Scheme:
    """The settings of scheme ``name`` (case-insensitive, as compressed-tensors' ``preset_name_to_scheme``).

    Parameters
    ----------
    name : str
        A compressed-tensors preset name, e.g. ``"W4A16"``.

    Returns
    -------
    Scheme

    Raises
    ------
    ValueError
        For a name not in :data:`SCHEMES`, listing the supported names and, for a compressed-tensors
        preset orthoopt cannot represent, the reason.
    """
    key = name.upper()
    if key in SCHEMES:
        return SCHEMES[key]
    why = unrepresentable_preset(key)
    what = f"the compressed-tensors scheme {key} cannot be represented: {why}" if why else f"unknown scheme {name!r}"
    raise InvalidInputError(f"{what}; supported schemes: {', '.join(SCHEMES)}")


def resolve(name: str | None, flags: dict, defaults: dict) -> tuple[dict, dict]:
    """Quantizer settings from a scheme with explicit flags on top (an explicit flag wins).

    Parameters
    ----------
    name : str or None
        Scheme name (:func:`get_scheme`); None: no scheme, start from ``defaults``.
    flags : dict
        The settings given explicitly, keyed like :meth:`Scheme.settings` (only the given ones;
        ``group_size`` None means per output channel).
    defaults : dict
        The settings without a scheme (every key of :meth:`Scheme.settings`).

    Returns
    -------
    settings : dict
        Every key of ``defaults``: the flag if given, else the scheme's value, else the default.
    overrides : dict
        ``{key: {"scheme": value, "flag": value}}`` for each flag that changed the scheme's value
        (empty without a scheme).
    """
    unknown = set(flags) - set(defaults)
    if unknown:
        raise InvalidInputError(f"unknown quantizer settings: {sorted(unknown)}")
    base = get_scheme(name).settings() if name is not None else dict(defaults)
    settings = {**base, **flags}
    overrides = {k: {"scheme": base[k], "flag": v} for k, v in flags.items() if name is not None and v != base[k]}
    return settings, overrides


def unrepresentable_preset(name: str) -> str | None:
    """Why compressed-tensors' preset ``name`` has no orthoopt equivalent.

    Parameters
    ----------
    name : str
        Upper-case preset name.

    Returns
    -------
    str or None
        The reason; None when compressed-tensors is not installed, has no such preset, or the preset
        is representable.
    """
    try:
        from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    except ImportError:
        return None
    preset = PRESET_SCHEMES.get(name)
    if preset is None:
        return None
    weights, inputs = preset.get("weights"), preset.get("input_activations")
    reasons = []
    if weights is None:
        reasons.append("it quantizes no weights (run without quantize, or --wbits 16)")
    elif _value(weights.type) != "int" or _value(weights.strategy) not in ("channel", "group"):
        reasons.append(f"its weights are {_value(weights.type)} {weights.num_bits}-bit with strategy "
                       f"{_value(weights.strategy)!r}; orthoopt's weight grid is integer, per channel or per group")
    if inputs is not None and (_value(inputs.type) != "int" or _value(inputs.strategy) != "token"
                               or inputs.dynamic is not True):
        reasons.append(f"its input activations are {_value(inputs.type)} {inputs.num_bits}-bit, strategy "
                       f"{_value(inputs.strategy)!r}, dynamic={inputs.dynamic}; orthoopt quantizes activations "
                       "on an integer grid, per token and dynamically")
    if preset.get("output_activations") is not None:
        reasons.append("it quantizes output activations")
    return "; ".join(reasons) or None


def _value(x) -> str:
    """An enum's value, or the string itself (compressed-tensors stores either, by version)."""
    return str(getattr(x, "value", x))
