"""llm-compressor vs orthoopt, side by side: same model, same calibration windows, same evaluation.

Rows (weights W4, symmetric, per output channel; embeddings and lm_head in full precision):

* llm-compressor, no rotation, and with its ``SpinQuantModifier`` R1+R2 Hadamard (block-diagonal
  when the hidden size is not a power of two: SmolLM2-135M's 576 uses blocks of the head dim, 64);
  each with RTN (``QuantizationModifier``, min-max) and GPTQ (``GPTQModifier``, damp 0.01, no
  act-order) through ``oneshot``;
* orthoopt, no rotation (the checkpoint as loaded, as llm-compressor's row), norm-fused without rotation
  (``identity``), random Hadamard, OptRot and OptRot+ (``orthoopt.pipeline.rotate_model``), each with
  RTN and GPTQ (``orthoopt.quant.quantize_model``, damp 0.01, no act-order; true-sequential unless
  ``--no-true-sequential``).

Calibration: ``--calib-samples`` windows of ``--seq-len`` tokens drawn (seeded) from the first half of
``--text``, passed to both tools as the same token ids (and to OptRot+ for its Hessians). Evaluation:
perplexity on the first ``--eval-tokens`` tokens of the second half, non-overlapping windows of
``--seq-len`` (``orthoopt.eval.perplexity``, in-process for both tools). Wall times: rotation
(orthoopt's ``rotate_model``; llm-compressor's SpinQuant is inside its ``oneshot``) and quantization,
measured here with ``--threads`` torch threads.

With ``--out FILE.md`` the run also writes ``FILE.json`` (every cell, with its per-window NLLs) and
``FILE.compare.json``: the cells as one ``orthoopt compare --json`` record (reference: the float
model; models named ``llmc-<rotation>-<rtn|gptq>`` and ``oo-<rotation>-<rtn|gptq>``), which
``benchmarks/peer_table.py`` turns into ratios with paired-bootstrap 95% intervals between any two cells::

    python benchmarks/peer_table.py runs/peer.compare.json --refs oo-none,oo-hadamard,oo-optrot,llmc-spinquant

llm-compressor pins its own transformers; run this script with a Python where ``llmcompressor``
imports (``pip install -e '.[peer]'`` in a separate venv, docs/export.md). Where it does not, the
script says so and exits 0 without measuring anything.

    /work/venvs/peer/bin/python benchmarks/peer_llmcompressor.py --model smollm2-135m \\
        --out runs/peer.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _data import DEFAULT_TEXT, random_windows, split_halves, token_ids  # noqa: E402

from orthoopt.eval import perplexity  # noqa: E402
from orthoopt.interop.llmcompressor import (  # noqa: E402
    quantize_with_llmcompressor,
    spinquant_block_size,
    unavailable_reason,
)
from orthoopt.methods import METHODS  # noqa: E402
from orthoopt.config import RotateConfig  # noqa: E402
from orthoopt.pipeline import rotate_model  # noqa: E402
from orthoopt.quant import load_checkpoint, quantize_model  # noqa: E402
from orthoopt.quant.config import GPTQConfig, QuantizeConfig  # noqa: E402

ORTHOOPT_ROTATIONS = ("none", "identity", "hadamard", "optrot", "optrot+")
LLMC_ROTATIONS = ("none", "spinquant")
QUANT = ("rtn", "gptq")
NAMES = {"identity": "norm-fused, no rotation", "hadamard": "random Hadamard", "optrot": "OptRot", "optrot+": "OptRot+",
         "none": "no rotation", "spinquant": "SpinQuantModifier R1+R2 Hadamard"}


def default_model() -> Path | None:
    for c in (os.environ.get("ORTHOOPT_SMOLLM"), Path.home() / ".cache/orthoopt/models/smollm2-135m",
              REPO.parent / "shared/models/smollm2-135m"):
        if c and (Path(c) / "config.json").is_file():
            return Path(c)
    return None


def log(msg: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="HF model folder [SmolLM2-135M when cached]")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="first half calibrates, second evaluates")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows [32]")
    p.add_argument("--seq-len", type=int, default=256, help="calibration and evaluation window length [256]")
    p.add_argument("--eval-tokens", type=int, default=16384, help="evaluated tokens of the second half [16384]")
    p.add_argument("--steps", type=int, default=100, help="OptRot/OptRot+ solver steps per phase [100]")
    p.add_argument("--calib-tokens", type=int, default=2048, help="rotate_model's calib_tokens [2048]")
    p.add_argument("--seed", type=int, default=0, help="calibration windows and rotation seed [0]")
    p.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    p.add_argument("--tools", default="llmcompressor,orthoopt", help="which tools to run [both]")
    p.add_argument("--rotations", default=None,
                   help=f"subset of {','.join(LLMC_ROTATIONS + ORTHOOPT_ROTATIONS)} [all]")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="orthoopt's GPTQ group by group (default) or, --no-true-sequential, every linear of a layer "
                        "from one pass as llm-compressor's GPTQModifier does")
    p.add_argument("--no-float", action="store_true", help="skip the float baseline (e.g. a second, partial run)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table (and .json beside it)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _score(result: dict) -> tuple[float, list[float]]:
    """``(ppl, window_nll)`` of one :func:`orthoopt.eval.perplexity` result."""
    return result["ppl"], [float(x) for x in result["window_nll"]]


def compare_record(float_eval: dict, rows: list[dict], seq_len: int) -> dict:
    """The run's cells as one ``orthoopt compare --json`` record, for ``benchmarks/peer_table.py``.

    The reference is the float model (``"float"``); each measured cell is a model named
    ``<row key>-<rtn|gptq>`` (``llmc-spinquant-gptq``, ``oo-optrot-rtn``) with its perplexity and
    per-window NLLs, all scored on the same windows in this process. Ratios and intervals against
    the float model are left to ``peer_table.py`` (which pairs any two cells).
    """
    ref = {"model": "float", "ppl": float_eval["ppl"], "window_nll": list(float_eval["window_nll"])}
    models = []
    for row in rows:
        for q in QUANT:
            if row.get(f"{q}_window_nll") is not None:
                models.append({"model": f"{row['key']}-{q}", "ppl": row[q], "window_nll": row[f"{q}_window_nll"]})
    return {"reference": ref, "windows": len(ref["window_nll"]), "seq_len": seq_len, "models": models}


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"peer_llmcompressor: nothing measured: {reason}", file=sys.stderr)
        return 0
    import compressed_tensors
    import llmcompressor
    import transformers

    torch.set_num_threads(args.threads)
    model_dir = args.model or default_model()
    if model_dir is None:
        print("peer_llmcompressor: error: no model: pass --model (SmolLM2-135M is not cached)", file=sys.stderr)
        return 2
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    wanted = set(args.rotations.split(",")) if args.rotations else set(LLMC_ROTATIONS + ORTHOOPT_ROTATIONS)
    progress = not args.no_progress
    load_start, t0 = os.getloadavg(), time.perf_counter()

    split = split_halves(args.text)
    base, tok = load_checkpoint(model_dir)
    calib = random_windows(token_ids(split.calib, tok), args.calib_samples, args.seq_len, seed=args.seed)
    eval_ids = token_ids(split.eval, tok)

    def ppl(model) -> float:
        return perplexity(model, eval_ids, seq_len=args.seq_len, max_tokens=args.eval_tokens, progress=progress)

    if args.no_float:
        float_ppl = {"ppl": None, "tokens": min(args.eval_tokens, eval_ids.numel()) // args.seq_len * (args.seq_len - 1)}
    else:
        float_ppl = ppl(base)
        log(f"float perplexity {float_ppl['ppl']:.3f} on {float_ppl['tokens']} predicted tokens")
    rows = []
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__}
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/peer_llmcompressor.py",
                                                           *(sys.argv[1:] if argv is None else argv)])

    def render(final: bool) -> str:
        header = [
            f"- command: `{command}`",
            f"- model: {model_dir}; text: {split.describe()}",
            f"- calibration: {args.calib_samples} windows x {args.seq_len} tokens (seed {args.seed}) from the first "
            f"half, the same token ids for both tools; evaluation: {float_ppl['tokens']} predicted tokens of the "
            f"second half in windows of {args.seq_len}",
            f"- W4 symmetric per output channel, embeddings and lm_head in full precision; GPTQ damp 0.01, no "
            f"act-order; orthoopt's GPTQ {'true sequential' if args.true_sequential else 'one pass per layer'}; "
            f"OptRot/OptRot+: {args.steps} solver steps per phase (R1, R2)",
            f"- versions: {', '.join(f'{k} {v}' for k, v in versions.items())}; {platform.platform()}, "
            f"{os.cpu_count()} CPUs, {args.threads} torch thread(s); load average at start "
            f"{'/'.join(f'{x:.1f}' for x in load_start)}, now {'/'.join(f'{x:.1f}' for x in os.getloadavg())}",
            f"- wall time so far {time.perf_counter() - t0:.0f} s" + ("" if final else " (run still in progress)"),
        ]

        def f(x, d=2):
            return "-" if x is None else f"{x:.{d}f}"

        table = ["| tool | rotation | W4 RTN ppl | W4 GPTQ ppl | rotation s | RTN s | GPTQ s |",
                 "|---|---|---:|---:|---:|---:|---:|",
                 f"| - | float (unquantized) | {f(float_ppl['ppl'])} | {f(float_ppl['ppl'])} | - | - | - |"]
        for r in rows:
            table.append(f"| {r['tool']} | {r['rotation']} | {f(r.get('rtn'))} | {f(r.get('gptq'))} | "
                         f"{f(r['rotation_s'], 1)} | {f(r.get('rtn_s'), 1)} | {f(r.get('gptq_s'), 1)} |")
        text = "\n".join(header + [""] + table) + "\n"
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            outputs = [(args.out, text), (args.out.with_suffix(".json"), json.dumps(
                {"float_ppl": float_ppl, "rows": rows, "versions": versions, "command": command,
                 "complete": final}, indent=2) + "\n")]
            if float_ppl.get("window_nll") is not None and rows:
                outputs.append((args.out.with_suffix(".compare.json"), json.dumps(
                    compare_record(float_ppl, rows, args.seq_len), indent=2) + "\n"))
            for path, content in outputs:
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(content, encoding="utf-8")
                tmp.replace(path)
        return text

    if "llmcompressor" in tools:
        for rot in (r for r in LLMC_ROTATIONS if r in wanted):
            row = {"tool": "llm-compressor", "key": f"llmc-{rot}", "rotation": NAMES[rot], "rotation_s": None}
            if rot == "spinquant":
                row["rotation"] += f" (block {spinquant_block_size(base)})"
            for q in QUANT:
                model = copy.deepcopy(base)
                info = quantize_with_llmcompressor(model, calib, method=q, spinquant=rot == "spinquant")
                row[f"{q}_s"] = info["seconds"]
                row[q], row[f"{q}_window_nll"] = _score(ppl(model))
                log(f"llm-compressor {rot} {q}: ppl {row[q]:.3f}, {info['seconds']:.1f} s")
                del model
                if not any(r is row for r in rows):
                    rows.append(row)
                render(final=False)

    if "orthoopt" in tools:
        for rot in (r for r in ORTHOOPT_ROTATIONS if r in wanted):
            rotated = copy.deepcopy(base)
            start = time.perf_counter()
            if rot != "none":  # "none": the checkpoint as loaded (norms not fused), as llm-compressor's row
                rotate_model(
                    rotated,
                    RotateConfig(rot, seed=args.seed, solve={"steps": args.steps}, calib={"tokens": args.calib_tokens}),
                    calib=calib if rot in METHODS and METHODS[rot].learned else None,
                    progress=progress,
                )
            row = {
                "tool": "orthoopt",
                "key": f"oo-{rot}",
                "rotation": NAMES[rot],
                "rotation_s": None if rot == "none" else time.perf_counter() - start,
            }
            for q in QUANT:
                model = copy.deepcopy(rotated)
                start = time.perf_counter()
                quantize_model(
                    model,
                    QuantizeConfig(
                        q, wbits=4, group_size=None, sym=True, gptq=GPTQConfig(true_sequential=args.true_sequential)
                    ),
                    calib=calib if q == "gptq" else None,
                    progress=progress,
                )
                row[f"{q}_s"] = time.perf_counter() - start
                row[q], row[f"{q}_window_nll"] = _score(ppl(model))
                log(f"orthoopt {rot} {q}: ppl {row[q]:.3f}, {row[f'{q}_s']:.1f} s")
                del model
                if not any(r is row for r in rows):
                    rows.append(row)
                render(final=False)
            del rotated

    print(render(final=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
