"""The whole pipeline on a CUDA device, with time and peak device memory per phase; skips without one.

    python benchmarks/device_check.py                       # planted Llama, bfloat16, cuda
    python benchmarks/device_check.py --model DIR --device cuda:1 --windows 8 --seq-len 512

Phases, in one process on the device: ``load`` (``load_model(..., device=)``, the checkpoint's own dtype
unless ``--dtype``), ``rotate`` (``rotate_model`` with ``--method``, default hadamard, fused in place on
the device, invariance checked on the device), ``quantize-gptq`` (``quantize_model`` GPTQ W4 with
``--windows`` calibration windows of ``--seq-len`` tokens), ``eval`` (perplexity on the same number of
windows of WikiText-2, or a synthetic text). Each phase prints its wall time and
``torch.cuda.max_memory_allocated`` (reset before it); ``--json PATH`` writes them.

Without CUDA (or when ``--device`` names a device this machine lacks) it prints why it skips and exits
0, so a machine with a GPU gives the numbers in one command and any other machine runs it harmlessly
(``tests/test_model_size_smoke.py`` runs the skip path). The CUDA path has not been run for this
commit: no GPU was available (``docs/performance.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
TEXT = REPO.parent / "shared" / "data" / "wikitext2-test.txt"


def skip_reason(device: str) -> str | None:
    """Why the check cannot run on ``device`` here (None when it can)."""
    import torch

    if not device.startswith("cuda"):
        return f"device {device!r} is not a CUDA device; this check measures CUDA runs"
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        return f"{device} asked, this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="planted", help="model source (default: the planted Llama)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto", help="auto (the checkpoint's own) or a dtype name; planted: bfloat16")
    ap.add_argument("--method", default="hadamard", help="rotation method (default hadamard)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    reason = skip_reason(args.device)
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
    records: list[dict] = []

    def phase(name: str, fn):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        rec = {"phase": name, "seconds": round(time.perf_counter() - began, 3),
               "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device)}
        records.append(rec)
        print(f"| {name} | {rec['seconds']} | {rec['max_memory_allocated_bytes'] / 1e9:.2f} |", flush=True)
        return out

    dtype = "bfloat16" if args.model == "planted" and args.dtype == "auto" else args.dtype
    text_path = TEXT if TEXT.is_file() else None
    print(f"device_check: {args.model} on {torch.cuda.get_device_name(device)}, {args.method} + GPTQ W4 + eval")
    print("| phase | seconds | max memory allocated GB |\n|---|---:|---:|")
    model = phase("load", lambda: load_model(args.model, dtype=dtype, device=device))
    tokenizer = load_tokenizer(args.model)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    phase("rotate", lambda: rotate_model(model, RotateConfig(args.method), verify_ids=ids, progress=False))
    text = text_path.read_text(encoding="utf-8") if text_path else " rotations and outliers .\n" * 20000
    calib_file = Path(args.json or "device_check").with_suffix(".calib.txt")
    calib_file.write_text(text[: 4 * args.windows * args.seq_len * 8], encoding="utf-8")
    calib = calibration_batches(calib_file, tokenizer, nsamples=args.windows, seq_len=args.seq_len, seed=0)
    calib_file.unlink()
    phase("quantize-gptq", lambda: quantize_model(model, QuantizeConfig("gptq", wbits=4), calib=calib, progress=False))
    result = phase("eval", lambda: perplexity(model, tokenizer, text=text, seq_len=args.seq_len,
                                              max_tokens=args.windows * args.seq_len, progress=False))
    print(f"device_check: perplexity {result['ppl']:.3f} over {result['tokens']} tokens")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(device), "model": args.model,
                                               "phases": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
