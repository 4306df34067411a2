"""Command-line options made from :class:`~orthoopt.config.RotateConfig`'s fields.

A field that a command line sets names its flag, argparse type, choices and help in its metadata
(:func:`orthoopt.config.option`); fields are named by their path in the config (``"seed"``, and in a
group ``"solve.steps"``, ``"checkpoint.dtype"``). :func:`add_config_options` adds those options to a
parser, :func:`config_values` reads them back as ``{path: value}`` and :func:`build_config` makes the
``RotateConfig``. ``orthoopt rotate``,
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

from orthoopt.config import RotateConfig, help_text, nest


def _paths(cls: type, prefix: str = "") -> dict[str, Field]:
    out = {}
    for f in fields(cls):
        nested = f.metadata.get("nested")
        out.update(_paths(nested, f"{prefix}{f.name}.") if nested else {prefix + f.name: f})
    return out


FIELD_PATHS = _paths(RotateConfig)
"""``{path: field}`` of every RotateConfig field, groups walked (``"solve.steps"``), in declaration order."""
FLAG_FIELDS = tuple(p for p, f in FIELD_PATHS.items() if f.metadata.get("flag"))
"""The fields (paths) a command line sets, in declaration order."""


def option_fields() -> dict[str, Field]:
    """``{path: field}`` of the fields that carry a command-line option."""
    return {p: FIELD_PATHS[p] for p in FLAG_FIELDS}


def dest(name: str) -> str:
    """The argparse destination of field ``name``'s option, named for its flag (``checkpoint.dtype``
    -> ``dtype`` for ``--dtype``, ``compute.dtype`` -> ``rotation_dtype`` for ``--rotation-dtype``)."""
    return option_fields()[name].metadata["flag"].lstrip("-").replace("-", "_")


FIELD_OF_DEST = {dest(n): n for n in FLAG_FIELDS}
"""``{argparse dest: RotateConfig field path}``."""


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
        The fields (paths, ``"solve.steps"``) to add, in the order given (default: every field with a flag, :data:`FLAG_FIELDS`).
    skip : iterable of str
        Destinations left out (a command that has its own option for them).
    groups : dict, optional
        ``{group: parser or argument group}`` for fields with a ``group`` (``"spinquant"``).
    help_prefix : dict, optional
        ``{field path: text}`` put before a field's help (a command's own note, e.g. "--streamed only").

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
    """``{field path: value}`` of the options ``dests`` (as :func:`add_config_options` returned them)
    in parsed ``args``; ``--dtype auto`` and an unset ``--rotation-dtype`` stay as parsed
    (:func:`resolve_dtypes`)."""
    return {FIELD_OF_DEST[d]: getattr(args, d) for d in dests}


def build_config(method: str, values: dict) -> RotateConfig:
    """The :class:`~orthoopt.config.RotateConfig` of ``method`` with ``values`` (``{field path: value}``,
    :func:`config_values`) set, each in its group."""
    return RotateConfig(method=method, **nest(values))


MODEL_DTYPE, ROTATION_DTYPE = "checkpoint.dtype", "compute.dtype"


def resolve_dtypes(values: dict, checkpoint_dtype: Callable[[], str]) -> dict:
    """``values`` (``{field path: value}``) with the weights' dtype ``"auto"`` replaced by
    ``checkpoint_dtype()`` (called only then) and an unset rotation dtype by float64 for a float64
    model, else float32."""
    out = dict(values)
    if out.get(MODEL_DTYPE, "float32") == "auto":
        out[MODEL_DTYPE] = checkpoint_dtype()
    if ROTATION_DTYPE in out and out[ROTATION_DTYPE] is None:
        out[ROTATION_DTYPE] = "float64" if out.get(MODEL_DTYPE) == "float64" else "float32"
    return out


__all__ = ["FIELD_OF_DEST", "FIELD_PATHS", "FLAG_FIELDS", "MODEL_DTYPE", "ROTATION_DTYPE", "add_config_options",
           "build_config", "config_values", "dest", "flag_default", "option_fields", "resolve_dtypes"]
