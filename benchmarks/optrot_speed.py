"""OptRot speed and memory benchmark: how close a step is to its matrix-product floor, and streaming.

    python benchmarks/optrot_speed.py                       # all sections, ~5 min on a 2-core CPU
    python benchmarks/optrot_speed.py --threads 1 --json /tmp/speed.json
    python benchmarks/optrot_speed.py --model path/to/hf_model --skip rss,scaling,sampling

Sections (one run, one machine; every ratio compares numbers measured in this run):

1. ``step``: the R1 problem of the planted-outlier Llama (hidden 512, 8 layers; or ``--model DIR``):
   the blocks ``rotate_model(model, "optrot")`` learns R1 on (no embedding / lm_head unless
   ``--include-embeddings``). Times one ``FourthPower.value_and_grad`` (fused and views), one full
   Cayley SGD step (the pipeline's default solver; and the exact-Cayley variant), and the bare matrix
   products the step needs, ``Y = A @ R`` (into a reused buffer) and ``G += A.T @ Y``, (a) per block on
   the blocks' shapes and (b) on the objective's fused segments. Floor: ``2 * numel * n`` multiply-adds.
2. ``rss``: peak resident memory (``VmHWM``) of a fresh subprocess rotating a saved planted model
   (``--rss-hidden`` 1024, ``--rss-layers`` 12, 1 solver step per phase) in memory
   (``load_model`` + ``rotate_model`` + ``save_rotated``) and streamed (``rotate_streamed``), against
   the checkpoint's size on disk and a subprocess that only imports; checks that both outputs are equal.
3. ``scaling``: objective, bare products and solver step for n = 512 .. 4096 at a fixed weight count
   (``--scaling-weights``, default 2**23 weights as rows of n, in blocks of at most n rows), so the
   objective grows like n and the retraction like n^3. Solver steps above ``--scaling-solver-max`` are
   skipped (a float64 SVD of 4096 takes minutes on 2 cores).
5. ``convergence`` (issue 11): the R1 problem of (1) (``--layers N``: only the blocks of layers 0..N-1,
   e.g. ``--model smollm2-135m --layers 4``), from the random Hadamard start, float32.
   Each solver of ``--solvers`` (default settings) runs for ``--budget`` loss-and-gradient evaluations
   and the default (``cayley-lbfgs``) once more for ``--reference-evals``; the best loss seen by any
   run is the reference. Prints, side by side, each solver's evaluations and wall time to 95% and 99%
   of the gap between the start and that best loss, and draws loss - best against evaluations
   (``--plot``, default ``docs/img/optrot_convergence.png``).
4. ``sampling``: the R1 problem of (1) for ``--sampling-steps`` steps exact, the same number of steps
   with ``sample_fraction=--fraction``, and as many sampled steps as fit in the exact run's wall time;
   the exact final loss of each (``--sampling-solver``, default the pipeline's cayley-sgd).

Timings are medians of ``--repeats`` after one warm-up. The load average is printed at the start and
the end: other processes on the machine slow everything down, multi-threaded LAPACK most of all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

from _measure import median_time  # noqa: E402
SECTIONS = ("step", "rss", "scaling", "sampling", "convergence")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux
        return "n/a"


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[x if isinstance(x, str) else f"{x:.4g}" for x in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- step
def r1_blocks(model_dir: str | None, include_embeddings: bool, layers: int | None = None):
    from orthoopt.adapters import DecoderAdapter
    from orthoopt.models import load_model
    from orthoopt.testing import planted_outlier_model

    model = load_model(model_dir) if model_dir else planted_outlier_model(hidden_size=512, num_layers=8, seed=0)
    adapter = DecoderAdapter(model)
    adapter.fuse_norms()
    blocks = adapter.weight_blocks("R1")
    if not include_embeddings:
        blocks = [b for b in blocks if not adapter.modules.spec.is_full_precision(b.name)]
    if layers is not None:
        blocks = [b for b in blocks if b.name.startswith("layers.") and int(b.name.split(".")[1]) < layers]
    return blocks, adapter.hidden_size


class BareProducts:
    """The two products of a step and nothing else: ``Y = A @ R`` into a reused buffer, ``G += A.T @ Y``."""

    def __init__(self, pieces: list[torch.Tensor], R: torch.Tensor) -> None:
        self.pieces, self.R = pieces, R
        self.Y = torch.empty(max(A.shape[0] for A in pieces), R.shape[0], dtype=R.dtype)

    def __call__(self) -> torch.Tensor:
        G = torch.zeros_like(self.R)
        for A in self.pieces:
            Y = torch.mm(A, self.R, out=self.Y[:A.shape[0]])
            G.addmm_(A.T, Y)
        return G


def section_step(args) -> dict:
    from orthoopt.objectives import FourthPower
    from orthoopt.solvers import CayleySGD, initial_rotations, make_solver

    blocks, n = r1_blocks(args.model, args.include_embeddings)
    numel = sum(b.weight.numel() for b in blocks)
    R = initial_rotations({"R1": n}, "hadamard", seed=0)
    fused = FourthPower(blocks)
    views = FourthPower(blocks, fused=False)
    per_block = [b.as_rows() for b in blocks]
    segments = fused.segments("R1")
    t_bare_blocks = median_time(BareProducts(per_block, R["R1"]), args.repeats)
    t_bare_fused = median_time(BareProducts(segments, R["R1"]), args.repeats)
    t_obj = median_time(lambda: fused.value_and_grad(R), args.repeats)
    t_views = median_time(lambda: views.value_and_grad(R), args.repeats)
    out = {"n": n, "blocks": len(blocks), "weights": numel, "gflop": 4 * numel * n / 1e9,
           "bare_per_block_s": t_bare_blocks, "bare_fused_s": t_bare_fused,
           "objective_fused_s": t_obj, "objective_views_s": t_views, "solvers": {}}
    for label, solver in (("cayley-sgd (pipeline default)", make_solver("cayley-sgd")),
                          ("cayley-sgd exact (iterative=False)", CayleySGD(iterative=False))):
        solver.init(R)
        t = median_time(lambda s=solver: s.step(fused), args.repeats)
        out["solvers"][label] = {"step_s": t, "reorthogonalizations": solver.num_reorthogonalizations,
                                 "steps": solver.num_steps}
    print(f"\n## 1. One OptRot R1 step: {len(blocks)} blocks, {numel / 1e6:.2f}M weights, n = {n}, "
          f"{out['gflop']:.1f} GFLOP of products per step")
    rows = [["bare products, per block (block shapes)", t_bare_blocks, 1.0, t_bare_blocks / t_bare_fused],
            ["bare products, fused segments", t_bare_fused, t_bare_fused / t_bare_blocks, 1.0],
            ["FourthPower.value_and_grad, fused", t_obj, t_obj / t_bare_blocks, t_obj / t_bare_fused],
            ["FourthPower.value_and_grad, views", t_views, t_views / t_bare_blocks, t_views / t_bare_fused]]
    for label, s in out["solvers"].items():
        rows.append([f"full step, {label} [{s['reorthogonalizations']} re-orth. in {s['steps']} steps]",
                     s["step_s"], s["step_s"] / t_bare_blocks, s["step_s"] / t_bare_fused])
    print(table(["what", "seconds", "/ bare per block", "/ bare fused"], rows))
    return out


# -------------------------------------------------------------------------------------------- rss
CHILD = textwrap.dedent("""
    import json, sys, time, torch
    torch.set_num_threads({threads})
    from orthoopt.utils.memory import peak_rss_bytes
    from orthoopt.models import load_model, load_tokenizer, save_rotated
    from orthoopt.pipeline import rotate_model
    from orthoopt.pipeline import rotate_streamed
    mode, src, out = sys.argv[1:4]
    t = time.perf_counter()
    if mode == "in-memory":
        model = load_model(src)
        res = rotate_model(model, "optrot", steps={steps}, seed=0, progress=False)
        save_rotated(model, load_tokenizer(src), out, res.rotations, res.report)
    elif mode == "streamed":
        rotate_streamed(src, out, steps={steps}, seed=0, progress=False)
    print(json.dumps({{"mode": mode, "seconds": time.perf_counter() - t, "vmhwm_mib": peak_rss_bytes() / 2 ** 20}}))
