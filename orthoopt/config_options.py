"""Command-line options made from :class:`~orthoopt.config.RotateConfig`'s fields.

A field that a command line sets names its flag, argparse type, choices and help in its metadata
(:func:`orthoopt.config.option`); :func:`add_config_options` adds those options to a parser and
:func:`config_values` reads them back as ``RotateConfig`` keyword arguments. ``orthoopt rotate``,
``orthoopt quantize --rotate`` and ``python -m orthoopt.distributed_rotate`` all build their rotation
options here, so one setting has one flag, one type, one default and one help text in all three.

Two command-line defaults differ from the field's, both stated in the field: ``--dtype auto`` (the
checkpoint's own dtype; the command resolves it once the model is known, :func:`resolve_dtypes`)
with ``--rotation-dtype`` following it, and ``--checkpoint-every 25`` (a command always has a
checkpoint path; the Python API has one only when given).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, fields

from orthoopt.config import RotateConfig, help_text

FLAG_FIELDS = tuple(f.name for f in fields(RotateConfig) if f.metadata.get("flag"))
"""The fields a command line sets, in declaration order."""


def option_fields() -> dict[str, Field]:
    """``{name: field}`` of the fields that carry a command-line option."""
    return {f.name: f for f in fields(RotateConfig) if f.name in FLAG_FIELDS}


def dest(name: str) -> str:
    """The argparse destination of field ``name``'s option, named for its flag (``model_dtype`` ->
    ``dtype`` for ``--dtype``, ``dtype`` -> ``rotation_dtype`` for ``--rotation-dtype``)."""
    return option_fields()[name].metadata["flag"].lstrip("-").replace("-", "_")


FIELD_OF_DEST = {dest(n): n for n in FLAG_FIELDS}
"""``{argparse dest: RotateConfig field}``."""


def flag_default(f: Field):
    """The command line's default of field ``f``: its ``flag_default``, else the field's own."""
    given = f.metadata["flag_default"]
    return f.default if given is MISSING else given


def add_config_options(target, names: Iterable[str] | None = None, skip: Iterable[str] = (),
                       groups: dict | None = None, help_prefix: dict[str, str] | None = None) -> list[str]:
    """Add the options of RotateConfig fields to ``target`` (a parser or argument group).

    Parameters
    ----------
    target : argparse.ArgumentParser or argument group
        Where the options go (those of a ``group`` field go to ``groups[group]`` when given).
    names : iterable of str, optional
        The fields (names) to add, in the order given (default: every field with a flag, :data:`FLAG_FIELDS`).
    skip : iterable of str
        Destinations left out (a command that has its own option for them).
    groups : dict, optional
        ``{group: parser or argument group}`` for fields with a ``group`` (``"spinquant"``).
    help_prefix : dict, optional
        ``{field: text}`` put before a field's help (a command's own note, e.g. "--streamed only").

    Returns
    -------
    list of str
        The destinations added (named for the flags, :func:`dest`; :func:`config_values` maps them back).
    """
    table = option_fields()
    chosen = list(FLAG_FIELDS if names is None else names)
    unknown = [n for n in chosen if n not in table]
    if unknown:
        raise KeyError(f"RotateConfig fields without a command-line option: {unknown}")
    skip, groups, help_prefix = set(skip), groups or {}, help_prefix or {}
    added = []
    for name in chosen:
        if dest(name) in skip:
            continue
        f = table[name]
        meta = f.metadata
        default = flag_default(f)
        kw: dict = {"dest": dest(name), "default": default}
        if f.type == "bool":
            kw["action"] = "store_true"
        else:
            if meta["type"] is not None:
                kw["type"] = meta["type"]
            choices = meta["choices"]
            if choices is not None:
                kw["choices"] = tuple(choices() if callable(choices) else choices)
        text = help_text(f)
        if name in help_prefix:
            text = f"{help_prefix[name]}: {text}"
        if f.type != "bool" and default is not None and "default" not in text:
            shown = ",".join(default) if isinstance(default, tuple) else default
            text += f"; default {shown}"
        kw["help"] = text.replace("%", "%%")
        groups.get(meta["group"], target).add_argument(meta["flag"], **kw)
        added.append(dest(name))
    return added


def config_values(args: argparse.Namespace, dests: Iterable[str]) -> dict:
    """``{field: value}`` of the options ``dests`` (as :func:`add_config_options` returned them) in
    parsed ``args``; ``--dtype auto`` and an unset ``--rotation-dtype`` stay as parsed
    (:func:`resolve_dtypes`)."""
    return {FIELD_OF_DEST[d]: getattr(args, d) for d in dests}


def resolve_dtypes(values: dict, checkpoint_dtype: Callable[[], str]) -> dict:
    """``values`` with ``model_dtype`` ``"auto"`` replaced by ``checkpoint_dtype()`` (called only then)
    and an unset rotation ``dtype`` by float64 for a float64 model, else float32."""
    out = dict(values)
    if out.get("model_dtype", "float32") == "auto":
        out["model_dtype"] = checkpoint_dtype()
    if "dtype" in out and out["dtype"] is None:
        out["dtype"] = "float64" if out.get("model_dtype") == "float64" else "float32"
    return out


__all__ = ["FIELD_OF_DEST", "FLAG_FIELDS", "add_config_options", "config_values", "dest", "flag_default",
           "option_fields", "resolve_dtypes"]
