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

from orthoopt.models.dtypes import DTYPE_CHOICES, dtype_name, parse_dtype, resolve_model_dtype
from orthoopt.models.sources import PLANTED_CONFIG, input_location
from orthoopt.cli.memory_check import add_force, check_memory
from orthoopt.cli.usage import help_kwargs
from orthoopt.config import DTYPES, PHASES, RotateConfig
from orthoopt.errors import InvalidInputError
from orthoopt.methods import METHODS, listing, method, names
from orthoopt.core.grid import MAX_BITS, MIN_BITS
from orthoopt.pipeline import rotate_model, rotate_streamed
from orthoopt.solvers import SOLVERS
from orthoopt.utils.argtypes import integer, real
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
    p.add_argument("--seed", type=integer(0), default=0)
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


def add_rotate_options(p, spin, skip: tuple[str, ...] = ()) -> list[str]:
    """Add the rotation options of ``orthoopt rotate`` (all but MODEL, --out, --method, --calib, --seed,
    --json, --no-progress) to ``p`` and the spinquant ones to ``spin`` (parsers or argument groups).

    ``orthoopt quantize --rotate`` adds them too, from here, so that both commands take the same
    options; ``skip`` names the destinations it leaves out. Returns the destinations added.
    """
    learned = lambda m: m.learned  # noqa: E731
    added: list[str] = []

    def add(target, *flags, **kw) -> None:
        dest = kw.get("dest") or flags[0].lstrip("-").replace("-", "_")
        if dest not in skip:
            target.add_argument(*flags, **kw)
            added.append(dest)

    add(p, "--rotations", default="R1,R2", help="comma-separated subset of R1,R2 (default: both)")
    add(p, "--solver", choices=tuple(SOLVERS), default=None,
        help=f"default: the method's ({listing(learned, lambda m: m.solver)}; docs/solvers.md)")
    add(p, "--steps", type=integer(0), default=None,
        help=f"solver steps per rotation phase; default the method's budget "
             f"({listing(learned, lambda m: m.steps)}: docs/solvers.md)")
    add(p, "--lr", type=real(0, low_open=True), default=None,
        help=f"solver step size; default the solver's ({listing(lambda m: m.lr is not None, lambda m: m.lr)} "
             "when no --solver is given)")
    add(p, "--calib-tokens", type=integer(1), default=2048, help="calibration tokens of a data method; default 2048")
    add(p, "--calib-seq-len", type=integer(1), default=256,
        help="calibration window length of a data method; default 256")
    add(p, "--dtype", choices=DTYPE_CHOICES, default="auto",
        help="dtype the model is loaded, fused and written in (auto, the default: the checkpoint's own, so a "
             "bfloat16 checkpoint stays bfloat16; docs/conventions.md)")
    add(p, "--rotation-dtype", choices=tuple(DTYPES), default=None,
        help="dtype the rotations are learned in (default float32; float64 for a float64 model)")
    add(p, "--include-embeddings", action="store_true",
        help="also count embed_tokens/lm_head (kept in full precision) in learned objectives")
    add(p, "--init", default=None, help="start from these rotations (a rotate output folder or its rotations file)")
    add(p, "--resume", action="store_true",
        help="continue from OUT.partial.safetensors if present (exact: whole solver state; "
             "refused if written with other settings)")
    add(p, "--checkpoint-every", type=integer(0), default=25, help="steps between partial checkpoints (0: off)")
    add(p, "--streamed", action="store_true",
        help=f"{', '.join(names(lambda m: m.supports_streamed))} only: read MODEL_DIR's safetensors layer "
             "by layer and write sharded output, never holding the whole model (docs/performance.md)")
    sampling = ", ".join(names(lambda m: m.sampling))
    add(p, "--device", default=None, help=f"{sampling}: where the objective and solver compute, e.g. cuda")
    add(p, "--sample-fraction", type=real(0, 1, low_open=True), default=None,
        help=f"{sampling}: use this fraction of the weight rows per step (unbiased; docs/performance.md)")
    add(spin, "--wbits", type=BITS, default=4, help="weight bits (RTN, straight-through; 16 = off); default 4")
    add(spin, "--abits", type=BITS, default=16, help="activation bits (16 = off); default 16")
    add(spin, "--act-asym", action="store_true", help="asymmetric per-token activation grid")
    add(spin, "--kvbits", type=BITS, default=16, help="K/V-cache bits (16 = off); default 16")
    add(spin, "--r3", action="store_true", help="online head-wise Hadamard on queries/keys after RoPE")
    add(spin, "--online-hadamard", action="store_true", help="online Hadamard before down_proj (R4)")
    add(spin, "--batch-size", type=integer(1), default=1, help="calibration windows per step; default 1")
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
    """The run's :class:`~orthoopt.config.RotateConfig` from ``orthoopt rotate``'s arguments."""
    phases = [s.strip() for s in args.rotations.split(",") if s.strip()]
    if not phases or set(phases) - set(PHASES):
        raise InvalidInputError(f"--rotations must name a subset of {','.join(PHASES)}, got {args.rotations!r}")
    if args.steps is not None and args.steps < 0:
        raise InvalidInputError(f"--steps must be >= 0, got {args.steps}")
    if method(args.method).needs_calibration and (args.calib_tokens < 1 or args.calib_seq_len < 1):
        raise InvalidInputError(f"--calib-tokens and --calib-seq-len must be >= 1, got {args.calib_tokens} and "
                         f"{args.calib_seq_len}")
    if args.checkpoint_every < 0:
        raise InvalidInputError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    check_device(args.device, "--device")
    spin = {}
    if method(args.method).simulates_quantization:
        from orthoopt.quant.act import ActQuantConfig
        from orthoopt.quant.kv import KVQuantConfig
        from orthoopt.quant.rotated import SimQuantConfig

        spin = {"sim_quant": SimQuantConfig(
            wbits=args.wbits, act=ActQuantConfig(bits=args.abits, symmetric=not args.act_asym,
                                                 online_hadamard=args.online_hadamard),
            kv=KVQuantConfig(bits=args.kvbits, r3=args.r3)), "batch_size": args.batch_size,
            "schedule_steps": args.steps if args.steps is not None else method(args.method).steps}
    model_dtype = parse_dtype(args.dtype)  # None (auto): the checkpoint's, set once it is resolved (run)
    model_dtype = "float32" if model_dtype is None else dtype_name(model_dtype)
    rotation_dtype = args.rotation_dtype or ("float64" if model_dtype == "float64" else "float32")
    return RotateConfig(method=args.method, rotations=tuple(phases), solver=args.solver, steps=args.steps,
                        lr=args.lr, seed=args.seed, dtype=rotation_dtype, device=args.device,
                        include_embeddings=args.include_embeddings, sample_fraction=args.sample_fraction,
                        calib_tokens=args.calib_tokens, calib_seq_len=args.calib_seq_len,
                        checkpoint_every=args.checkpoint_every, model_dtype=model_dtype, **spin)


