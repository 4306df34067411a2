"""The settings of one ``rotate`` run: :class:`RotateConfig`, validated once, written into ``report.json``.

The settings are grouped by concern: the method, phases, seed and objective scope at the top, and
:class:`SolveConfig` (how the rotations are learned), :class:`CalibConfig` (how calibration text is
cut), :class:`ComputeConfig` (where and in what dtype the objective computes), :class:`SpinQuantConfig`
(what only spinquant takes) and :class:`CheckpointConfig` (the checkpoint read and written) as its
fields ``solve``, ``calib``, ``compute``, ``spinquant`` and ``checkpoint``.

One frozen dataclass is accepted by the Python API (:func:`orthoopt.pipeline.rotate_model`,
:func:`orthoopt.pipeline.rotate_streamed`), built from argv by ``orthoopt rotate``, ``orthoopt quantize
--rotate`` and ``python -m orthoopt.distributed_rotate``, and stored as JSON (``report.json["config"]``,
:meth:`RotateConfig.to_json` / :meth:`RotateConfig.from_json`). Constructing one validates it: a bad
field raises :class:`~orthoopt.errors.InvalidInputError` (a ValueError) naming the field. Each field
states its description and, where a command line sets it, its option (:func:`option`): the class
docstring and :mod:`orthoopt.config_options`, which builds the commands' argparse options, are made
from them, so a setting is named, typed and explained once. What each method needs and its defaults
come from the method registry, :data:`orthoopt.methods.METHODS` (the pipeline and the stores import
this module, never the other way). ``calib.tokens`` and ``calib.seq_len`` say how calibration text is
cut into windows: :func:`orthoopt.pipeline.calibration.rotation_calibration` reads them, for
``rotate_model(model, config, calib=TEXT, tokenizer=tok)``, ``orthoopt rotate --calib`` and
``orthoopt quantize --rotate``; token ids given directly are used as they are.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch

from orthoopt.errors import InvalidInputError
from orthoopt.utils.argtypes import integer, real

if TYPE_CHECKING:
    from orthoopt.quant.rotated import SimQuantConfig
from orthoopt.methods import METHODS, STATISTICS, Method, check_sampling, listing, names
from orthoopt.methods import method as method_entry

PHASES = ("R1", "R2")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""Rotation dtypes (``compute.dtype``)."""
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}
"""Model dtypes (``checkpoint.dtype``): the weights are read, fused and written in it (``docs/conventions.md``)."""
NOT_TRAJECTORY = ("solve.checkpoint_every", "checkpoint.layers_per_shard", "calib.seq_len")
"""Fields that do not change the learned rotations: a resume may change them."""


