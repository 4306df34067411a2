"""``orthoopt rotate``: learn (or draw) rotations for a model (default smollm2-135m) and save the rotated checkpoint.

The output folder holds a plain Hugging Face checkpoint (safetensors) with the rotations fused in,
``orthoopt/rotations.safetensors`` (in a subfolder, so that engines which load every top-level
``*.safetensors`` see only weights), ``report.json`` and ``loss_R1.png`` / ``loss_R2.png`` (+ SVG;
learned methods). It is written to a temporary folder and renamed into place. Long runs checkpoint their whole state every
``--checkpoint-every`` steps (and after each phase, or each layer with --streamed) to
``OUT_DIR.partial.safetensors``; ``--resume`` continues from it exactly (docs/guarantees.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import torch

from orthoopt.models.dtypes import dtype_name, resolve_model_dtype
from orthoopt.models.sources import PLANTED_CONFIG, input_location
from orthoopt.cli.memory_check import add_force, check_memory
from orthoopt.cli.usage import help_kwargs
from orthoopt.config import RotateConfig
from orthoopt.config import nest
from orthoopt.config_options import (FIELD_OF_DEST, MODEL_DTYPE, ROTATION_DTYPE, add_config_options, build_config,
                                      config_values, dest, resolve_dtypes)
from orthoopt.errors import InvalidInputError
from orthoopt.methods import METHODS, method, names
from orthoopt.core.grid import MAX_BITS, MIN_BITS
from orthoopt.pipeline import rotate_model, rotate_streamed
from orthoopt.utils.argtypes import integer
from orthoopt.utils.checks import check_device
from orthoopt.utils.paths import prepare_output
DEFAULT_MODEL = "smollm2-135m"
"""MODEL when none is given: the registered SmolLM2-135M (fetched into the cache on first use)."""
BITS = integer(MIN_BITS, MAX_BITS, also=(16,))  # 16 = off

DESCRIPTION = """\
Learn (or construct) orthogonal rotations for a model and save the rotated checkpoint.

R1 rotates the residual stream, R2 the value/output space of each attention head. Both are fused
into the weights: the output folder is a plain Hugging Face checkpoint (safetensors) that computes
the same function as the input and quantizes with less error; quantize it next with
'orthoopt quantize'. The folder also holds the rotations (orthoopt/rotations.safetensors),
report.json and, for learned methods, loss plots. It is written to a temporary folder and renamed
into place. Long runs save their state every --checkpoint-every steps to OUT.partial.safetensors;
--resume continues from it exactly.

