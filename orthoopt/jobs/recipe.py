"""A recipe: one YAML file holding a run's rotation, quantization, calibration and evaluation settings.

``orthoopt quantize MODEL --recipe FILE.yaml --out OUT`` (and :func:`load_recipe` from Python) reads it
into :func:`orthoopt.jobs.oneshot.oneshot`'s arguments, so a published setting is one file
(``examples/recipes/``; schema in ``docs/quantization.md``, "Recipes")::

    version: 1                    # optional; 1 is the only version
    rotate:                       # optional (no rotation without it)
      method: optrot              # a method of orthoopt.methods.METHODS
      solve: {steps: 150}         # RotateConfig's fields, grouped as report.json["config"]; plus init: ROTATIONS
    quantize:                     # optional; the fields of orthoopt.jobs.settings.QuantizeSettings
      scheme: W4A16
      method: gptq
    calib: calib.txt              # optional: a text file or hf:NAME[:CONFIG], or a mapping
    #   source: hf:Salesforce/wikitext:wikitext-2-raw-v1
    #   split: train
    #   text_column: text
    eval:                         # optional
      text: wikitext2-test.txt
      seq_len: 2048
      max_tokens: 40960

Every key is checked: an unknown one, or a value of the wrong type, raises ValueError naming the file
and the key (``quantize.wbits``) with what is allowed, before any work. Relative file paths (``calib``,
``eval.text``, ``rotate.init``) are relative to the recipe file's folder.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

from orthoopt.errors import InvalidInputError
from orthoopt.config import RotateConfig
from orthoopt.jobs.settings import QuantizeSettings
from orthoopt.quant.calib_source import HF_PREFIX, CalibSource

VERSION = 1
SECTIONS = ("version", "rotate", "quantize", "calib", "eval")
CALIB_KEYS = ("source", "split", "text_column")
EVAL_KEYS = {"text": str, "seq_len": int, "max_tokens": int}
ROTATE_EXTRA = ("init",)
"""Keys of ``rotate`` that are not RotateConfig fields."""

_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}


def _types_of(annotation: str) -> tuple[type, ...]:
    return tuple(_TYPES[t.strip()] for t in annotation.split("|") if t.strip() in _TYPES)


def _check_type(where: str, value, allowed: tuple[type, ...]) -> None:
    if not allowed:
        return
    ok = any(type(value) is t or (t is float and type(value) is int) for t in allowed)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise InvalidInputError(f"{where} must be {names}, got {value!r}")


def _mapping(where: str, value) -> dict:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where} must be a mapping (key: value lines), got {type(value).__name__} {value!r}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise InvalidInputError(f"{where} has a key that is not a name: {bad[0]!r}")
    return value


def _unknown(where: str, got, known) -> None:
    extra = [k for k in got if k not in known]
    if extra:
        raise InvalidInputError(f"{where}: unknown key {extra[0]!r}; known keys: {', '.join(known)}")


def _path(base: Path, value: str) -> str:
    if value.startswith(HF_PREFIX):
        return value
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else base / p)


def load_recipe(path: str | os.PathLike) -> dict:
    """Read and check a recipe file; returns keyword arguments for :func:`~orthoopt.jobs.oneshot.oneshot`.

    Parameters
    ----------
    path : str or os.PathLike
        The YAML file.

    Returns
    -------
    dict
        ``rotate`` (a mapping of RotateConfig fields, or None), ``quantize`` (a
        :class:`~orthoopt.jobs.settings.QuantizeSettings`), ``calib`` (a
        :class:`~orthoopt.quant.calib_source.CalibSource` or None), ``init``, ``eval_text``,
        ``eval_seq_len``, ``eval_max_tokens``.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not YAML, not a mapping, an unknown key, a value of the wrong type or a bad setting; the
        message names the file and the key.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise InvalidInputError(f"recipe {path} is not valid YAML: {' '.join(str(e).split())}") from None
    where = f"recipe {path}"
    if data is None:
        raise InvalidInputError(f"{where} is empty: give at least a quantize section (docs/quantization.md, Recipes)")
    data = _mapping(where, data)
    _unknown(where, data, SECTIONS)
    version = data.get("version", VERSION)
    if version != VERSION:
        raise InvalidInputError(f"{where}: version must be {VERSION}, got {version!r}")
    base = path.parent
    out: dict = {"rotate": None, "init": None, "calib": None, "eval_text": None, "eval_seq_len": None,
                 "eval_max_tokens": None}

    q = dict(_mapping(f"{where}: quantize", data.get("quantize") or {}))
    qfields = {f.name: _types_of(f.type) for f in fields(QuantizeSettings)}
    _unknown(f"{where}: quantize", q, list(qfields))
    for k, v in q.items():
        _check_type(f"{where}: quantize.{k}", v, qfields[k])
    try:
        settings = QuantizeSettings(**q)
        resolved, _ = settings.resolved()
        resolved.check()
    except ValueError as e:
        raise InvalidInputError(f"{where}: quantize: {e}") from None
    out["quantize"] = settings

    if data.get("rotate") is not None:
        r = dict(_mapping(f"{where}: rotate", data["rotate"]))
        known = [f.name for f in fields(RotateConfig)] + list(ROTATE_EXTRA)
        _unknown(f"{where}: rotate", r, known)
        if "method" not in r:
            raise InvalidInputError(f"{where}: rotate needs a method (rotate: {{method: optrot}})")
        if "init" in r:
            _check_type(f"{where}: rotate.init", r["init"], (str,))
            out["init"] = _path(base, r.pop("init"))
        from orthoopt.jobs.oneshot import _rotate_config

        try:
            _rotate_config(r, resolved)
        except ValueError as e:
            raise InvalidInputError(f"{where}: rotate: {e}") from None
        out["rotate"] = r

    calib = data.get("calib")
    if calib is not None:
        if isinstance(calib, str):
            calib = {"source": calib}
        calib = _mapping(f"{where}: calib", calib)
        _unknown(f"{where}: calib", calib, CALIB_KEYS)
        for k, v in calib.items():
            _check_type(f"{where}: calib.{k}", v, (str,))
        if "source" not in calib:
            raise InvalidInputError(f"{where}: calib needs a source (a text file or hf:NAME[:CONFIG])")
        source = CalibSource.of(_path(base, calib["source"]), calib.get("split"), calib.get("text_column"))
        if not source.is_dataset and ("split" in calib or "text_column" in calib):
            raise InvalidInputError(f"{where}: calib.split and calib.text_column are for a dataset (source: hf:NAME)")
        out["calib"] = source

    if data.get("eval") is not None:
        ev = _mapping(f"{where}: eval", data["eval"])
        _unknown(f"{where}: eval", ev, list(EVAL_KEYS))
        for k, v in ev.items():
            _check_type(f"{where}: eval.{k}", v, (EVAL_KEYS[k],))
        if "text" not in ev:
            raise InvalidInputError(f"{where}: eval needs a text (a text file)")
        out["eval_text"] = _path(base, ev["text"])
        out["eval_seq_len"] = ev.get("seq_len")
        out["eval_max_tokens"] = ev.get("max_tokens")
    return out


__all__ = ["SECTIONS", "VERSION", "load_recipe"]