def _int(name: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise InvalidInputError(f"{name} must be an int >= {low}, got {v!r}")


def option(default: Any = MISSING, *, help: Any, flag: str | None = None, type: Any = None,
           choices: Any = None, flag_default: Any = MISSING, group: str | None = None,
           default_factory: Any = MISSING) -> Any:
    """A :class:`RotateConfig` field with its description and, where a command line sets it, its option.

    ``help`` (a str, or a callable giving one) documents the field (the class docstring and the
    option's help are made from it);
    ``flag`` (e.g. ``"--steps"``) makes it a command-line option, whose argparse ``type`` (a
    :mod:`orthoopt.utils.argtypes` parser), ``choices`` (a tuple, or a callable giving one) and
    ``group`` (``"spinquant"``) it states; ``flag_default`` is the command line's default where it
    differs from the field's (``--dtype auto``: the checkpoint's own, resolved once the model is known).
    :mod:`orthoopt.config_options` turns these into argparse options.
    """
    meta = {"help": help, "flag": flag, "type": type, "choices": choices, "flag_default": flag_default,
            "group": group}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _phases(text: str) -> tuple[str, ...]:
    """``--rotations`` parser: ``"R1,R2"`` -> ``("R1", "R2")``, refusing other names."""
    import argparse

    got = [s.strip() for s in text.split(",") if s.strip()]
    if not got or set(got) - set(PHASES):
        raise argparse.ArgumentTypeError(f"must name a comma-separated subset of {','.join(PHASES)}, got {text!r}")
    return tuple(p for p in PHASES if p in got)


def _solver_names() -> tuple[str, ...]:
    from orthoopt.solvers import SOLVERS

    return tuple(SOLVERS)


_LEARNED = lambda m: m.learned  # noqa: E731


def _sampling() -> str:
    return ", ".join(names(lambda m: m.sampling))


def help_text(f) -> str:
    """Field ``f``'s description: its ``help``, called when it is a callable (text derived from the method
    registry, read when a parser is built, so that a method registered later is listed)."""
    text = f.metadata["help"]
    return text() if callable(text) else text


def _bad_fields(kind: str, names: set[str]) -> InvalidInputError:
    return InvalidInputError(f"unknown {kind} fields {sorted(names)}")


def _group(cls: type, value: Any, where: str):
    """``value`` (a ``cls``, a mapping of its fields, or None for the defaults) as a ``cls``."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidInputError(f"{where} has unknown fields {sorted(unknown)}; it takes "
                                    f"{', '.join(f.name for f in fields(cls))}")
        return cls(**value)
    raise InvalidInputError(f"{where} must be a {cls.__name__} or a mapping of its fields, got {type(value).__name__}")


def _dtype_name(name: str, v: Any, allowed: Mapping[str, torch.dtype]) -> str:
    s = str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
    if s not in allowed:
        raise InvalidInputError(f"{name} must be one of {', '.join(allowed)}, got {v!r}")
    return s


@dataclass(frozen=True)
class SolveConfig:
    solver: str | None = option(None, flag="--solver", choices=_solver_names,
                                help=lambda: f"solver name (orthoopt.solvers.SOLVERS); default the method's "
                                             f"({listing(_LEARNED, lambda m: m.solver)}; docs/solvers.md)")
    steps: int | dict[str, int] | None = option(None, flag="--steps", type=integer(0),
                        help=lambda: f"solver steps per rotation phase (in Python also a {{phase: steps}} dict, a "
                                     f"phase missing taking 0); default the method's budget "
                                     f"({listing(_LEARNED, lambda m: m.steps)})")
    lr: float | None = option(None, flag="--lr", type=real(0, low_open=True),
                              help=lambda: f"solver step size; default the method's "
                                           f"({listing(lambda m: m.lr is not None, lambda m: m.lr)}, when no "
                                           "solver is given) or else the solver's")
    stop: dict[str, float] = option(help="stopping criteria of orthoopt.solvers.solve (min_grad_norm, "
                                         "min_rel_decrease, window, max_seconds)", default_factory=dict)
    schedule_steps: int | None = option(None, help="spinquant: length of the cosine learning-rate decay "
                                                   "(default the phase's steps)")
    checkpoint_every: int = option(0, flag="--checkpoint-every", type=integer(0), flag_default=25,
                                   help="steps between partial checkpoints (0: off; needs a checkpoint path, "
                                        "which the command line always has, hence its default 25); units also "
                                        "checkpoint at their ends")

    def __post_init__(self) -> None:
        put = object.__setattr__.__get__(self)
        if self.solver is not None:
            from orthoopt.solvers import SOLVERS

            if self.solver not in SOLVERS:
                raise InvalidInputError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        if isinstance(self.steps, Mapping):
            steps = {str(k): v for k, v in self.steps.items()}
            bad = set(steps) - set(PHASES)
            if bad:
                raise InvalidInputError(f"steps names unknown phases {sorted(bad)}; phases: {PHASES}")
            for k, v in steps.items():
                _int(f"steps[{k!r}]", v, 0)
            put("steps", steps)
        elif self.steps is not None:
            _int("steps", self.steps, 0)
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not self.lr > 0):
            raise InvalidInputError(f"lr must be a positive number, got {self.lr!r}")
        stop = dict(self.stop or {})
        unknown = set(stop) - {"min_grad_norm", "min_rel_decrease", "window", "max_seconds"}
        if unknown:
            raise InvalidInputError(f"stop has unknown criteria {sorted(unknown)}")
        put("stop", dict(sorted(stop.items())))
        if self.schedule_steps is not None:
            _int("schedule_steps", self.schedule_steps, 0)
        _int("checkpoint_every", self.checkpoint_every, 0)


@dataclass(frozen=True)
class CalibConfig:
    tokens: int = option(2048, flag="--calib-tokens", type=integer(1),
                         help="calibration tokens per objective of a data method")
    seq_len: int = option(256, flag="--calib-seq-len", type=integer(1),
                          help="calibration window length of a data method")

    def __post_init__(self) -> None:
        _int("calib.tokens", self.tokens, 1)
        _int("calib.seq_len", self.seq_len, 1)


@dataclass(frozen=True)
class ComputeConfig:
    dtype: str = option("float32", flag="--rotation-dtype", choices=tuple(DTYPES), flag_default=None,
                        help="dtype the rotations are learned in (float32 or float64; a torch.dtype is taken and "
                             "stored by name; the command line's default: float64 for a float64 model, else float32)")
    device: str | None = option(None, flag="--device",
                                help=lambda: "where the objective and solver compute, e.g. cuda (default the CPU; "
                                             "every learned method: "
                                             f"{', '.join(names(lambda m: m.simulates_quantization))} moves the whole model "
                                             "there while it is solved); weights are fused on the CPU")
    sample_fraction: float | None = option(None, flag="--sample-fraction", type=real(0, 1, low_open=True),
                                           help=lambda: f"{_sampling()}: use this fraction of the weight rows per step "
                                                        "(unbiased; docs/performance.md)")
    chunk_rows: int | None = option(None, flag="--chunk-rows", type=integer(1),
                                    help=lambda: f"{_sampling()}: weight rows per segment of the objective "
                                                 "(bounds its memory; docs/performance.md)")

    def __post_init__(self) -> None:
        from orthoopt.utils.checks import check_device

        object.__setattr__(self, "dtype", _dtype_name("compute.dtype", self.dtype, DTYPES))
        if self.device is not None:
            object.__setattr__(self, "device", str(self.device))
        check_device(self.device, "device")
        if self.sample_fraction is not None and not (
                isinstance(self.sample_fraction, (int, float)) and not isinstance(self.sample_fraction, bool)
                and 0 < self.sample_fraction <= 1):
            raise InvalidInputError(f"sample_fraction must be in (0, 1], got {self.sample_fraction!r}")
        if self.chunk_rows is not None:
            _int("chunk_rows", self.chunk_rows, 1)

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch.dtype."""
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class SpinQuantConfig:
    sim_quant: SimQuantConfig | None = option(None, help="the quantization the loss simulates "
                                              "(orthoopt.quant.rotated.SimQuantConfig, or a mapping of its fields; "
                                              "default W4 RTN per channel)")
    batch_size: int = option(1, flag="--batch-size", type=integer(1), group="spinquant",
                             help="spinquant: calibration windows per step")
    micro_batch_size: int | None = option(None, flag="--micro-batch-size", type=integer(1), group="spinquant",
                                          help="spinquant: windows per backward pass (default the batch size)")

    def __post_init__(self) -> None:
        if isinstance(self.sim_quant, Mapping):
            object.__setattr__(self, "sim_quant", _sim_quant_from_dict(self.sim_quant))
        _int("batch_size", self.batch_size, 1)
        if self.micro_batch_size is not None:
            _int("micro_batch_size", self.micro_batch_size, 1)

    @property
    def is_default(self) -> bool:
        """True when nothing is set (what every method but spinquant requires)."""
        return self.sim_quant is None and self.batch_size == 1 and self.micro_batch_size is None


@dataclass(frozen=True)
class CheckpointConfig:
    dtype: str = option("float32", flag="--dtype", choices=("auto", *MODEL_DTYPES), flag_default="auto",
                        help="dtype the weights are read, fused and written in; products with the rotations are "
                             "formed in float64 per tensor (docs/conventions.md). The command line's default, "
                             "auto, is the checkpoint's own dtype, so a bfloat16 checkpoint stays bfloat16; "
                             "rotate_model records the loaded model's dtype here")
    layers_per_shard: int = option(1, flag="--layers-per-shard", type=integer(1),
                                   help="streamed (safetensors) runs only: decoder layers per output shard")
    arch: str | None = option(None, help="streamed only: architecture override (a key of the architecture table)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _dtype_name("checkpoint.dtype", self.dtype, MODEL_DTYPES))
        _int("layers_per_shard", self.layers_per_shard, 1)

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch.dtype."""
        return MODEL_DTYPES[self.dtype]


GROUPS = {"solve": SolveConfig, "calib": CalibConfig, "compute": ComputeConfig, "spinquant": SpinQuantConfig,
          "checkpoint": CheckpointConfig}
"""RotateConfig's groups by concern: ``{field: class}``."""


def _nested(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help, "flag": None, "group": None, "nested": cls})


@dataclass(frozen=True)
class RotateConfig:
    method: str = option("optrot", help="the rotation method, a key of orthoopt.methods.METHODS "
                         "(docs/solvers.md, docs/objectives.md)")
    rotations: tuple[str, ...] = option(PHASES, flag="--rotations", type=_phases,
                                        help="the phases to run, a subset of R1,R2 kept in that order (default both)")
    seed: int = option(0, flag="--seed", type=integer(0),
                       help="seeds the random Hadamard start, fixed rotations, row sampling and calibration windows")
    include_embeddings: bool = option(False, flag="--include-embeddings",
                                      help="also count embed_tokens / lm_head in learned objectives (the other "
                                           "blocks the architecture table keeps in full precision, MoE routers, "
                                           "never count)")
    solve: SolveConfig = _nested(SolveConfig, "how the rotations are learned: solver, steps, step size, stopping, "
                                              "checkpoints (SolveConfig, or a mapping of its fields)")
    calib: CalibConfig = _nested(CalibConfig, "how calibration text is cut for a data method: tokens, window "
                                              "length (CalibConfig, or a mapping)")
    compute: ComputeConfig = _nested(ComputeConfig, "where and how the objective computes: rotation dtype, "
                                                    "device, row sampling, chunking (ComputeConfig, or a mapping)")
    spinquant: SpinQuantConfig = _nested(SpinQuantConfig, "the settings only spinquant takes: simulated "
                                                          "quantization, batch sizes (SpinQuantConfig, or a mapping)")
    checkpoint: CheckpointConfig = _nested(CheckpointConfig, "the checkpoint read and written: weights' dtype, "
                                                             "shards, architecture (CheckpointConfig, or a mapping)")

    def __post_init__(self) -> None:
        put = object.__setattr__.__get__(self)  # frozen: normalize in place once
        rot = self.rotations
        rots = [rot] if isinstance(rot, str) else list(rot)
        if set(rots) - set(PHASES) or not rots:
            raise InvalidInputError(f"rotations must be a non-empty subset of {PHASES}, got {sorted(set(rots))}")
        put("rotations", tuple(p for p in PHASES if p in set(rots)))
        for name, cls in GROUPS.items():
            put(name, _group(cls, getattr(self, name), name))
        _int("seed", self.seed, 0)
        if not isinstance(self.include_embeddings, bool):
            raise InvalidInputError(f"include_embeddings must be a bool, got {self.include_embeddings!r}")
        entry = self.entry
        if self.solve.steps is None:
            put("solve", replace(self.solve, steps=entry.steps))
        if not entry.simulates_quantization and not self.spinquant.is_default:
            raise InvalidInputError(f"spinquant settings (sim_quant, batch_size, micro_batch_size) are for method "
                                    f"{', '.join(map(repr, names(lambda m: m.simulates_quantization)))}, "
                                    f"not {self.method!r}")
        if entry.simulates_quantization and self.spinquant.sim_quant is None:
            from orthoopt.quant.rotated import SimQuantConfig

            put("spinquant", replace(self.spinquant, sim_quant=SimQuantConfig()))
        check_sampling(entry, self.compute.sample_fraction, self.compute.device)

    # ---------------------------------------------------------------------------------------------
    @property
    def entry(self) -> Method:
        """The method's registry entry (:class:`orthoopt.methods.Method`)."""
        return method_entry(self.method)

    @property
    def learned(self) -> bool:
        return self.entry.learned

    @property
    def solver_name(self) -> str | None:
        """The solver a learned method uses (None for a fixed method)."""
        return (self.solve.solver or self.entry.solver) if self.learned else None

    @property
    def effective_lr(self) -> float | None:
        """``solve.lr``, or the method's published default when neither lr nor solver is given."""
        if self.solve.lr is None and self.solve.solver is None:
            return self.entry.lr
        return self.solve.lr

    def phase_steps(self) -> dict[str, int]:
        """``{phase: steps}`` for the selected phases (0 where a dict leaves one out)."""
        steps = self.solve.steps
        if isinstance(steps, Mapping):
            return {p: int(steps.get(p, 0)) for p in self.rotations}
        return {p: int(steps) for p in self.rotations}

    def replace(self, **changes: Any) -> "RotateConfig":
        """A copy with ``changes``: a top-level field's new value, or for a group a mapping of the
        fields that change (``config.replace(checkpoint={"dtype": "bfloat16"}, seed=1)``); validated."""
        out = {}
        for k, v in changes.items():
            if k in GROUPS and isinstance(v, Mapping):
                v = replace(getattr(self, k), **v)
            out[k] = v
        unknown = set(out) - {f.name for f in fields(self)}
        if unknown:
            raise _bad_fields("RotateConfig", unknown)
        return replace(self, **out)

    def check_streamed(self) -> None:
        """Raise ValueError unless a safetensors (streamed) store can run this config."""
        entry = self.entry
        if not entry.supports_streamed:
            why = ("reads " + STATISTICS[entry.statistics]) if entry.needs_calibration else "has no streamed objective"
            raise InvalidInputError(f"streamed mode supports methods {', '.join(names(lambda m: m.supports_streamed))} "
                             f"(they need one layer at a time: its weights, or its inputs on calibration text); "
                             f"method {self.method!r} {why}: run it in memory (without --streamed)")

    def to_json(self) -> dict:
        """A JSON-able dict, one object per group; :meth:`from_json` gives back an equal config."""
        out: dict = {"method": self.method, "rotations": list(self.rotations), "seed": self.seed,
                     "include_embeddings": self.include_embeddings}
        for name in GROUPS:
            group = getattr(self, name)
            values = {f.name: getattr(group, f.name) for f in fields(group)}
            if name == "spinquant":
                values["sim_quant"] = None if group.sim_quant is None else group.sim_quant.to_dict()
            out[name] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in values.items()}
        json.dumps(out, allow_nan=False)
        return out

    @classmethod
    def from_json(cls, d: Mapping) -> "RotateConfig":
        """The config :meth:`to_json` wrote, or a flat one written before the groups (``report.json``
        of orthoopt before 2026-12, every field at the top level; read through :data:`FLAT_FIELDS`).
        ValueError naming unknown fields."""
        d = dict(d)
        if set(d) & set(FLAT_FIELDS):
            d = _from_flat(d)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise _bad_fields("RotateConfig", unknown)
        if "rotations" in d:
            d["rotations"] = tuple(d["rotations"])
        return cls(**d)

    def trajectory(self) -> dict:
        """The settings the learned rotations depend on, flat with dotted names (``"solve.steps"``),
        for refusing a foreign partial checkpoint; :data:`NOT_TRAJECTORY` left out."""
        return {k: v for k, v in flatten(self.to_json()).items() if k not in NOT_TRAJECTORY}


