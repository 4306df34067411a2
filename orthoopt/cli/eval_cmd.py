"""``orthoopt eval``: perplexity of a checkpoint on a text, with its quant.json activation settings applied.

Windows are non-overlapping and ``seq_len`` long (the WikiText-2 protocol, docs/quantization.md).
"""

from __future__ import annotations

import argparse
import json
import time

from orthoopt.eval.perplexity import perplexity
from orthoopt.quant.calib import read_text
from orthoopt.quant.model import load_quantized


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="perplexity of a (quantized) checkpoint on a text file", description=__doc__.splitlines()[0]
    )
    p.add_argument("model_dir", help="Hugging Face model folder (with tokenizer; quant.json if quantized)")
    p.add_argument("--text", required=True, help="evaluation text file (e.g. ../shared/data/wikitext2-test.txt)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: context, max 2048)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass; default 1")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    text = read_text(args.text)  # fail on a bad text before loading the model
    loaded = load_quantized(args.model_dir)
    start = time.perf_counter()
    result = perplexity(
        loaded.model, loaded.tokenizer, text=text, seq_len=args.seq_len, max_tokens=args.max_tokens,
        batch_size=args.batch_size, progress=not args.no_progress,
    )
    record = {
        "model": str(args.model_dir), "text": str(args.text), **result,
        "quant": loaded.quant, "seconds": round(time.perf_counter() - start, 3),
    }
    if args.json:
        print(json.dumps(record))
    else:
        q = loaded.quant
        kv = f"KV{q['kvbits']}" if q and (q.get("kvbits") or 16) < 16 else ""
        tag = f" (W{q['wbits']}A{q['abits']}{kv} {q['method']})" if q else ""
        print(
            f"perplexity {result['ppl']:.4f}{tag}: nll {result['nll']:.4f} over {result['tokens']} tokens "
            f"in {result['windows']} windows of {result['seq_len']}"
        )
    return 0
