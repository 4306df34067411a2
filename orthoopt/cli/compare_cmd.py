"""``orthoopt compare``: perplexity ratios against a reference on the same windows, with paired-bootstrap 95% intervals.

Every MODEL is loaded as ``orthoopt eval`` loads it and scored on the same non-overlapping windows,
one model in memory at a time (:func:`orthoopt.eval.compare.compare_models`); the interval method and
its assumptions are in docs/quantization.md, "Comparing models: paired bootstrap".
"""

from __future__ import annotations

import argparse
import json

from orthoopt.cli.eval_cmd import MODEL_HELP, add_window_args
from orthoopt.cli.usage import help_kwargs
from orthoopt.utils.argtypes import integer
from orthoopt.eval.bootstrap import DEFAULT_RESAMPLES, MIN_WINDOWS
from orthoopt.eval.compare import check_options, compare_models
from orthoopt.quant.calib import read_text


DESCRIPTION = f"""\
Is a model really better than another? Perplexity ratios against a reference, with 95% intervals.

Every MODEL and the reference REF are scored on the same non-overlapping windows of --text (one
model in memory at a time; folders written by 'orthoopt quantize' with their quant.json settings).
For each MODEL: its perplexity, the ratio ppl(MODEL) / ppl(REF), a 95% interval of that ratio from a
paired bootstrap over windows, and a verdict: lower, higher or not separated (the interval holds 1).
The interval covers the evaluation windows only, not the chance of calibration or rotation seeds.
The text must give at least {MIN_WINDOWS} windows (exit 2 otherwise)."""

EXAMPLES = (
    "orthoopt compare runs/rtn-w4 runs/optrot-rtn-w4 runs/hadamard-rtn-w4 --text wikitext2-test.txt",
    "orthoopt compare smollm2-135m runs/rot-w4 --text wikitext2-test.txt --seq-len 512 --max-tokens 32768 --json",
)
DOCS = ("docs/quantization.md (Comparing models: paired bootstrap)",)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare", help="perplexity ratios against a reference, with paired-bootstrap 95%% intervals",
        **help_kwargs(DESCRIPTION, EXAMPLES, DOCS),
    )
    p.add_argument("reference", metavar="REF", help="the reference model: " + MODEL_HELP)
    p.add_argument("models", nargs="+", metavar="MODEL", help="models compared with REF (same kinds of source)")
    p.add_argument("--text", required=True, help="evaluation text file (e.g. ../shared/data/wikitext2-test.txt)")
    add_window_args(p)
    p.add_argument("--resamples", type=integer(1), default=DEFAULT_RESAMPLES,
                   help=f"bootstrap resamples; default {DEFAULT_RESAMPLES}")
    p.add_argument("--seed", type=integer(0), default=0, help="bootstrap seed (non-negative); default 0")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)
    return p


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(record: dict) -> str:
    """The text report of a :func:`orthoopt.eval.compare.compare_models` record."""
    ref = record["reference"]
    lines = [f"reference {ref['model']}: perplexity {_fmt(ref['ppl'])} (nll {ref['nll']:.4f}) on "
             f"{record['windows']} windows of {record['seq_len']} tokens",
             f"paired bootstrap over windows: {record['resamples']} resamples, seed {record['seed']}"]
    width = max(len("model"), *(len(m["model"]) for m in record["models"]))
    lines.append(f"{'model':<{width}}  {'ppl':>10}  {'ratio':>8}  {'95% CI of ratio':<21}  verdict")
    for m in record["models"]:
        ci = "-" if m["ci95"] is None else f"[{_fmt(m['ci95'][0])}, {_fmt(m['ci95'][1])}]"
        lines.append(f"{m['model']:<{width}}  {_fmt(m['ppl']):>10}  {_fmt(m['ratio']):>8}  {ci:<21}  {m['verdict']}")
    return "\n".join(lines)


def run(args) -> int:
    check_options(args.resamples, args.seed, args.seq_len, args.max_tokens, args.batch_size, flags=True)
    text = read_text(args.text)  # fail on a bad text before loading anything
    record = compare_models(args.reference, args.models, text, seq_len=args.seq_len, max_tokens=args.max_tokens,
                            batch_size=args.batch_size, resamples=args.resamples, seed=args.seed,
                            progress=not args.no_progress)
    record = {"reference": record.pop("reference"), "text": str(args.text), **record}
    if args.json:
        print(json.dumps(record, allow_nan=False))
    else:
        print(format_table(record))
    return 0