FLAT_FIELDS = {"solver": "solve.solver", "steps": "solve.steps", "lr": "solve.lr", "stop": "solve.stop",
               "schedule_steps": "solve.schedule_steps", "checkpoint_every": "solve.checkpoint_every",
               "calib_tokens": "calib.tokens", "calib_seq_len": "calib.seq_len", "dtype": "compute.dtype",
               "device": "compute.device", "sample_fraction": "compute.sample_fraction",
               "chunk_rows": "compute.chunk_rows", "sim_quant": "spinquant.sim_quant",
               "batch_size": "spinquant.batch_size", "micro_batch_size": "spinquant.micro_batch_size",
               "model_dtype": "checkpoint.dtype", "layers_per_shard": "checkpoint.layers_per_shard",
               "arch": "checkpoint.arch"}
"""The flat fields of configs written before the groups, and where each went."""


def _from_flat(d: dict) -> dict:
    return nest({FLAT_FIELDS.get(k, k): v for k, v in d.items()})


def flatten(d: Mapping) -> dict:
    """``{"solve": {"steps": 5}}`` -> ``{"solve.steps": 5}`` (the groups of a :meth:`RotateConfig.to_json`)."""
    out = {}
    for k, v in d.items():
        if k in GROUPS and isinstance(v, Mapping):
            out.update({f"{k}.{n}": x for n, x in v.items()})
        else:
            out[k] = v
    return out


