"""``orthoopt diagnose``: outlier statistics and plots of one or more model folders, overlaid.

Measures the weights as stored (no norm fusion, no rotation): per block and per layer max |w|,
incoherence, excess kurtosis, fourth-power sum, outlier fraction and W4 RTN error, with the histogram and
the per-input-channel max |W| of one block; with ``--calib``
also the inputs of every linear layer on the first N tokens of a text. Writes PNG + SVG plots and
``summary.json`` into ``--out`` atomically. See docs/diagnostics.md.
"""

from __future__ import annotations

import argparse
import json

from orthoopt.models.dtypes import DTYPE_CHOICES
from orthoopt.diagnostics.activations import DEFAULT_MASSIVE_RATIO
from orthoopt.diagnostics.compare import diagnose_models
from orthoopt.core.grid import MAX_BITS, MIN_BITS
from orthoopt.diagnostics.stats import DEFAULT_BITS, DEFAULT_K
from orthoopt.cli.usage import help_kwargs
from orthoopt.errors import InvalidInputError
from orthoopt.utils.argtypes import integer, real

DESCRIPTION = f"""\
Outlier statistics and plots of one or more models, overlaid (e.g. before and after rotation).

The weights are measured as stored (no norm fusion, no rotation): per block and per layer the
largest |w|, incoherence, excess kurtosis, fourth-power sum, outlier fraction and RTN error
(--bits, default {DEFAULT_BITS}), with a histogram and the per-input-channel max |W| of one block.
With --calib, also the inputs of every linear layer on the first --calib-tokens tokens of a text. Writes PNG and SVG plots and
summary.json into --out (atomically)."""

EXAMPLES = (
    "orthoopt diagnose smollm2-135m runs/rot --out runs/diag --labels original,optrot",
    "orthoopt diagnose smollm2-135m runs/rot --out runs/diag --calib calib.txt --calib-tokens 4096",
)
DOCS = ("docs/diagnostics.md",)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "diagnose", help="outlier statistics and plots of model folders (e.g. before/after rotation)",
        **help_kwargs(DESCRIPTION, EXAMPLES, DOCS),
    )
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="model folders (or .gguf files, registered names, planted, Hub ids), one series each")
    p.add_argument("--out", required=True, help="output folder for plots and summary.json (written atomically)")
    p.add_argument("--calib", default=None, help="text file: add activation statistics on its first tokens")
    p.add_argument("--calib-tokens", type=integer(1), default=2048, help="tokens of --calib to run; default 2048")
    p.add_argument("--seq-len", type=integer(1), default=None,
                   help="--calib tokens per forward sequence; default 512, or the model's context if shorter")
    p.add_argument("--labels", default=None, help="comma-separated series labels (default: folder names)")
    p.add_argument("--block", default=None,
                   help="weight block of the histogram, e.g. layers.3.mlp.down_proj (default: most incoherent)")
    p.add_argument("--act-module", default=None,
                   help="linear layer whose input the activation plots show (default: the residual-stream "
                        "input with the largest max/median channel magnitude)")
    p.add_argument("--k", type=real(0, low_open=True), default=DEFAULT_K,
                   help=f"outlier threshold in standard deviations; default {DEFAULT_K:g}")
    p.add_argument("--bits", type=integer(MIN_BITS, MAX_BITS), default=DEFAULT_BITS,
                   help=f"RTN error bit width; default {DEFAULT_BITS}")
    p.add_argument("--massive-ratio", type=real(0, low_open=True), default=DEFAULT_MASSIVE_RATIO,
                   help=f"massive token: max |x| > this x median |x|; default {DEFAULT_MASSIVE_RATIO:g}")
    p.add_argument("--massive-min-abs", type=real(0), default=0.0,
                   help="massive token: also max |x| > this absolute value; default 0")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype each model is loaded in (auto, the default: the checkpoint's own; the statistics "
                        "are computed in float64 per tensor)")
    p.add_argument("--streamed", action="store_true",
                   help="hold one decoder layer at a time (Hugging Face folders with safetensors weights): the same "
                        "weight and activation statistics")
    p.add_argument("--device", default=None,
                   help="where the statistics and the calibration forward compute, e.g. cuda or cuda:1 (default "
                        "cpu): each model is moved there after loading, or with --streamed one layer at a time; "
                        "refused when not available")
    p.add_argument("--json", action="store_true", help="print summary.json on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=run)
    return p


def _labels(text: str | None, count: int) -> list[str] | None:
    if text is None:
        return None
    labels = [s.strip() for s in text.split(",")]
    if len(labels) != count or not all(labels):
        raise InvalidInputError(f"--labels needs {count} non-empty comma-separated labels, got {text!r}")
    return labels


def _fmt(value: float | None, width: int, spec: str) -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"


def run(args) -> int:
    summary = diagnose_models(
        args.models, args.out, labels=_labels(args.labels, len(args.models)), calib=args.calib,
        calib_tokens=args.calib_tokens, seq_len=args.seq_len, block=args.block, act_module=args.act_module,
        k=args.k, bits=args.bits, massive_ratio=args.massive_ratio, massive_min_abs=args.massive_min_abs,
        dtype=args.dtype, progress=not args.no_progress, streamed=args.streamed, device=args.device,
    )
    if args.json:
        print(json.dumps(summary, allow_nan=False))
        return 0
    act = summary["act_module"]
    print(f"{'model':<24} {'mean mu':>9} {'max mu':>9} {'mean kurt':>10} {'RTN W' + str(args.bits) + ' err':>11}"
          + (f"  channel max/median of {act} input" if act else ""))
    for m in summary["models"]:
        o = m["overall"]
        line = (f"{m['label']:<24} {_fmt(o['incoherence_mean'], 9, '.2f')} {_fmt(o['incoherence_max'], 9, '.2f')} "
                f"{_fmt(o['excess_kurtosis_mean'], 10, '.2f')} {_fmt(o['rtn_error'], 11, '.4f')}")
        if o.get("undefined_blocks"):
            line += f"  ({len(o['undefined_blocks'])} all-zero/constant blocks left out: {o['undefined_blocks'][0]} ...)"
        if act:
            ratio = next(r["channel_max_ratio"] for r in m["activations"]["inputs"] if act in r["modules"])
            line += f"  {'-' if ratio is None else f'{ratio:.1f}'}"
        print(line)
    figures = sum(name.endswith(".png") for name in summary["plots"])
    print(f"wrote {figures} plots (PNG + SVG) and summary.json to {args.out}")
    return 0
