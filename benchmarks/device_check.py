"""The whole pipeline on a CUDA device, with time and peak device memory per phase; skips without one.

    python benchmarks/device_check.py                       # planted Llama, bfloat16, cuda
    python benchmarks/device_check.py --model DIR --device cuda:1 --windows 8 --seq-len 512
    python benchmarks/device_check.py --shape 1b --method optrot --steps 20   # Llama-3.2-1B shape
    python benchmarks/device_check.py --device cpu --allow-cpu --windows 2 --seq-len 32   # dry run

Phases, in one process on the device: ``load`` (``load_model(..., device=)``, the checkpoint's own dtype
unless ``--dtype``), ``rotate`` (``rotate_model`` with ``--method``, default hadamard, ``--steps`` for
the learned methods, fused in place on the device, invariance checked on the device), ``quantize-gptq``
(``quantize_model`` GPTQ W4 with ``--windows`` calibration windows of ``--seq-len`` tokens), ``eval``
(perplexity on the same number of windows of ``--text``, default WikiText-2 from ``../shared``, or a
synthetic text). Each phase prints its wall time, ``torch.cuda.max_memory_allocated`` (reset before
it) and the process's peak RSS so far (host memory); ``--json PATH`` writes them.

``--shape NAME`` runs on the random-weight bfloat16 checkpoint of ``benchmarks/model_size.py``'s shape
(1b, 3b, 8b, tiny; built under ``--cache`` on first use, then reused): time and memory mean something,
perplexity not. ``--shape`` and ``--model`` exclude each other.

Without CUDA (or when ``--device`` names a device this machine lacks) it prints why it skips and exits
0, so a machine with a GPU gives the numbers in one command and any other machine runs it harmlessly.
``--allow-cpu`` runs the same phases on the CPU (no device memory column), so the script itself is
tested without a GPU (``tests/test_model_size_smoke.py`` runs both). The CUDA path has not been run
yet: no GPU machine was lent for this work (``docs/performance.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import model_size  # noqa: E402  (beside this file: the shapes, their checkpoints, the WikiText-2 path)


def skip_reason(device: str, allow_cpu: bool = False) -> str | None:
    """Why the check cannot run on ``device`` here (None when it can)."""
    import torch

    if device == "cpu" and allow_cpu:
        return None
    if not device.startswith("cuda"):
        return f"device {device!r} is not a CUDA device; this check measures CUDA runs"
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        return f"{device} asked, this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (:func:`orthoopt.utils.memory.peak_rss_bytes`), 0 if unknown."""
    from orthoopt.utils.memory import peak_rss_bytes as peak

    return peak() or 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, help="model source (default: the planted Llama)")
    which.add_argument("--shape", default=None, choices=sorted(model_size.SHAPES),
                       help="a benchmarks/model_size.py shape instead of --model (random bf16 weights)")
    ap.add_argument("--cache", default=str(model_size.CACHE), help="where --shape checkpoints are built and reused")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto", help="auto (the checkpoint's own) or a dtype name; planted: bfloat16")
    ap.add_argument("--method", default="hadamard", help="rotation method (default hadamard)")
    ap.add_argument("--steps", type=int, default=None, help="solver steps of a learned method (default: its own)")
    ap.add_argument("--text", default=str(model_size.TEXT), help="evaluation / calibration text (default WikiText-2 test)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on --device cpu too (a dry run of the script)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    reason = skip_reason(args.device, args.allow_cpu)
    if reason is not None:
        print(f"device_check: skipped: {reason}")
        return 0

    import torch

    from orthoopt.models import load_model, load_tokenizer
    from orthoopt.eval.perplexity import perplexity
    from orthoopt.config import RotateConfig
    from orthoopt.pipeline import rotate_model
    from orthoopt.quant import calibration_batches, quantize_model
    from orthoopt.quant.config import QuantizeConfig

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    records: list[dict] = []

    def phase(name: str, fn):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        rec = {"phase": name, "seconds": round(time.perf_counter() - began, 3),
               "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
               "peak_rss_bytes": peak_rss_bytes()}
        records.append(rec)
        gpu = f"{rec['max_memory_allocated_bytes'] / 1e9:.2f}" if cuda else "-"
        print(f"| {name} | {rec['seconds']} | {gpu} | {rec['peak_rss_bytes'] / 1e9:.2f} |", flush=True)
        return out

    source = args.model or "planted"
    if args.shape is not None:
        source = str(model_size.build_checkpoint(model_size.SHAPES[args.shape], Path(args.cache)))
    dtype = "bfloat16" if source == "planted" and args.dtype == "auto" else args.dtype
    text_path = Path(args.text) if Path(args.text).is_file() else None
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    settings = {} if args.steps is None else {"solve": {"steps": args.steps}}
    print(f"device_check: {args.shape or source} on {name}, {args.method} + GPTQ W4 + eval")
    print("| phase | seconds | max memory allocated GB | peak RSS so far GB |\n|---|---:|---:|---:|")
    model = phase("load", lambda: load_model(source, dtype=dtype, device=device))
    tokenizer = load_tokenizer(source)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    config = RotateConfig(args.method, **settings)
    text = text_path.read_text(encoding="utf-8") if text_path else " rotations and outliers .\n" * 20000
    with tempfile.TemporaryDirectory() as tmp:
        calib_file = Path(tmp) / "calib.txt"
        calib_file.write_text(text[: 4 * args.windows * args.seq_len * 8], encoding="utf-8")
        calib = calibration_batches(calib_file, tokenizer, nsamples=args.windows, seq_len=args.seq_len, seed=0)
    rot_calib = calib if config.entry.needs_calibration else None  # the data methods' (spinquant's) windows
    phase("rotate", lambda: rotate_model(model, config, calib=rot_calib, verify_ids=ids, progress=False))
    phase("quantize-gptq", lambda: quantize_model(model, QuantizeConfig("gptq", wbits=4), calib=calib, progress=False))
    result = phase("eval", lambda: perplexity(model, tokenizer, text=text, seq_len=args.seq_len,
                                              max_tokens=args.windows * args.seq_len, progress=False))
    print(f"device_check: perplexity {result['ppl']:.3f} over {result['tokens']} tokens")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "model": args.shape or source, "method": args.method,
                                               "steps": args.steps, "windows": args.windows, "seq_len": args.seq_len,
                                               "dtype": str(next(model.parameters()).dtype),
                                               "ppl": result["ppl"], "phases": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
