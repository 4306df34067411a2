"""Which format a quantization is written in: ``--format auto`` asks the exporters what they can carry.

:func:`can_carry` is the one question ("can format F store these quantization settings, and if not,
why?"); each exporter answers it from its own representability check (compressed-tensors:
:func:`orthoopt.export.compressed_tensors.unrepresentable`), so when an exporter learns to carry more
(activation quantization, online transforms), the default follows without a change here.
:func:`choose_format` resolves ``auto``: compressed-tensors whenever it can carry the settings, else
orthoopt's own fake-quantized format, which carries everything orthoopt simulates.
"""

from __future__ import annotations

from orthoopt.errors import InvalidInputError

AUTO = "auto"
PREFERRED = ("compressed-tensors", "orthoopt")
"""The formats ``auto`` tries, in order; the last carries every setting."""


def can_carry(fmt: str, settings: dict) -> list[str]:
    """Why format ``fmt`` cannot store a quantization; empty when it can.

    Parameters
    ----------
    fmt : str
        ``"orthoopt"`` or ``"compressed-tensors"``.
    settings : dict
        quant.json's keys that decide it (``wbits``, ``abits``, ``group_size``, ``gptq``, ``act``,
        ``kvbits``, ``r3``, and ``experts`` once the model is loaded; ``layered``: written one decoder
        layer at a time, ``--streamed``).

    Returns
    -------
    list of str
        The reasons (empty: representable).
    """
    if fmt == "orthoopt":
        return []
    if fmt == "compressed-tensors":
        from orthoopt.export.compressed_tensors import unrepresentable
        from orthoopt.export.ct_layered import layered_reasons

        return unrepresentable(settings) + (layered_reasons(settings) if settings.get("layered") else [])
    raise InvalidInputError(f"unknown format {fmt!r}; choose one of {', '.join(PREFERRED)}")


def choose_format(requested: str, settings: dict) -> tuple[str, list[str]]:
    """The format to write, and why a preferred one was passed over.

    Parameters
    ----------
    requested : str
        ``"auto"`` or a format name.
    settings : dict
        As in :func:`can_carry`.

    Returns
    -------
    fmt : str
        ``requested`` itself, or for ``"auto"`` the first of :data:`PREFERRED` that can carry ``settings``.
    passed_over : list of str
        For ``"auto"``: why compressed-tensors was not chosen (empty when it was).

    Raises
    ------
    ValueError
        A named format that cannot carry the settings (with the reasons and the alternative).
    """
    if requested != AUTO:
        reasons = can_carry(requested, settings)
        if reasons:
            raise InvalidInputError(f"cannot export to {requested}: " + "; ".join(reasons)
                             + " (--format orthoopt, or the default --format auto, carries these settings)")
        return requested, []
    passed_over: list[str] = []
    for fmt in PREFERRED:
        reasons = can_carry(fmt, settings)
        if not reasons:
            return fmt, passed_over
        passed_over.extend(reasons)
    raise AssertionError("the orthoopt format carries every setting")  # pragma: no cover


__all__ = ["AUTO", "PREFERRED", "can_carry", "choose_format"]