""")


def run_child(code: str, mode: str, src: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, mode, str(src), str(out)], capture_output=True, text=True,
                          cwd=REPO, check=False)
    if proc.returncode:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_weight_difference(a: Path, b: Path) -> float:
    from safetensors import safe_open

    def files(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("model*.safetensors")):
            with safe_open(str(f), "pt") as h:
                names = h.keys()
                out.update(dict.fromkeys(names, f))
        return out

    fa, fb = files(a), files(b)
    if set(fa) != set(fb):
        raise RuntimeError(f"outputs hold different tensors: {sorted(set(fa) ^ set(fb))[:5]}")
    worst = 0.0
    for k in fa:
        with safe_open(str(fa[k]), "pt") as ha, safe_open(str(fb[k]), "pt") as hb:
            worst = max(worst, float((ha.get_tensor(k).double() - hb.get_tensor(k).double()).abs().max()))
    return worst


def section_rss(args) -> dict:
    from orthoopt.testing import save_planted

    with tempfile.TemporaryDirectory(prefix="optrot_speed_") as tmp:
        tmp = Path(tmp)
        src = save_planted(tmp / "model", hidden_size=args.rss_hidden, num_layers=args.rss_layers, seed=0)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        code = CHILD.format(threads=args.threads, steps=args.rss_steps)
        res = {m: run_child(code, m, src, tmp / m) for m in ("baseline", "in-memory", "streamed")}
        diff = max_weight_difference(tmp / "in-memory", tmp / "streamed")
    mib = 1024 * 1024
    out = {"hidden": args.rss_hidden, "layers": args.rss_layers, "steps": args.rss_steps,
           "checkpoint_mib": size / mib, "children": res, "max_abs_weight_difference": diff,
           "streamed_over_in_memory": res["streamed"]["vmhwm_mib"] / res["in-memory"]["vmhwm_mib"]}
    print(f"\n## 2. Peak memory: planted Llama hidden {args.rss_hidden}, {args.rss_layers} layers, "
          f"{size / mib:.0f} MiB of float32 safetensors; {args.rss_steps} step(s) per phase")
    base = res["baseline"]["vmhwm_mib"]
    rows = [[m, r["vmhwm_mib"], r["vmhwm_mib"] - base, (r["vmhwm_mib"] - base) / (size / mib), r["seconds"]]
            for m, r in res.items()]
    print(table(["process", "peak RSS MiB", "above imports MiB", "above imports / model", "seconds"], rows))
    print(f"streamed / in-memory peak RSS: {out['streamed_over_in_memory']:.2f}; "
          f"max |weight difference| between the two outputs: {diff:.3g}")
    return out


# ---------------------------------------------------------------------------------------- scaling
def section_scaling(args) -> dict:
    from orthoopt.objectives import FourthPower, WeightBlock
    from orthoopt.solvers import initial_rotations, make_solver

    rows, out = [], []
    for n in args.scaling:
        m_total = max(1, args.scaling_weights // n)
        g = torch.Generator().manual_seed(n)
        W = torch.randn(m_total, n, generator=g)
        W[:, : max(1, n // 128)] *= 20.0  # planted outlier columns
        blocks = [WeightBlock(W[i:i + n], "R1", "in", f"b{i}") for i in range(0, m_total, n)]
        R = initial_rotations({"R1": n}, "hadamard", seed=0)
        f = FourthPower(blocks)
        reps = 1 if n >= 2048 else args.repeats
        t_bare = median_time(BareProducts(f.segments("R1"), R["R1"]), reps)
        t_obj = median_time(lambda f=f, R=R: f.value_and_grad(R), reps)
        t_step = None
        if n <= args.scaling_solver_max:
            solver = make_solver("cayley-sgd")
            solver.init(R)
            t_step = median_time(lambda s=solver, f=f: s.step(f), reps)
        item = {"n": n, "weights": m_total * n, "gflop": 4 * m_total * n * n / 1e9, "bare_s": t_bare,
                "objective_s": t_obj, "step_s": t_step}
        out.append(item)
        rows.append([n, item["gflop"], t_bare, t_obj, t_obj / t_bare,
                     "skipped" if t_step is None else t_step, "-" if t_step is None else t_step - t_obj])
    print(f"\n## 3. Scaling with n at {args.scaling_weights / 1e6:.1f}M weights (rows of n, blocks of <= n rows)")
    print(table(["n", "GFLOP", "bare s", "objective s", "objective / bare", "cayley step s", "step - objective s"],
                rows))
    return {"weights": args.scaling_weights, "rows": out}


# --------------------------------------------------------------------------------------- sampling
def section_sampling(args) -> dict:
    from orthoopt.objectives import FourthPower
    from orthoopt.solvers import initial_rotations, make_solver, solve

    blocks, n = r1_blocks(args.model, args.include_embeddings)
    start = initial_rotations({"R1": n}, "hadamard", seed=0)
    exact = FourthPower(blocks)
    initial = float(exact.loss(start))

    def run(fraction, steps=None, seconds=None):
        obj = exact if fraction is None else FourthPower(blocks, sample_fraction=fraction, seed=0)
        stop_at = None if seconds is None else time.perf_counter() + seconds
        cb = None if stop_at is None else (lambda i, loss, r: time.perf_counter() >= stop_at)
        t = time.perf_counter()
        res = solve(obj, start, make_solver(args.sampling_solver), steps if steps is not None else 10**6,
                    callback=cb, progress=False)
        wall = time.perf_counter() - t
        return {"fraction": fraction, "steps": res.steps, "seconds": wall, "final_loss": float(exact.loss(res.rotations))}

    full = run(None, steps=args.sampling_steps)
    same_steps = run(args.fraction, steps=args.sampling_steps)
    same_time = run(args.fraction, seconds=full["seconds"])
    print(f"\n## 4. Stochastic steps: R1 problem of section 1, {args.sampling_solver} (default settings), "
          f"exact loss {initial:.6g} at the start")
    rows = [[label, r["steps"], r["seconds"], r["final_loss"], r["final_loss"] / full["final_loss"]]
            for label, r in (("exact", full), (f"sample_fraction={args.fraction}, same steps", same_steps),
                             (f"sample_fraction={args.fraction}, same wall time", same_time))]
    print(table(["run", "steps", "seconds", "final loss (exact)", "/ exact run"], rows))
    return {"solver": args.sampling_solver, "fraction": args.fraction, "initial_loss": initial, "exact": full,
            "same_steps": same_steps, "same_time": same_time}


# ------------------------------------------------------------------------------------- convergence
def _trace(objective, start, solver_name: str, budget: int) -> dict:
    """Run ``solver_name`` until ``budget`` evaluations; ``[(evaluations, seconds, loss)]`` with the loss
    of each iterate at the evaluation count when it was known."""
    from orthoopt.solvers import make_solver, solve

    solver = make_solver(solver_name)
    points: list[tuple[int, float, float]] = []
    t0 = time.perf_counter()

    def cb(i, loss, rotations):
        known = solver.current_loss()
        if known is None:  # the step evaluated the loss before it (one evaluation per step)
            points.append((solver.num_evaluations, time.perf_counter() - t0, loss))
        else:  # line-search solvers know the loss of the new iterate
            if i == 0:
                points.append((1, time.perf_counter() - t0, loss))
            points.append((solver.num_evaluations, time.perf_counter() - t0, known))
        return solver.num_evaluations >= budget

    res = solve(objective, start, solver, 10 * budget, callback=cb, progress=False)
    return {"solver": solver_name, "points": points, "seconds": time.perf_counter() - t0,
            "evaluations": res.num_evaluations, "final_loss": res.final_loss,
            "reorthogonalizations": res.num_reorthogonalizations, "stop_reason": res.stop_reason}


def _first(points, threshold):
    for e, t, loss in points:
        if loss <= threshold:
            return e, t
    return None, None


def section_convergence(args) -> dict:
    from orthoopt.objectives import FourthPower
    from orthoopt.solvers import initial_rotations

    blocks, n = r1_blocks(args.model, args.include_embeddings, args.layers)
    objective = FourthPower(blocks)
    start = initial_rotations({"R1": n}, "hadamard", seed=0)
    initial = float(objective.loss(start))
    rows_total = sum(b.as_rows().shape[0] for b in blocks)
    runs = [_trace(objective, start, name, args.budget) for name in args.solvers.split(",")]
    reference = _trace(objective, start, "cayley-lbfgs", args.reference_evals) if args.reference_evals else None
    best = min(p[2] for r in runs + ([reference] if reference else []) for p in r["points"])
    gap = initial - best
    print(f"\n## 5. Convergence: R1 FourthPower, {len(blocks)} blocks ({rows_total} rows x {n}), Hadamard start "
          f"loss {initial:.6g}, best seen {best:.6g} (gap {gap:.6g}); budget {args.budget} evaluations per solver")
    rows, out = [], []
    for r in runs:
        e95, t95 = _first(r["points"], best + 0.05 * gap)
        e99, t99 = _first(r["points"], best + 0.01 * gap)
        final = min(p[2] for p in r["points"])
        item = {**{k: v for k, v in r.items() if k != "points"}, "best_loss_seen": final,
                "share_of_gap": (initial - final) / gap, "evals_95": e95, "seconds_95": t95,
                "evals_99": e99, "seconds_99": t99, "curve": r["points"]}
        out.append(item)
        fmt = lambda x: "-" if x is None else x  # noqa: E731
        rows.append([r["solver"], r["evaluations"], final, item["share_of_gap"], fmt(e95), fmt(t95), fmt(e99),
                     fmt(t99), r["seconds"] / max(1, r["evaluations"]), r["reorthogonalizations"]])
    print(table(["solver", "evals", "best loss", "share of gap", "evals to 95%", "s to 95%", "evals to 99%",
                 "s to 99%", "s / eval", "re-projections"], rows))
    if reference:
        e99, t99 = _first(reference["points"], best + 0.01 * gap)
        print(f"reference cayley-lbfgs, {reference['evaluations']} evaluations: loss {reference['final_loss']:.6g}; "
              f"99% of the gap after {e99} evaluations ({t99 if t99 is None else round(t99, 1)} s)")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        shown = []
        for r in runs + ([reference | {"solver": "cayley-lbfgs (reference)"}] if reference else []):
            e = [p[0] for p in r["points"]]
            y = [max(p[2] - best, 1e-9 * gap) / gap for p in r["points"]]
            shown += [v for x, v in zip(e, y) if x <= args.budget]
            ax.semilogy(e, y, label=r["solver"])
        ax.set_ylim(bottom=min(shown) / 2)  # the best point itself (0 after the shift) is off the scale
        ax.axhline(0.05, color="grey", ls=":", lw=0.8)
        ax.axhline(0.01, color="grey", ls="--", lw=0.8)
        ax.set_xlim(0, max(args.budget, 1))
        ax.set_xlabel("loss-and-gradient evaluations")
        ax.set_ylabel("(loss - best) / (start - best)")
        ax.set_title(f"OptRot R1, {rows_total} x {n} rows, Hadamard start")
        ax.legend()
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")
    return {"rows": rows_total, "n": n, "initial_loss": initial, "best_loss": best, "budget": args.budget,
            "solvers": out, "reference": None if reference is None else
            {k: v for k, v in reference.items() if k != "points"} | {"curve": reference["points"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model folder for sections 1 and 4 (default: planted 512 / 8)")
    p.add_argument("--include-embeddings", action="store_true", help="put embed_tokens / lm_head in the R1 problem")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    p.add_argument("--rss-hidden", type=int, default=1024)
    p.add_argument("--rss-layers", type=int, default=12)
    p.add_argument("--rss-steps", type=int, default=1)
    p.add_argument("--scaling", type=lambda s: [int(x) for x in s.split(",")], default=[512, 1024, 2048, 4096])
    p.add_argument("--scaling-weights", type=int, default=1 << 23)
    p.add_argument("--scaling-solver-max", type=int, default=2048)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--sampling-solver", default="cayley-sgd", help="solver of section 4 (cayley-sgd, radam, rsgd)")
    p.add_argument("--layers", type=int, default=None, help="sections 1, 4, 5: only the blocks of layers 0..N-1")
    p.add_argument("--solvers", default="cayley-lbfgs,cayley-bb,cayley-sgd,radam", help="section 5: solvers")
    p.add_argument("--budget", type=int, default=100, help="section 5: evaluations per solver")
    p.add_argument("--reference-evals", type=int, default=300,
                   help="section 5: evaluations of the reference cayley-lbfgs run (0: none)")
    p.add_argument("--plot", default=str(REPO / "docs" / "img" / "optrot_convergence.png"),
                   help="section 5: where to save the loss-vs-evaluations plot ('' for none)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SECTIONS):
        p.error(f"--skip takes {','.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.platform(),
                     "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                     "load_average_start": load_average()}
    print(f"# OptRot speed benchmark: torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"load average {results['load_average_start']}")
    for name, fn in (("step", section_step), ("rss", section_rss), ("scaling", section_scaling),
                     ("sampling", section_sampling), ("convergence", section_convergence)):
        if name not in skip:
            results[name] = fn(args)
    results["load_average_end"] = load_average()
    results["seconds"] = time.perf_counter() - began
    print(f"\nload average at the end {results['load_average_end']}; total {results['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
