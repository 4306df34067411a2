"""``orthoopt rotate``: learn (or draw) rotations for a model folder and save the rotated checkpoint.

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
from safetensors.torch import load_file, save_file

from orthoopt.pipeline import DATA_METHODS, METHODS, PHASES, rotate_model
from orthoopt.utils.atomic import atomic_path

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_PLANTED = {"arch": "llama", "hidden_size": 512, "num_layers": 8, "seed": 0}


def shared_dir() -> Path:
    """``../shared`` beside the project (the working folder's or this checkout's)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base.parent / "shared").is_dir():
            return base.parent / "shared"
    return Path.cwd().parent / "shared"


def default_model_dir() -> Path | None:
    """The first model folder in ``../shared/models`` (a ``config.json`` or a llama2.c ``.bin``), if any."""
    models = shared_dir() / "models"
    if not models.is_dir():
        return None
    for d in sorted(p for p in models.iterdir() if p.is_dir()):
        if (d / "config.json").is_file() or any(d.glob("*.bin")):
            return d
    return None


def load_default_or(path: str | None, dtype: torch.dtype):
    """``(model, tokenizer, description)`` of ``path``, else of the shared real model, else of the
    planted-outlier Llama (hidden 512, 8 layers; :func:`orthoopt.adapters.planted_outlier_model`)."""
    from orthoopt.adapters import byte_tokenizer, load_model, load_tokenizer, planted_outlier_model

    model_dir = Path(path) if path else default_model_dir()
    if model_dir is not None:
        return load_model(model_dir, dtype=dtype), load_tokenizer(model_dir), str(model_dir)
    model = planted_outlier_model(**DEFAULT_PLANTED, dtype=dtype)
    return model, byte_tokenizer(), f"planted-outlier llama {DEFAULT_PLANTED}"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rotate", help="learn rotations and save the rotated checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", nargs="?", default=None,
                   help="Hugging Face model folder (default: ../shared/models/*, else a planted-outlier Llama)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", choices=METHODS, default="optrot")
    p.add_argument("--rotations", default="R1,R2", help="comma-separated subset of R1,R2 (default: both)")
    p.add_argument("--solver", choices=("cayley-sgd", "radam", "rsgd", "procrustes"), default=None,
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
    p.add_argument("--resume", action="store_true", help="start from OUT.partial.safetensors if present")
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


def _calibration(args, tokenizer) -> torch.Tensor | None:
    if args.method not in DATA_METHODS:
        return None
    if args.calib is None:
        raise ValueError(f"method {args.method!r} needs calibration text: --calib TEXT_FILE")
    if tokenizer is None:
        raise ValueError(f"method {args.method!r} needs a tokenizer in the model folder to read --calib")
    from orthoopt.quant.calib import calibration_batches

    seq_len = min(args.calib_seq_len, args.calib_tokens)
    nsamples = max(1, -(-args.calib_tokens // seq_len))
    return calibration_batches(args.calib, tokenizer, nsamples=nsamples, seq_len=seq_len, seed=args.seed)


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.safetensors")


def _read_partial(path: Path) -> tuple[dict[str, torch.Tensor], tuple[str, int]]:
    """Rotations of a partial checkpoint and the (phase, steps done) it was written at."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("phase") not in PHASES or not meta.get("step", "").isdigit():
        raise ValueError(f"{path} is not an orthoopt partial checkpoint (metadata {meta})")
    return load_file(str(path)), (meta["phase"], int(meta["step"]))


def run(args: argparse.Namespace) -> int:
    from orthoopt.adapters import load_rotations, save_rotated

    phases = [s.strip() for s in args.rotations.split(",") if s.strip()]
    if not phases or set(phases) - set(PHASES):
        raise ValueError(f"--rotations must name a subset of {','.join(PHASES)}, got {args.rotations!r}")
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    out = Path(args.out)
    partial = _partial_path(out)
    dtype = DTYPES[args.dtype]
    if args.streamed:
        if args.model_dir is None:
            raise ValueError("--streamed needs MODEL_DIR (a Hugging Face folder with safetensors weights)")
        if args.method != "optrot":
            raise ValueError(f"--streamed supports --method optrot only (data-free), got {args.method!r}")
        model, tokenizer, source, calib = None, None, str(args.model_dir), None
    else:
        model, tokenizer, source = load_default_or(args.model_dir, dtype)
        calib = _calibration(args, tokenizer)

    init = load_rotations(args.init) if args.init else None
    steps: int | dict[str, int] = args.steps
    resumed = None
    done_before = {p: 0 for p in PHASES}  # steps a resumed phase had already taken
    if args.resume and partial.is_file():
        init, (phase, done) = _read_partial(partial)
        # phases before the checkpointed one are complete; the checkpointed one has `done` steps
        steps = {p: (0 if PHASES.index(p) < PHASES.index(phase) else args.steps - done if p == phase else args.steps)
                 for p in phases}
        done_before[phase] = done
        resumed = {"from": str(partial), "phase": phase, "steps_done": done}
        print(f"orthoopt rotate: resuming from {partial} ({phase}, step {done})", file=sys.stderr)

    def checkpoint(phase: str, step: int, loss: float, rotations: dict) -> None:
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
                          progress=not args.no_progress, callback=checkpoint, **spin)
    report = {"model": source, **result.report}
    if resumed:
        report["resumed"] = resumed

    save_rotated(model, tokenizer, out, result.rotations, report, extras=lambda folder: plots(folder, result.solves))
    return _finish(args, out, partial, report)


def _finish(args: argparse.Namespace, out: Path, partial: Path, report: dict) -> int:
    partial.unlink(missing_ok=True)
    if args.json:
        print(json.dumps(report))
    else:
        err = report.get("invariance_error")  # not checked in streamed mode (the model is never loaded)
        logit = "" if err is None else f"logit error {err:.2e}, "
        print(f"orthoopt rotate: {args.method} -> {out} in {report['seconds']:.1f} s; "
              f"{logit}orthogonality error {report['orthogonality_error']:.2e}", file=sys.stderr)
    return 0
