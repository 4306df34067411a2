"""``orthoopt eval``: perplexity of a checkpoint on a text, with its quant.json activation settings applied.

Windows are non-overlapping and ``seq_len`` long (the WikiText-2 protocol, docs/quantization.md).
``--tasks`` adds zero-shot task accuracy through lm-eval-harness (optional dependency; datasets from
the local cache, :mod:`orthoopt.eval.tasks`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from orthoopt.errors import InvalidInputError
from orthoopt.models.dtypes import DTYPE_CHOICES
from orthoopt.eval.layered import perplexity_layered
from orthoopt.eval.perplexity import perplexity
from orthoopt.quant.calib import read_text
from orthoopt.quant.model import load_layered, load_quantized
from orthoopt.cli.memory_check import add_force, check_memory
from orthoopt.utils.checks import check_device
from orthoopt.cli.usage import help_kwargs
from orthoopt.utils.argtypes import integer, real

DESCRIPTION = """\
Measure the perplexity of a checkpoint on a text file, and optionally zero-shot task accuracy.

A folder written by 'orthoopt quantize' is evaluated with the settings in its quant.json applied
again (activation and K/V-cache quantization, online Hadamard); any other model is evaluated as it
is. The text is cut into non-overlapping windows of --seq-len tokens (the WikiText-2 protocol of
GPTQ, QuaRot and SpinQuant). --tasks runs lm-eval-harness tasks (pip install "orthoopt[eval]";
the tasks' datasets must already be in the local Hugging Face cache)."""

EXAMPLES = (
    "orthoopt eval runs/rot-w4 --text wikitext2-test.txt --seq-len 2048",
    "orthoopt eval runs/rot-w4 --text wikitext2-test.txt --max-tokens 40000 --json",
    "orthoopt eval runs/rot-w4 --tasks piqa,arc_easy --limit 200",
)
DOCS = ("docs/quantization.md (perplexity protocol)", "docs/export.md (--tasks)")


MODEL_HELP = ("model folder (with tokenizer; quant.json if quantized), .gguf file, registered name, planted, "
              "or Hub id")


def add_window_args(p: argparse.ArgumentParser) -> None:
    """The windowing flags of perplexity (``--seq-len``, ``--max-tokens``, ``--batch-size``), shared
    with ``orthoopt compare``."""
    p.add_argument("--seq-len", type=integer(2), default=None, help="window length (default: context, max 2048)")
    p.add_argument("--max-tokens", type=integer(1), default=None, help="evaluate only the first N tokens")
    p.add_argument("--batch-size", type=integer(1), default=1, help="windows per forward pass; default 1")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="perplexity of a (quantized) checkpoint on a text file", **help_kwargs(DESCRIPTION, EXAMPLES, DOCS)
    )
    p.add_argument("model_dir", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--text", default=None, help="evaluation text file (e.g. ../shared/data/wikitext2-test.txt)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks (e.g. piqa,arc_easy) or task YAML files; needs lm-eval "
                        "and the tasks' datasets in the local Hugging Face cache")
    p.add_argument("--num-fewshot", type=integer(0), default=None, help="lm-eval few-shot examples (default: the task's)")
    p.add_argument("--limit", type=real(0, low_open=True), default=None, help="lm-eval: examples per task (fraction if < 1)")
    add_window_args(p)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype the model is loaded and run in (auto, the default: the checkpoint's own; "
                        "log-probabilities are taken from float32 logits)")
    p.add_argument("--device", default=None, help="where the model computes, e.g. cuda or cuda:1 (default cpu): the "
                   "whole model is moved there after loading, or with --streamed one layer at a time; refused when "
                   "not available")
    p.add_argument("--streamed", action="store_true",
                   help="hold one decoder layer at a time (plus embedding, lm_head and the windows' hidden states): "
                        "read layer by layer from the safetensors files; the same figures as without it. Perplexity "
                        "only (not --tasks); Hugging Face folders with plain safetensors weights")
    add_force(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if args.text is None and args.tasks is None:
        raise InvalidInputError("nothing to evaluate: pass --text TEXT_FILE (perplexity) and/or --tasks TASKS (lm-eval)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks is not None else []
    if args.tasks is not None and not tasks:
        raise InvalidInputError("--tasks is empty")
    if args.streamed and tasks:
        raise InvalidInputError("--tasks runs lm-eval on the whole model: it does not combine with --streamed")
    text = read_text(args.text) if args.text is not None else None  # fail on a bad text before loading
    if tasks:
        from orthoopt.eval.tasks import _import_lm_eval

        _import_lm_eval()  # fail on a missing lm-eval before loading the model
    device = check_device(args.device, "--device")
    _check_memory(args, None if text is None else len(text))
    if args.streamed:
        loaded = load_layered(args.model_dir, args.dtype, device)
    else:
        loaded = load_quantized(args.model_dir, args.dtype)
        if device is not None:
            loaded.model.to(device)
    start = time.perf_counter()
    record = {"model": str(args.model_dir), "text": None if text is None else str(args.text),
              "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."), "streamed": args.streamed}
    if text is not None:
        score = (perplexity if loaded.layered is None else
                 lambda _, *a, **k: perplexity_layered(loaded.layered, *a, **k))
        record.update(score(
            loaded.model, loaded.tokenizer, text=text, seq_len=args.seq_len, max_tokens=args.max_tokens,
            batch_size=args.batch_size, progress=not args.no_progress,
        ))
    if tasks:
        from orthoopt.eval.tasks import evaluate_tasks

        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        record.update(evaluate_tasks(loaded.model, loaded.tokenizer, tasks, num_fewshot=args.num_fewshot,
                                     limit=limit, batch_size=args.batch_size))
    record.update({"quant": loaded.quant, "seconds": round(time.perf_counter() - start, 3)})
    error = undefined_figures(record)
    if args.json:
        print(json.dumps(record, allow_nan=False))
    else:
        q = loaded.quant
        kv = f"KV{q['kvbits']}" if q and (q.get("kvbits") or 16) < 16 else ""
        tag = f" (W{q['wbits']}A{q['abits']}{kv} {q['method']})" if q else ""
        if text is not None and record.get("ppl") is not None:
            print(
                f"perplexity {record['ppl']:.4f}{tag}: nll {record['nll']:.4f} over {record['tokens']} tokens "
                f"in {record['windows']} windows of {record['seq_len']}"
            )
        for task, metrics in record.get("tasks", {}).items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"{task}{tag}: {shown}")
    if error:
        print(f"orthoopt eval: warning: {error}", file=sys.stderr)
    return 0


