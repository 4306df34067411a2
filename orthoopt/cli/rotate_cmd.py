"""``orthoopt rotate``: learn (or draw) rotations for a model (default smollm2-135m) and save the rotated checkpoint.

The output folder holds a plain Hugging Face checkpoint (safetensors) with the rotations fused in,
``rotations.safetensors``, ``report.json`` and ``loss_R1.png`` / ``loss_R2.png`` (+ SVG; learned methods). It is written to a
temporary folder and renamed into place. Long runs checkpoint their rotations every
``--checkpoint-every`` steps to ``OUT_DIR.partial.safetensors``; ``--resume`` starts from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from orthoopt.adapters.sources import PLANTED_CONFIG, input_location
from orthoopt.pipeline import DATA_METHODS, METHODS, PHASES, rotate_model
from orthoopt.solvers import SOLVERS
from orthoopt.utils.atomic import atomic_path
from orthoopt.utils.checks import check_device
from orthoopt.utils.paths import prepare_output
from orthoopt.utils.tensorfile import read_safetensors, safetensors_metadata

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_MODEL = "smollm2-135m"
"""MODEL when none is given: the registered SmolLM2-135M (fetched into the cache on first use)."""
DEFAULT_PLANTED = PLANTED_CONFIG


def load_default_or(path: str | None, dtype: torch.dtype, progress: bool = True):
    """``(model, tokenizer, description)`` of model source ``path`` (default :data:`DEFAULT_MODEL`;
    ``planted`` is the planted-outlier Llama, see :mod:`orthoopt.adapters.sources`)."""
    from orthoopt.adapters import load_model, load_tokenizer, resolve_source

    source = resolve_source(path or DEFAULT_MODEL, progress=progress)
    spec = str(source.path) if source.path is not None else source.spec
    description = f"planted-outlier llama {PLANTED_CONFIG}" if source.kind == "planted" else source.describe()
    return load_model(spec, dtype=dtype), load_tokenizer(spec), description


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rotate", help="learn rotations and save the rotated checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", nargs="?", default=None, metavar="MODEL",
                   help=f"model folder, .gguf file, registered name or Hub id (default: {DEFAULT_MODEL}, fetched "
                        "on first use; 'planted' is the planted-outlier toy Llama)")
    p.add_argument("--model", dest="model_opt", default=None, metavar="MODEL", help="the same as the MODEL argument")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", choices=METHODS, default="optrot")
    p.add_argument("--rotations", default="R1,R2", help="comma-separated subset of R1,R2 (default: both)")
    p.add_argument("--solver", choices=tuple(SOLVERS), default=None,
                   help="default: the method's (docs/solvers.md)")
    p.add_argument("--steps", type=int, default=100, help="solver steps per rotation phase")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--calib", default=None, help="calibration text file (optrot+, kurtosis, dfrot)")
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="dtype of the model and of the learned rotations")
    p.add_argument("--include-embeddings", action="store_true",
                   help="also count embed_tokens/lm_head (kept in full precision) in learned objectives")
    p.add_argument("--init", default=None, help="start from these rotations (a rotations.safetensors)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT.partial.safetensors if present (exact: whole solver state; "
                        "refused if written with other settings)")
    p.add_argument("--checkpoint-every", type=int, default=25, help="steps between partial checkpoints (0: off)")
    p.add_argument("--streamed", action="store_true",
                   help="optrot only: read MODEL_DIR's safetensors layer by layer and write sharded output, "
                        "never holding the whole model (docs/performance.md)")
    p.add_argument("--device", default=None, help="optrot: where the objective and solver compute, e.g. cuda")
    p.add_argument("--sample-fraction", type=float, default=None,
                   help="optrot: use this fraction of the weight rows per step (unbiased; docs/performance.md)")
    q = p.add_argument_group("spinquant", "the quantization SpinQuant's loss simulates (match it in `orthoopt quantize`)")
    q.add_argument("--wbits", type=int, default=4, help="weight bits (RTN, straight-through; 16 = off); default 4")
    q.add_argument("--abits", type=int, default=16, help="activation bits (16 = off); default 16")
    q.add_argument("--act-asym", action="store_true", help="asymmetric per-token activation grid")
    q.add_argument("--kvbits", type=int, default=16, help="K/V-cache bits (16 = off); default 16")
    q.add_argument("--r3", action="store_true", help="online head-wise Hadamard on queries/keys after RoPE")
    q.add_argument("--online-hadamard", action="store_true", help="online Hadamard before down_proj (R4)")
    q.add_argument("--batch-size", type=int, default=1, help="calibration windows per step; default 1")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=run)


def _calibration(args, tokenizer, model_config=None) -> torch.Tensor | None:
    if args.method not in DATA_METHODS:
        return None
    if args.calib is None:
        raise ValueError(f"method {args.method!r} needs calibration text: --calib TEXT_FILE")
    if tokenizer is None:
        raise ValueError(f"method {args.method!r} needs a tokenizer in the model folder to read --calib")
    from orthoopt.quant.calib import calibration_batches, check_context

    seq_len = min(args.calib_seq_len, args.calib_tokens)
    nsamples = max(1, -(-args.calib_tokens // seq_len))
    check_context(model_config, seq_len, "--calib-seq-len")
    return calibration_batches(args.calib, tokenizer, nsamples=nsamples, seq_len=seq_len, seed=args.seed)


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.safetensors")


def _read_partial(path: Path) -> tuple[dict[str, torch.Tensor], tuple[str, int]]:
    """Rotations of a partial checkpoint and the (phase, steps done) it was written at."""
    meta = safetensors_metadata(path, "resume file")
    if meta.get("phase") not in PHASES or not meta.get("step", "").isdigit():
        raise ValueError(f"{path} is not an orthoopt partial checkpoint (metadata {meta})")
    return read_safetensors(path, "resume file"), (meta["phase"], int(meta["step"]))


def run(args: argparse.Namespace) -> int:
    from orthoopt.adapters import load_rotations, save_rotated

    phases = [s.strip() for s in args.rotations.split(",") if s.strip()]
    if not phases or set(phases) - set(PHASES):
        raise ValueError(f"--rotations must name a subset of {','.join(PHASES)}, got {args.rotations!r}")
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    if args.method in DATA_METHODS and (args.calib_tokens < 1 or args.calib_seq_len < 1):
        raise ValueError(f"--calib-tokens and --calib-seq-len must be >= 1, got {args.calib_tokens} and "
                         f"{args.calib_seq_len}")
    check_device(args.device, "--device")
    if args.model_opt is not None:
        if args.model_dir is not None and args.model_dir != args.model_opt:
            raise ValueError(f"two models given: {args.model_dir!r} and --model {args.model_opt!r}")
        args.model_dir = args.model_opt
    out = Path(args.out)
    partial = _partial_path(out)
    dtype = DTYPES[args.dtype]
    # before any work: no output may be, contain or lie inside an input, and both must be writable
    model_dir = input_location(args.model_dir or DEFAULT_MODEL)
    resume_file = partial if args.resume and partial.is_file() else None
    inputs = {"MODEL_DIR": model_dir, "--calib": args.calib, "--init": args.init, "--resume file": resume_file}
    prepare_output(out, inputs, marker="report.json")
    prepare_output(partial, {k: v for k, v in inputs.items() if k != "--resume file"}, kind="file",
                   what="partial checkpoint")
    if args.streamed:
        from orthoopt.adapters import resolve_source

        if args.method != "optrot":
            raise ValueError(f"--streamed supports --method optrot only (data-free), got {args.method!r}")
        resolved = resolve_source(args.model_dir or DEFAULT_MODEL, progress=not args.no_progress)
        if resolved.folder is None:
            raise ValueError(f"--streamed needs a Hugging Face folder with safetensors weights (or a registered "
                             f"name), got {resolved.kind} {args.model_dir!r}")
        args.model_dir = str(resolved.folder)
        model, tokenizer, source, calib = None, None, resolved.describe(), None
    else:
        model, tokenizer, source = load_default_or(args.model_dir, dtype, progress=not args.no_progress)
        calib = _calibration(args, tokenizer, model.config)

    init = load_rotations(args.init) if args.init else None
    steps: int | dict[str, int] = args.steps
    resumed = None
    done_before = {p: 0 for p in PHASES}  # steps a resumed phase had already taken (streamed runs)
    if args.streamed and args.resume and partial.is_file():
        init, (phase, done) = _read_partial(partial)
        if done > args.steps:
            raise ValueError(f"--steps {args.steps} is below the {done} steps of phase {phase} already done in "
                             f"{partial}; pass --steps {done} or more to continue, or drop --resume to start over")
        # phases before the checkpointed one are complete; the checkpointed one has `done` steps
        steps = {p: (0 if PHASES.index(p) < PHASES.index(phase) else args.steps - done if p == phase else args.steps)
                 for p in phases}
        done_before[phase] = done
        resumed = {"from": str(partial), "phase": phase, "steps_done": done}
        print(f"orthoopt rotate: resuming from {partial} ({phase}, step {done})", file=sys.stderr)

    def checkpoint(phase: str, step: int, loss: float, rotations: dict) -> None:
        """Streamed runs: rotations-only partial checkpoints (in-memory runs save the whole state in
        the pipeline, orthoopt.resume)."""
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            tensors = {k: v.detach().cpu().contiguous() for k, v in rotations.items()}
            with atomic_path(partial) as tmp:
                save_file(tensors, str(tmp), metadata={"phase": phase, "step": str(step + 1 + done_before[phase])})

    def plots(folder: Path, solves: dict) -> None:
        from orthoopt.diagnostics import plot_solve_history

        for phase, res in solves.items():
            if res.history:
                plot_solve_history(res, title=f"orthoopt rotate --method {args.method}: {phase}",
                                   save=folder / f"loss_{phase}")

    if args.streamed:
        from orthoopt.streaming import rotate_streamed

        result = rotate_streamed(args.model_dir, out, args.method, phases, solver=args.solver, steps=steps, lr=args.lr,
                                 seed=args.seed, init=init, dtype=dtype, model_dtype=dtype,
                                 sample_fraction=args.sample_fraction, device=args.device,
                                 include_embeddings=args.include_embeddings, progress=not args.no_progress,
                                 callback=checkpoint,
                                 report_extra={"model": source, **({"resumed": resumed} if resumed else {})},
                                 extras=lambda folder, res: plots(folder, res.solves))
        return _finish(args, out, partial, result.report)
    spin = {}
    if args.method == "spinquant":
        from orthoopt.quant.act import ActQuantConfig
        from orthoopt.quant.kv import KVQuantConfig
        from orthoopt.quant.rotated import SimQuantConfig

        spin = {"sim_quant": SimQuantConfig(
            wbits=args.wbits, act=ActQuantConfig(bits=args.abits, symmetric=not args.act_asym,
                                                 online_hadamard=args.online_hadamard),
            kv=KVQuantConfig(bits=args.kvbits, r3=args.r3)), "batch_size": args.batch_size,
            "schedule_steps": args.steps}
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(args.seed))
    result = rotate_model(model, args.method, phases, solver=args.solver, steps=steps, lr=args.lr,
                          seed=args.seed, calib=calib, calib_tokens=args.calib_tokens, init=init,
                          verify_ids=ids, dtype=dtype, include_embeddings=args.include_embeddings,
                          sample_fraction=args.sample_fraction, device=args.device,
                          progress=not args.no_progress, checkpoint=partial,
                          checkpoint_every=args.checkpoint_every, resume=args.resume, **spin)
    report = {"model": source, **result.report}
    if "resumed" in report:
        r = report["resumed"]
        print(f"orthoopt rotate: resumed from {partial} ({r['phase']}, step {r['steps_done']})", file=sys.stderr)

    save_rotated(model, tokenizer, out, result.rotations, report, extras=lambda folder: plots(folder, result.solves))
    return _finish(args, out, partial, report)


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
