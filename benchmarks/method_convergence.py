"""Do the default solvers converge for every learned method? (issue 11, item 2)

    python benchmarks/method_convergence.py                      # SmolLM2-135M, layers 0-3, R1
    python benchmarks/method_convergence.py --methods optrot,kurtosis --layers 2 --steps 50

For each method the R1 objective the pipeline builds (``orthoopt.pipeline.build_objective``) on the
norm-fused model truncated to its first ``--layers`` decoder layers (their inputs are the full
model's: a causal decoder's early layers never see later ones), calibrated on random windows of the
first half of WikiText-2. From the random Hadamard start (seed 0) it runs

* the method's **default**: its default solver and learning rate for ``--steps`` steps (the CLI's
  default step count), and
* **references**: the default solver for ``--reference-factor`` times as many steps, plus every
  solver of ``--reference-solvers`` that accepts the objective for as many steps,

and takes the best loss seen by any run as the reference "best loss found". It prints, side by side,
each run's final loss, its gap to the best as a share of the start-to-best gap and of the best loss,
and the first step at which the default run was within 1% of the best loss. ``--json`` also writes
the figures to a file. Nothing is asserted: the table is what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from orthoopt.adapters import DecoderAdapter
from orthoopt.models import load_model, load_tokenizer  # noqa: E402
from orthoopt.config import RotateConfig  # noqa: E402
from orthoopt.methods import METHODS  # noqa: E402
from orthoopt.pipeline import build_objective  # noqa: E402
from orthoopt.solvers import make_solver, solve  # noqa: E402

from _data import DEFAULT_TEXT, random_windows, split_halves, token_ids  # noqa: E402

SMOOTH_SOLVERS = ("cayley-lbfgs", "cayley-sgd", "radam")


def truncated_adapter(model_dir: str, layers: int):
    """The norm-fused adapter of ``model_dir`` keeping only decoder layers ``0 .. layers-1``, and the tokenizer."""
    model, tokenizer = load_model(model_dir, dtype=torch.float32), load_tokenizer(model_dir)
    dec = model.model
    if layers < len(dec.layers):
        dec.layers = dec.layers[:layers]
        model.config.num_hidden_layers = layers
    adapter = DecoderAdapter(model)
    adapter.fuse_norms()
    return adapter, tokenizer


def run(objective, solver_name: str, steps: int, lr: float | None, seed: int) -> dict:
    kwargs = {} if lr is None else {"lr": lr}
    t0 = time.perf_counter()
    r = solve(objective, "hadamard", make_solver(solver_name, **kwargs), steps, progress=False, seed=seed)
    history = list(r.history) + [r.final_loss]
    return {"solver": solver_name, "steps": r.steps, "lr": lr, "evaluations": r.num_evaluations,
            "seconds": time.perf_counter() - t0, "start": history[0], "final": r.final_loss,
            "best_seen": min(history), "history": history, "stop_reason": r.stop_reason}


def method_rows(method: str, adapter: DecoderAdapter, calib: torch.Tensor, args) -> dict:
    config = RotateConfig(method, seed=args.seed, calib={"tokens": args.calib_tokens})
    objective = build_objective(config, adapter, "R1", calib=calib, progress=False)
    default_solver, lr = METHODS[method].solver, METHODS[method].lr
    runs = {"default": run(objective, default_solver, args.steps, lr, args.seed)}
    long = args.steps * args.reference_factor
    runs[f"default x{args.reference_factor}"] = run(objective, default_solver, long, lr, args.seed)
    if method != "dfrot":  # the DFRot loss is piecewise constant in the quantization grid: no gradient solvers
        for name in args.reference_solvers.split(","):
            if name and name != default_solver:
                runs[f"{name} x{args.reference_factor}"] = run(objective, name, long, None, args.seed)
    best = min(r["best_seen"] for r in runs.values())
    start = runs["default"]["start"]
    for r in runs.values():
        r["gap_closed"] = (start - r["final"]) / (start - best) if start > best else 1.0
        r["above_best"] = (r["final"] - best) / abs(best) if best else 0.0
    hist = runs["default"]["history"]
    within = next((i for i, v in enumerate(hist) if v <= best + 0.01 * abs(best)), None)
    return {"method": method, "default_solver": default_solver, "start": start, "best": best,
            "best_by": min(runs, key=lambda k: runs[k]["best_seen"]), "default_within_1pct_at_step": within,
            "runs": runs}


def print_table(rows: list[dict], args) -> None:
    print(f"\nR1, layers 0-{args.layers - 1}, random Hadamard start; default = {args.steps} steps; "
          f"references = {args.steps * args.reference_factor} steps")
    print(f"{'method':<9} {'run':<32} {'evals':>6} {'s':>7} {'start':>12} {'final':>12} {'gap closed':>10} "
          f"{'above best':>10}")
    for row in rows:
        for name, r in row["runs"].items():
            print(f"{row['method']:<9} {name + ' (' + r['solver'] + ')':<32} {r['evaluations']:>6} {r['seconds']:>7.1f} "
                  f"{r['start']:>12.6g} {r['final']:>12.6g} {100 * r['gap_closed']:>9.1f}% {100 * r['above_best']:>9.2f}%")
        at = row["default_within_1pct_at_step"]
        print(f"{row['method']:<9} best {row['best']:.6g} ({row['best_by']}); default within 1% of it "
              f"{'at step ' + str(at) if at is not None else 'never'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="model folder or registered name [smollm2-135m]")
    p.add_argument("--text", default=str(DEFAULT_TEXT))
    p.add_argument("--methods", default="optrot,optrot+,kurtosis,dfrot")
    p.add_argument("--layers", type=int, default=4, help="decoder layers kept [4]")
    p.add_argument("--steps", type=int, default=100, help="default run's steps (the CLI default) [100]")
    p.add_argument("--reference-factor", type=int, default=4, help="reference runs take this many times more steps [4]")
    p.add_argument("--reference-solvers", default=",".join(SMOOTH_SOLVERS))
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    adapter, tokenizer = truncated_adapter(args.model, args.layers)
    calib = random_windows(token_ids(split_halves(args.text).calib, tokenizer), args.calib_samples, args.seq_len,
                           seed=args.seed)
    rows = []
    for method in args.methods.split(","):
        if method not in METHODS or not METHODS[method].learned or METHODS[method].joint:
            raise SystemExit(f"--methods: {method!r} is not one of optrot, optrot+, kurtosis, dfrot")
        rows.append(method_rows(method, adapter, calib, args))
        print_table(rows[-1:], args)
        sys.stdout.flush()
    print_table(rows, args)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