"""
METHODS_HELP = ("Methods (docs/solvers.md). Fixed, no data: {fixed}. Learned from the weights alone: {free}. "
                "Learned with calibration text (--calib): {data}. SpinQuant's loss simulates the quantization "
                "given by the \"spinquant\" options below: use the same settings in 'orthoopt quantize'.")

EXAMPLES = (
    "orthoopt rotate smollm2-135m --out runs/rot --method optrot",
    "orthoopt rotate smollm2-135m --out runs/rot-h --method hadamard",
    "orthoopt rotate MODEL --out runs/rot-sq --method spinquant --calib calib.txt --wbits 4 --abits 8",
    "orthoopt rotate MODEL --out runs/rot --method optrot --resume  # continue an interrupted run",
)
DOCS = ("docs/objectives.md", "docs/solvers.md", "docs/adapters.md", "docs/performance.md", "docs/guarantees.md")


def load_default_or(path: str | None, dtype: torch.dtype, progress: bool = True):
    """``(model, tokenizer, description)`` of model source ``path`` (default :data:`DEFAULT_MODEL`;
    ``planted`` is the planted-outlier Llama, see :mod:`orthoopt.models.sources`)."""
    from orthoopt.models import load_model, load_tokenizer, resolve_source

    source = resolve_source(path or DEFAULT_MODEL, progress=progress)
    spec = str(source.path) if source.path is not None else source.spec
    description = f"planted-outlier llama {PLANTED_CONFIG}" if source.kind == "planted" else source.describe()
    return load_model(spec, dtype=dtype), load_tokenizer(spec), description


def add_parser(sub: argparse._SubParsersAction) -> None:
    kinds = {"fixed": names(lambda m: not m.learned), "free": names(lambda m: m.learned and not m.needs_calibration),
             "data": names(lambda m: m.needs_calibration)}
    description = DESCRIPTION + textwrap.fill(METHODS_HELP.format(**{k: ", ".join(v) for k, v in kinds.items()}), 100)
    p = sub.add_parser("rotate", help="learn rotations and save the rotated checkpoint",
                       **help_kwargs(description, EXAMPLES, DOCS))
    p.add_argument("model_dir", nargs="?", default=None, metavar="MODEL",
                   help=f"model folder, .gguf file, registered name or Hub id (default: {DEFAULT_MODEL}, fetched "
                        "on first use; 'planted' is the planted-outlier toy Llama)")
    p.add_argument("--model", dest="model_opt", default=None, metavar="MODEL", help="the same as the MODEL argument")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", choices=tuple(METHODS), default="optrot",
                   help="the rotation method (docs/solvers.md; default optrot): " + method_choices_help())
    p.add_argument("--calib", default=None, help=f"calibration text file (needed by "
                                                  f"{', '.join(names(lambda m: m.needs_calibration))})")
    add_rotate_options(p, p.add_argument_group(
        "spinquant", "the quantization SpinQuant's loss simulates (match it in 'orthoopt quantize')"))
    add_force(p)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=run)


def method_choices_help() -> str:
    """``"identity: no rotation ...; optrot: ..."``: every method of the registry, for help texts."""
    return "; ".join(f"{n}: {m.description.replace('`', '')}" for n, m in METHODS.items())


SIM_QUANT_OPTIONS = ("wbits", "abits", "act_asym", "kvbits", "r3", "online_hadamard")
"""The spinquant options that name a quantization setting (``orthoopt quantize --rotate`` takes them from
its own quantization settings instead)."""


HOW_TO_RUN_OPTIONS = ("init", "resume", "streamed")
"""Rotation options that are not :class:`~orthoopt.config.RotateConfig` fields: where to start and how to run."""


def add_rotate_options(p, spin, skip: tuple[str, ...] = ()) -> list[str]:
    """Add the rotation options of ``orthoopt rotate`` (all but MODEL, --out, --method, --calib, --json,
    --no-progress) to ``p`` and the spinquant ones to ``spin`` (parsers or argument groups).

    The :class:`~orthoopt.config.RotateConfig` fields' options come from
    :func:`orthoopt.config_options.add_config_options` (one flag, type, default and help per field,
    shared with ``python -m orthoopt.distributed_rotate``); ``--init``, ``--resume``, ``--streamed``
    and the spinquant quantization flags (the fields of
    :class:`~orthoopt.quant.rotated.SimQuantConfig`) are added here. ``orthoopt quantize --rotate``
    adds them too, from here, so that both commands take the same options; ``skip`` names the
    destinations it leaves out. Returns the destinations added.
    """
    streamed = ", ".join(names(lambda m: m.supports_streamed))
    added = add_config_options(p, skip=skip, groups={"spinquant": spin})

    def add(target, *flags, **kw) -> None:
        dest = kw.get("dest") or flags[0].lstrip("-").replace("-", "_")
        if dest not in skip:
            target.add_argument(*flags, **kw)
            added.append(dest)

    add(p, "--init", default=None, help="start from these rotations (a rotate output folder or its rotations file)")
    add(p, "--resume", action="store_true",
        help="continue from OUT.partial.safetensors if present (exact: whole solver state; "
             "refused if written with other settings)")
    add(p, "--streamed", action="store_true",
        help=f"{streamed} only: read MODEL_DIR's safetensors layer by layer and write sharded output, never "
             "holding the whole model (docs/performance.md)")
    add(spin, "--wbits", type=BITS, default=4, help="weight bits (RTN, straight-through; 16 = off); default 4")
    add(spin, "--abits", type=BITS, default=16, help="activation bits (16 = off); default 16")
    add(spin, "--act-asym", action="store_true", help="asymmetric per-token activation grid")
    add(spin, "--kvbits", type=BITS, default=16, help="K/V-cache bits (16 = off); default 16")
    add(spin, "--r3", action="store_true", help="online head-wise Hadamard on queries/keys after RoPE")
    add(spin, "--online-hadamard", action="store_true", help="online Hadamard before down_proj (R4)")
    return added


def _calibration(args, tokenizer, config: RotateConfig, model_config=None) -> torch.Tensor | None:
    """The windows a data method learns from (:func:`orthoopt.pipeline.calibration.rotation_calibration`, which
    ``orthoopt quantize --rotate`` uses too)."""
    from orthoopt.pipeline.calibration import rotation_calibration

    if method(args.method).needs_calibration and args.calib is None:
        raise InvalidInputError(f"method {args.method!r} needs calibration text: --calib TEXT_FILE (or hf:NAME[:CONFIG])")
    return rotation_calibration(config, args.calib, tokenizer, model_config)


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.safetensors")


def config_from_args(args: argparse.Namespace) -> RotateConfig:
    """The run's :class:`~orthoopt.config.RotateConfig` from ``orthoopt rotate``'s arguments (``--dtype auto``
    stands for float32 until :func:`_with_model_dtype` knows the checkpoint)."""
    check_device(args.device, "--device")
    values = config_values(args, [d for d in FIELD_OF_DEST if hasattr(args, d)])
    values = resolve_dtypes(values, lambda: "float32")
    entry = method(args.method)
    if entry.simulates_quantization:
        from orthoopt.quant.act import ActQuantConfig
        from orthoopt.quant.kv import KVQuantConfig
        from orthoopt.quant.rotated import SimQuantConfig

        values["spinquant.sim_quant"] = SimQuantConfig(
            wbits=args.wbits, act=ActQuantConfig(bits=args.abits, symmetric=not args.act_asym,
                                                 online_hadamard=args.online_hadamard),
            kv=KVQuantConfig(bits=args.kvbits, r3=args.r3))
        values["solve.schedule_steps"] = args.steps if args.steps is not None else entry.steps
    else:
        spin = [dest(p) for p, d in (("spinquant.batch_size", 1), ("spinquant.micro_batch_size", None))
                if values.get(p, d) != d]
        if spin:
            raise InvalidInputError(f"{', '.join('--' + d.replace('_', '-') for d in spin)} are for method "
                                    f"{', '.join(names(lambda m: m.simulates_quantization))}, not {args.method!r}")
        values.pop("spinquant.batch_size", None), values.pop("spinquant.micro_batch_size", None)
    return build_config(args.method, values)


def _check_memory(args: argparse.Namespace, config: RotateConfig, source, streamed: bool) -> None:
    from orthoopt.models.footprint import disk_estimate, rotate_estimate

    dtype = config.checkpoint.torch_dtype
    check_memory("orthoopt rotate", source, lambda ck: rotate_estimate(
        ck, dtype, streamed, learned=config.learned, can_stream=config.entry.supports_streamed,
        calib_tokens=config.calib.tokens if config.entry.per_phase_statistics else 0,
        statistics=config.entry.statistics),
        args.force, disk=lambda ck: disk_estimate(ck, dtype, rotations=True, scratch=streamed and config.entry.statistics == "hessians"),
        out=args.out)


def _with_model_dtype(args: argparse.Namespace, config: RotateConfig, source) -> RotateConfig:
    """``config`` with the weights' dtype resolved for ``source`` (``--dtype auto``: the checkpoint's)
    and, without ``--rotation-dtype``, float64 rotations for a float64 model."""
    values = resolve_dtypes({MODEL_DTYPE: args.dtype, ROTATION_DTYPE: args.rotation_dtype},
                            lambda: dtype_name(resolve_model_dtype(source, "auto")))
    if (values[MODEL_DTYPE], values[ROTATION_DTYPE]) == (config.checkpoint.dtype, config.compute.dtype):
        return config
    return config.replace(**nest(values))


def run(args: argparse.Namespace) -> int:
    from orthoopt.models import load_rotations

    config = config_from_args(args)
    if args.streamed:
        config.check_streamed()
    if args.model_opt is not None:
        if args.model_dir is not None and args.model_dir != args.model_opt:
            raise InvalidInputError(f"two models given: {args.model_dir!r} and --model {args.model_opt!r}")
        args.model_dir = args.model_opt
    out = Path(args.out)
    partial = _partial_path(out)
    # before any work: no output may be, contain or lie inside an input, and both must be writable
    model_dir = input_location(args.model_dir or DEFAULT_MODEL)
    resume_file = partial if args.resume and partial.is_file() else None
    inputs = {"MODEL_DIR": model_dir, "--calib": args.calib, "--init": args.init, "--resume file": resume_file}
    prepare_output(out, inputs, marker="report.json")
    prepare_output(partial, {k: v for k, v in inputs.items() if k != "--resume file"}, kind="file",
                   what="partial checkpoint")
    if args.streamed:
        from orthoopt.models import resolve_source

        resolved = resolve_source(args.model_dir or DEFAULT_MODEL, progress=not args.no_progress)
        if resolved.folder is None:
            raise InvalidInputError(f"--streamed needs a Hugging Face folder with safetensors weights (or a registered "
                             f"name), got {resolved.kind} {args.model_dir!r}")
        from orthoopt.models.io import check_model_folder

        check_model_folder(resolved.folder)
        args.model_dir = str(resolved.folder)
        config = _with_model_dtype(args, config, resolved)
        _check_memory(args, config, resolved, streamed=True)
        model, tokenizer, source, calib = None, None, resolved.describe(), None
        if config.entry.needs_calibration:  # cut here, so that a bad --calib fails before any work
            from transformers import AutoConfig

            from orthoopt.models.io import load_tokenizer

            tokenizer = load_tokenizer(resolved.folder, progress=not args.no_progress)
            calib = _calibration(args, tokenizer, config, AutoConfig.from_pretrained(resolved.folder))
    else:
        from orthoopt.models import resolve_source

        resolved = resolve_source(args.model_dir or DEFAULT_MODEL, progress=not args.no_progress)
        config = _with_model_dtype(args, config, resolved)
        _check_memory(args, config, resolved, streamed=False)
        model, tokenizer, source = load_default_or(args.model_dir, config.checkpoint.torch_dtype,
                                                   progress=not args.no_progress)
        calib = _calibration(args, tokenizer, config, model.config)
    init = load_rotations(args.init) if args.init else None

    def plots(folder: Path, solves: dict) -> None:
        from orthoopt.diagnostics import plot_solve_history

        for phase, res in solves.items():
            if res.history:
                plot_solve_history(res, title=f"orthoopt rotate --method {args.method}: {phase}",
                                   save=folder / f"loss_{phase}")

    def said_resumed(report: dict) -> None:
        if "resumed" in report:
            r = report["resumed"]
            print(f"orthoopt rotate: resumed from {partial} ({r['phase']}, step {r['steps_done']})", file=sys.stderr)

    def extras(folder: Path, res) -> None:
        said_resumed(res.report)
        plots(folder, res.solves)

    if args.streamed:
        result = rotate_streamed(args.model_dir, out, config, calib=calib, init=init, progress=not args.no_progress,
                                 checkpoint=partial, resume=args.resume, report_extra={"model": source}, extras=extras)
    else:
        ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(args.seed))
        result = rotate_model(model, config, calib=calib, init=init, verify_ids=ids, progress=not args.no_progress,
                              checkpoint=partial, resume=args.resume, out=out, tokenizer=tokenizer,
                              report_extra={"model": source}, extras=extras)
    return _finish(args, out, partial, result.report)


def _finish(args: argparse.Namespace, out: Path, partial: Path, report: dict) -> int:
    partial.unlink(missing_ok=True)
    if args.json:
        print(json.dumps(report, allow_nan=False))
    else:
        err = report.get("invariance_error")  # not checked in streamed mode (the model is never loaded)
        logit = "" if err is None else f"logit error {err:.2e}, "
        phases = ",".join(report.get("rotations") or [])
        print(f"orthoopt rotate: {args.method} ({phases}) on {report.get('model')} -> {out} in "
              f"{report['seconds']:.1f} s; {logit}orthogonality error {report['orthogonality_error']:.2e}",
              file=sys.stderr)
        for phase, loss in (report.get("loss") or {}).items():
            if loss.get("steps"):
                print(f"  {phase}: {loss['steps']} {report.get('solver')} steps, loss {loss['first']:.6g} -> "
                      f"{loss['final']:.6g}", file=sys.stderr)
    return 0