def nest(values: Mapping[str, Any]) -> dict:
    """``{"solve.steps": 5, "seed": 1}`` -> ``{"solve": {"steps": 5}, "seed": 1}``: RotateConfig keyword
    arguments from dotted field paths (the command-line options, :mod:`orthoopt.config_options`)."""
    out: dict = {}
    for path, v in values.items():
        if "." in path:
            group, name = path.split(".", 1)
            out.setdefault(group, {})[name] = v
        else:
            out[path] = v
    return out


def _docstring(cls: type, summary: list[str]) -> str:
    """A class docstring: ``summary`` and a numpydoc Parameters section made from the fields' ``help``."""
    lines = [*summary, "", "Parameters", "----------"]
    for f in fields(cls):
        flag = f" Option ``{f.metadata['flag']}``." if f.metadata.get("flag") else ""
        lines += [f"{f.name} : {f.type}", *textwrap.wrap(help_text(f) + "." + flag, 96,
                                                         initial_indent="    ", subsequent_indent="    ")]
    return "\n".join(lines)


RotateConfig.__doc__ = _docstring(RotateConfig, [
    "Everything a ``rotate`` run's result depends on, besides the model, calibration and init data.", "",
    "The settings are grouped by concern (:data:`GROUPS`): ``RotateConfig(\"optrot\", seed=1,",
    "solve=SolveConfig(steps=50))``, or with a mapping for a group, ``solve={\"steps\": 50}``. Constructing",
    "one validates it (:class:`~orthoopt.errors.InvalidInputError` naming the field); ``orthoopt rotate``",
    "and ``python -m orthoopt.distributed_rotate`` build their options from the fields",
    "(:mod:`orthoopt.config_options`; a field's option is named at the end of its text)."])
for _name, _cls in GROUPS.items():
    _cls.__doc__ = _docstring(_cls, [f"The ``{_name}`` group of :class:`RotateConfig`: "
                                     f"{help_text(next(f for f in fields(RotateConfig) if f.name == _name))}."])


def _sim_quant_from_dict(d: Mapping):
    from orthoopt.quant.act import ActQuantConfig
    from orthoopt.quant.kv import KVQuantConfig
    from orthoopt.quant.rotated import SimQuantConfig

    d = dict(d)
    unknown = set(d) - {"wbits", "w_group_size", "w_sym", "w_mse", "act", "kv"}
    if unknown:
        raise InvalidInputError(f"sim_quant has unknown fields {sorted(unknown)}")
    if "act" in d:
        d["act"] = ActQuantConfig.from_dict(d["act"])
    if "kv" in d:
        d["kv"] = KVQuantConfig.from_dict(d["kv"])
    return SimQuantConfig(**d)


__all__ = ["CalibConfig", "CheckpointConfig", "ComputeConfig", "DTYPES", "FLAT_FIELDS", "GROUPS", "METHODS", "MODEL_DTYPES",
           "PHASES", "RotateConfig", "SolveConfig", "SpinQuantConfig", "flatten", "nest"]