def _check_memory(args, text_chars: int | None) -> None:
    """Refuse (exit 2) before loading when the estimated peak does not fit (``--force`` skips it);
    ``text_chars`` bounds the evaluated tokens of ``--streamed`` (at most one token per two characters)."""
    from orthoopt.models.dtypes import resolve_model_dtype
    from orthoopt.models.footprint import eval_estimate
    from orthoopt.models.sources import resolve_source

    source = resolve_source(args.model_dir, progress=not args.no_progress)
    dtype = resolve_model_dtype(source, args.dtype)
    seq_len = args.seq_len or 2048
    tokens = min(x for x in (args.max_tokens, (text_chars or 0) // 2 + 1) if x is not None)
    check_memory("orthoopt eval", source, lambda ck: eval_estimate(
        ck, dtype, min(seq_len, ck.max_position or seq_len), args.batch_size,
        streamed_tokens=tokens if args.streamed else None), args.force)
    from orthoopt.utils.cpu import bf16_note

    bf16_note("orthoopt eval", dtype, args.device)


def undefined_figures(record: dict) -> str | None:
    """Replace non-finite ``ppl`` / ``nll`` (and ``window_nll`` entries) in ``record`` by None (strict
    JSON) and add an ``"error"`` entry saying why; returns that message (None when both are finite)."""
    ppl, nll = record.get("ppl"), record.get("nll")
    if isinstance(nll, float) and not math.isfinite(nll):
        message = (f"the mean negative log-likelihood is {nll}: the model's logits are not finite on this "
                   "text (overflow in its dtype?); perplexity is undefined")
    elif isinstance(ppl, float) and not math.isfinite(ppl):
        message = f"perplexity exp({nll:.6g}) overflows float64; the figure is the nll"
    else:
        return None
    for key in ("ppl", "nll"):
        if isinstance(record.get(key), float) and not math.isfinite(record[key]):
            record[key] = None
    if "window_nll" in record:
        record["window_nll"] = [v if math.isfinite(v) else None for v in record["window_nll"]]
    record["error"] = message
    return message
