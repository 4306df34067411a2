"""The R1 write-back of a random Hadamard rotation, side by side: the dense product against the fast transform.

    python benchmarks/hadamard_writeback.py          # one bf16 decoder layer of the 1B, 3B and 8B shapes

``rotate --method hadamard`` fuses ``R1 = D H / sqrt(n)`` into every weight that reads or writes the
residual stream. With ``R1`` dense that is a float64 product per weight, ``2 * hidden`` flops per
element; :func:`orthoopt.hadamard.fast_rotation` finds the Hadamard structure in ``R1`` and the
write-back (:func:`orthoopt.adapters.writeback.rotate_layer`) applies it as a few Kronecker-factor
products instead. Both forms run here on the same random bf16 layer (the shapes of
``benchmarks/model_size.py``), in float64 as the write-back computes, cast back to bf16:

* ``dense``: ``rotate_layer(..., R1)`` with the dense float64 tensor;
* ``fast``: ``rotate_layer(..., fast_rotation(R1))`` (what ``apply_rotations`` and the streamed rotate run).

Prints the best of ``--repeats`` wall times per layer, their ratio, the largest float64 difference
before the cast, and the share of bf16 weights that differ after it (both forms round once from float64
values that agree to float64 rounding, so a bf16 value differs only where one sits on a rounding
boundary; reported, not assumed). Then the memory, each in a fresh process (peak RSS of the whole
process, ``VmHWM``): building the layer alone ("layer"), and building it and running one write-back
of each form with each weight cast back to bf16 as soon as it is rotated (``cast_back=True``, as the
write-backs store it: "dense", "fast").
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, Path(__file__).resolve().parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from _measure import peak_rss_bytes, timed  # noqa: E402
from model_size import SHAPES  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)

from orthoopt.adapters.arch_table import ARCHS  # noqa: E402
from orthoopt.adapters.writeback import rotate_layer  # noqa: E402
from orthoopt.hadamard import fast_rotation, random_hadamard  # noqa: E402
from orthoopt.utils.heap import release_large_blocks  # noqa: E402


def _layer(shape, gen) -> dict[str, torch.Tensor]:
    return {f"l.{k}": (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)
            for k, s in shape.layer_tensors().items() if k.endswith("proj.weight")}


def _peak_rss(form: str, key: str) -> float:
    """Peak RSS in GB of a fresh process that builds the layer of ``key`` and runs one write-back of
    ``form`` ("none": the layer only), casting each weight back to bf16 as the write-backs do."""
    code = (f"import sys; sys.path[:0] = {[str(REPO), str(Path(__file__).resolve().parent)]!r}; "
            f"import hadamard_writeback as b; b._child({form!r}, {key!r})")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 1e9


def _child(form: str, key: str) -> None:
    release_large_blocks()
    shape = SHAPES[key]
    t = _layer(shape, torch.Generator().manual_seed(0))
    if form != "none":
        R1 = random_hadamard(shape.hidden_size, seed=0)
        op = R1 if form == "dense" else fast_rotation(R1)
        t.update(rotate_layer(ARCHS["llama"], t, "l", op, num_heads=shape.num_attention_heads,
                              num_kv_heads=shape.num_key_value_heads, cast_back=True))
    print(peak_rss_bytes())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1b,3b,8b", help="comma-separated keys of model_size.SHAPES")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    release_large_blocks()  # the allocator setting the command line runs the write-back under
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ARCHS["llama"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one decoder layer, bf16 weights, "
          "float64 products")
    print("| shape | hidden | dense s | fast s | dense / fast | max float64 diff | bf16 differing "
          "| peak GB: layer | dense | fast |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in args.shapes.split(","):
        shape = SHAPES[key]
        t = _layer(shape, torch.Generator().manual_seed(0))
        R1 = random_hadamard(shape.hidden_size, seed=0)
        op = fast_rotation(R1)
        if op is R1:
            raise SystemExit(f"fast_rotation did not recognize the random Hadamard R1 of order {shape.hidden_size}")
        kw = dict(num_heads=shape.num_attention_heads, num_kv_heads=shape.num_key_value_heads)
        t_dense, dense = timed(lambda: rotate_layer(spec, t, "l", R1, **kw), args.repeats, warmup=0)
        t_fast, fast = timed(lambda: rotate_layer(spec, t, "l", op, **kw), args.repeats, warmup=0)
        diff = max((dense[k] - fast[k]).abs().max().item() for k in dense)
        differ = sum(int((dense[k].bfloat16() != fast[k].bfloat16()).sum()) for k in dense)
        total = sum(v.numel() for v in dense.values())
        del dense, fast
        rss = {form: _peak_rss(form, key) for form in ("none", "dense", "fast")}
        print(f"| {key} | {shape.hidden_size} | {t_dense:.2f} | {t_fast:.2f} | {t_dense / t_fast:.1f} | {diff:.1e} "
              f"| {differ / total:.1e} | {rss['none']:.2f} | {rss['dense']:.2f} | {rss['fast']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
