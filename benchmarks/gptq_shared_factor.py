"""GPTQ's linears that read one input, side by side: a factorization each, against one shared.

    python benchmarks/gptq_shared_factor.py               # the 8B shape's attention and MLP groups, ~2 minutes
    python benchmarks/gptq_shared_factor.py --shapes 1b,3b,8b

q, k and v read the same input, and so do gate and up: one Hessian each group. ``gptq_quantize(W, H)``
factors ``H`` (Cholesky, ``cholesky_inverse``, Cholesky of the inverse: ``orthoopt.quant.gptq``) on every
call; ``orthoopt.quant.sequential.gptq_sequential`` now calls ``gptq_factor(H)`` once per group and hands
each linear the factor. The two on the same random weights and Hessian (float32, group size 128,
``orthoopt.quant.gptq``'s defaults otherwise), in one run, in alternating order: the best of ``--repeats``
wall times of each group, their ratio, and whether every result is equal bit for bit (the arithmetic is
the same by construction, so it must be). On a shared 2-core virtual machine the same call varies by
about 25% from run to run (19.4 to 24.6 s for the 8B gate and up), more than a factorization saves in
the MLP group: read its ratio against that.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orthoopt.quant.gptq import gptq_factor, gptq_quantize  # noqa: E402
from orthoopt.quant.quantizer import QuantSpec  # noqa: E402

# [rows] of the linears of each group and their input width: Llama-3.2-1B, Llama-3.2-3B, Llama-3-8B
SHAPES = {
    "1b": {"q, k, v": ((2048, 512, 512), 2048), "gate, up": ((8192, 8192), 2048)},
    "3b": {"q, k, v": ((3072, 1024, 1024), 3072), "gate, up": ((8192, 8192), 3072)},
    "8b": {"q, k, v": ((4096, 1024, 1024), 4096), "gate, up": ((14336, 14336), 4096)},
}


def _hessian(c: int, g: torch.Generator) -> torch.Tensor:
    X = torch.randn(2 * c, c, generator=g)
    return 2 * X.T @ X / (2 * c)


def _each(weights, H, spec):
    return [gptq_quantize(W, H, spec) for W in weights]


def _shared(weights, H, spec):
    factor = gptq_factor(H)
    return [gptq_quantize(W, factor, spec) for W in weights]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8b", help="comma-separated subset of 1b,3b,8b [8b]")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = sorted(set(names) - set(SHAPES))
    if bad:
        ap.error(f"--shapes: unknown {bad}; choose from {','.join(SHAPES)}")
    spec = QuantSpec(bits=4, group_size=128)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, W4 group 128")
    print("| shape | group | linears [rows x cols] | a factorization each s | one shared s | each / shared | same bits |")
    print("|---|---|---|---:|---:|---:|---|")
    g = torch.Generator().manual_seed(0)
    for name in names:
        for group, (rows, c) in SHAPES[name].items():
            H = _hessian(c, g)
            weights = [torch.randn(r, c, generator=g) * 0.02 for r in rows]
            best, out = {}, {}
            forms = [("each", _each), ("shared", _shared)]
            for k in range(args.repeats):  # alternating order (each, shared; shared, each; ...): drift cancels
                for form, run in (forms if k % 2 == 0 else forms[::-1]):
                    start = time.perf_counter()
                    out[form] = run(weights, H, spec)
                    t = time.perf_counter() - start
                    best[form] = min(t, best.get(form, t))
            same = all(torch.equal(a.weight, b.weight) and torch.equal(a.scale, b.scale)
                       for a, b in zip(out["each"], out["shared"]))
            shapes = ", ".join(f"{r} x {c}" for r in rows)
            print(f"| {name} | {group} | {shapes} | {best['each']:.2f} | {best['shared']:.2f} | "
                  f"{best['each'] / best['shared']:.2f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
