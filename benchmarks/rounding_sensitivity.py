"""How far a quantized perplexity moves when the rotation moves by float64 rounding alone.

A fixed rotation (random Hadamard, seed 0, R1 and R2) is fused into SmolLM2-135M as drawn
("exact"), after a polar re-projection that changes its entries by < 1e-14 ("re-projected", what
``rotate_model`` did to fixed rotations before commit 3810ba1), and multiplied by ``--draws`` random
orthogonal matrices within ``--eps`` of the identity (Cayley transforms of ``eps`` times a random skew
matrix, exact to float64 rounding). Every variant is the same float model to ~1e-7 relative (the
float32 rounding of the fused weights: the products land on different sides of a few float32
rounding boundaries), yet each quantized cell is recomputed from scratch. The spread across the
variants is the noise floor under which a difference between two rotations in that cell means
nothing: it is not a seed or calibration effect but the quantizers' sensitivity to the last bit.

Cells (as ``benchmarks/full_settings.py``: 2,048 evaluation tokens in windows of 256 from the second
half; per-channel symmetric W4; A4/A8 and KV4/KV8 asymmetric per token with R3 and R4 online
Hadamards), chosen by ``--cells`` from W4A16, W4A4KV4 and W4A8KV8, each with RTN or GPTQ weights (GPTQ:
``--gptq-windows`` calibration windows of seed 0, default 8). ``--eval-tokens 4096 --gptq-windows 16``
gives the settings of ``docs/results.md``'s main table.

    OMP_NUM_THREADS=1 python benchmarks/rounding_sensitivity.py --draws 4
    OMP_NUM_THREADS=1 python benchmarks/rounding_sensitivity.py --draws 4 --cells "W4A8KV8 GPTQ"
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import DEFAULT_TEXT, random_windows, split_halves  # noqa: E402

from orthoopt.adapters import DecoderAdapter
from orthoopt.models import load_model, load_tokenizer  # noqa: E402
from orthoopt.models.sources import input_location  # noqa: E402
from orthoopt.eval import perplexity  # noqa: E402
from orthoopt.manifold import cayley_retraction, reorthogonalize, skew  # noqa: E402
from orthoopt.config import RotateConfig  # noqa: E402
from orthoopt.pipeline import rotate_model  # noqa: E402
from orthoopt.quant import quantize_model, tokenize_text  # noqa: E402
from orthoopt.quant.config import QuantizeConfig  # noqa: E402
from orthoopt.quant.act import ActQuantConfig  # noqa: E402
from orthoopt.quant.kv import KVQuantConfig  # noqa: E402
from orthoopt.utils.atomic import atomic_file  # noqa: E402
from orthoopt.utils.paths import prepare_output  # noqa: E402

CELLS = {"W4A16 RTN": (16, "rtn"), "W4A4KV4 RTN": (4, "rtn"), "W4A8KV8 RTN": (8, "rtn"), "W4A16 GPTQ": (16, "gptq"),
         "W4A4KV4 GPTQ": (4, "gptq"), "W4A8KV8 GPTQ": (8, "gptq")}
DEFAULT_CELLS = "W4A16 RTN,W4A4KV4 RTN,W4A8KV8 RTN,W4A4KV4 GPTQ"


def near_identity(n: int, eps: float, seed: int) -> torch.Tensor:
    """``[n, n]`` orthogonal, ``(I - eps A)^-1 (I + eps A)`` for a random skew ``A`` (float64): the
    Cayley retraction from the identity along ``A`` with step ``2 eps``."""
    g = torch.Generator().manual_seed(seed)
    a = skew(torch.randn(n, n, generator=g, dtype=torch.float64))
    return cayley_retraction(torch.eye(n, dtype=torch.float64), a, 2 * eps)


def rotated(model_name: str, rotations: dict[str, torch.Tensor]):
    """A fresh model with fused norms and ``rotations`` fused in."""
    model = load_model(model_name)
    adapter = DecoderAdapter(model)
    adapter.fuse_norms()
    adapter.apply_rotations(rotations)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--method", default="hadamard", help="a fixed rotation: hadamard, random (seed 0)")
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--eps", type=float, default=1e-14)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--gptq-windows", type=int, default=8)
    ap.add_argument("--cells", default=DEFAULT_CELLS, help=f"comma-separated, from: {', '.join(CELLS)}")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not cells:
        ap.error(f"unknown cells {unknown}; choose from: {', '.join(CELLS)}")
    if args.json:  # before any work: never over an input, never half-written
        prepare_output(args.json, {"--model": input_location(args.model), "--text": args.text}, kind="file",
                       what="--json")

    split = split_halves(args.text)
    tok = load_tokenizer(args.model)
    calib = random_windows(tokenize_text(split.calib, tok), args.gptq_windows, args.seq_len, 0)
    base = rotate_model(load_model(args.model), RotateConfig(args.method, seed=0), progress=False).rotations
    variants = {"exact": base, "re-projected": {k: reorthogonalize(R) for k, R in base.items()}}
    for d in range(1, args.draws + 1):
        variants[f"draw {d}"] = {k: R @ near_identity(R.shape[0], args.eps, 1000 * d + i)
                                 for i, (k, R) in enumerate(sorted(base.items()))}
    table: dict[str, dict[str, float]] = {}
    for name, rots in variants.items():
        t0 = time.perf_counter()
        moved = max(float((rots[k] - base[k]).abs().max()) for k in base)
        model = rotated(args.model, rots)
        table[name] = {"max |R - R_exact|": moved}
        for cell in cells:
            bits, method = CELLS[cell]
            q = copy.deepcopy(model)
            act = ActQuantConfig(bits=bits, symmetric=False, online_hadamard=True) if bits < 16 else ActQuantConfig()
            kv = KVQuantConfig(bits=bits, r3=True) if bits < 16 else KVQuantConfig()
            r = quantize_model(q, QuantizeConfig(method, wbits=4, act=act, kv=kv),
                               calib=calib if method == "gptq" else None, progress=False)
            table[name][cell] = perplexity(q, tok, text=split.eval, seq_len=args.seq_len,
                                           max_tokens=args.eval_tokens, progress=False)["ppl"]
            r.hooks.remove()
            del q
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    print(f"{args.method} (seed 0) on {args.model}, {args.eval_tokens} evaluation tokens; variants within "
          f"{max(v['max |R - R_exact|'] for v in table.values()):.1e} of the exact rotation")
    print("| variant | max abs(R - R_exact) | " + " | ".join(cells) + " |")
    print("|---|---:|" + "---:|" * len(cells))
    for name, row in table.items():
        print(f"| {name} | {row['max |R - R_exact|']:.1e} | " + " | ".join(f"{row[c]:.2f}" for c in cells) + " |")
    spread = {c: (min(r[c] for r in table.values()), max(r[c] for r in table.values())) for c in cells}
    print("| spread (max/min - 1) | | " + " | ".join(f"{100 * (hi / lo - 1):.1f}%" for lo, hi in spread.values()) + " |")
    if args.json:
        with atomic_file(args.json) as f:
            f.write(json.dumps({"args": vars(args), "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
