"""GPTQ's lazy batch update, side by side: a product then a subtraction, against one in-place GEMM.

    python benchmarks/gptq_update.py            # four weight shapes, a few seconds each on 2 cores

After each block of ``--block`` columns, GPTQ (``orthoopt.quant.gptq.gptq_quantize``) applies the
block's scaled errors to every later column. The two forms compared on the same inputs in one run:

* ``sub``: ``W[:, i2:] -= Err1 @ U[i1:i2, i2:]`` (a ``[rows, cols - i2]`` temporary per block);
* ``addmm_``: ``W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)`` (what ``gptq_quantize`` runs).

Prints the best of ``--repeats`` wall times of each over all blocks, their ratio, and whether the two
final weights are equal bit for bit on this CPU (BLAS may accumulate into ``W`` in another order on
another CPU, so equality is reported, not assumed).
"""
from __future__ import annotations

import argparse
import time

import torch

SHAPES = ((2048, 2048), (8192, 2048), (2048, 8192), (4096, 4096))  # [rows, cols] of the 1B-8B linears


def _run(form: str, W0: torch.Tensor, U: torch.Tensor, errors: list[torch.Tensor], block: int):
    W = W0.clone()
    start = time.perf_counter()
    for k, i1 in enumerate(range(0, W.shape[1], block)):
        i2 = i1 + block
        if form == "sub":
            W[:, i2:] -= errors[k] @ U[i1:i2, i2:]
        else:
            W[:, i2:].addmm_(errors[k], U[i1:i2, i2:], alpha=-1)
    return time.perf_counter() - start, W


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=128, help="GPTQ's block size (its default: 128)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, block {args.block}")
    print("| rows x cols | sub s | addmm_ s | sub / addmm_ | same bits |")
    print("|---|---:|---:|---:|---|")
    g = torch.Generator().manual_seed(0)
    for rows, cols in SHAPES:
        W0 = torch.randn(rows, cols, generator=g)
        U = torch.randn(cols, cols, generator=g).triu_() / cols ** 0.5
        errors = [torch.randn(rows, args.block, generator=g) * 1e-2 for _ in range(0, cols, args.block)]
        best, final = {}, {}
        for _ in range(args.repeats):
            for form in ("sub", "addmm_"):
                t, final[form] = _run(form, W0, U, errors, args.block)
                best[form] = min(t, best.get(form, t))
        print(f"| {rows} x {cols} | {best['sub']:.3f} | {best['addmm_']:.3f} | {best['sub'] / best['addmm_']:.2f} "
              f"| {torch.equal(final['sub'], final['addmm_'])} |", flush=True)


if __name__ == "__main__":
    main()