def _check_memory(args: argparse.Namespace, config: RotateConfig, source, streamed: bool) -> None:
    from orthoopt.models.footprint import rotate_estimate

    check_memory("orthoopt rotate", source, lambda ck: rotate_estimate(
        ck, config.torch_model_dtype, streamed, learned=config.learned, can_stream=config.entry.supports_streamed),
        args.force)


def _with_model_dtype(args: argparse.Namespace, config: RotateConfig, source) -> RotateConfig:
    """``config`` with ``model_dtype`` resolved for ``source`` (``--dtype auto``: the checkpoint's) and,
    without ``--rotation-dtype``, float64 rotations for a float64 model."""
    from dataclasses import replace

    model_dtype = dtype_name(resolve_model_dtype(source, args.dtype))
    rotation_dtype = args.rotation_dtype or ("float64" if model_dtype == "float64" else "float32")
    if (model_dtype, rotation_dtype) == (config.model_dtype, config.dtype):
        return config
    return replace(config, model_dtype=model_dtype, dtype=rotation_dtype)


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
    else:
        from orthoopt.models import resolve_source

        resolved = resolve_source(args.model_dir or DEFAULT_MODEL, progress=not args.no_progress)
        config = _with_model_dtype(args, config, resolved)
        _check_memory(args, config, resolved, streamed=False)
        model, tokenizer, source = load_default_or(args.model_dir, config.torch_model_dtype,
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
        result = rotate_streamed(args.model_dir, out, config, init=init, progress=not args.no_progress,
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
