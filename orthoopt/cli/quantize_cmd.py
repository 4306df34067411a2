"""``orthoopt quantize``: (optionally rotate,) quantize a checkpoint's weights (RTN or GPTQ), write it
with ``report.md``.

The command builds :func:`orthoopt.jobs.oneshot.oneshot`'s arguments from argv (``--rotate METHOD``
with ``orthoopt rotate``'s options, added from :func:`orthoopt.cli.rotate_cmd.add_rotate_options`, or
a ``--recipe`` file) and runs it. OUT holds the checkpoint (compressed-tensors when the settings are
representable, else orthoopt's fake-quantized format with ``quant.json``, which ``orthoopt eval``
reads to re-install the activation quantization and online Hadamard), ``report.md`` and its pictures.
See docs/quantization.md and docs/export.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from orthoopt.models.dtypes import DTYPE_CHOICES
from orthoopt.cli.memory_check import add_force, check_memory
from orthoopt.cli.rotate_cmd import SIM_QUANT_OPTIONS, add_rotate_options, config_from_args, method_choices_help
from orthoopt.errors import InvalidInputError
from orthoopt.cli.usage import help_kwargs
from orthoopt.jobs.settings import FORMAT_CHOICES, QuantizeSettings
from orthoopt.methods import METHODS, names
from orthoopt.quant.calib_source import DEFAULT_COLUMN, DEFAULT_SPLIT, CalibSource
from orthoopt.quant.quantizer import MAX_BITS, MIN_BITS
from orthoopt.quant.schemes import PER_CHANNEL, SCHEMES
from orthoopt.utils.argtypes import integer, real

DESCRIPTION = """\
Quantize a model's weights (RTN or GPTQ), optionally rotating it first, and write the checkpoint
with a report (report.md: settings, perplexity, time per phase, pictures).

--rotate METHOD rotates the model before quantizing it, with every option of 'orthoopt rotate'
(--steps, --solver, ...): one command instead of 'orthoopt rotate' then 'orthoopt quantize', with
the same result. --recipe FILE.yaml takes all settings from one file (docs/quantization.md,
"Recipes"; examples/recipes/).

Pick the settings by compressed-tensors scheme name (--scheme W4A16, the names llm-compressor's
recipes use) or flag by flag; --wbits, --group-size, --sym/--asym and --abits given explicitly win
over the scheme (quant.json records the scheme and what was overridden). Without either, the
weights are 4-bit, symmetric, one scale per output channel, activations not quantized.

The default --format auto writes a compressed-tensors checkpoint (packed integer weights that
transformers and vLLM load without orthoopt) whenever that format can carry the settings: the W*A16
schemes, W4A8/W8A8 (dynamic int8 activations) and --online-hadamard for power-of-two intermediate
sizes. What it cannot carry (int4 activations, K/V-cache quantization, R3, MoE experts, R4 at other
sizes) goes to orthoopt's own format (fake-quantized float weights + quant.json, which 'orthoopt
eval' reads to re-install activation and K/V-cache quantization); report.md says which and why.
Naming --format compressed-tensors refuses such settings before any work.

--calib takes a text file or a Hugging Face dataset from the local cache: hf:NAME[:CONFIG] with
--calib-split and --calib-text-column (needs the datasets package)."""

EXAMPLES = (
    "orthoopt quantize smollm2-135m --rotate optrot --scheme W4A16 --group-size 64 --out runs/optrot-w4 --eval-text wiki.txt",
    "orthoopt quantize smollm2-135m --rotate optrot --steps 50 --scheme W4A16 --group-size 64 --method gptq --calib calib.txt "
    "--out runs/q",
    "orthoopt quantize MODEL --rotate spinquant --calib hf:Salesforce/wikitext:wikitext-2-raw-v1 --scheme W4A8 "
    "--out runs/sq",
    "orthoopt quantize smollm2-135m --recipe examples/recipes/optrot-w4a16.yaml --out runs/recipe",
    "orthoopt quantize runs/rot --out runs/rot-w4 --scheme W4A16  # an already rotated model",
    "orthoopt quantize runs/rot --out runs/rot-g64 --scheme W4A16 --group-size 64  # flag wins: groups of 64",
)
DOCS = ("docs/quantization.md", "docs/export.md (compressed-tensors, vLLM)", "docs/solvers.md (rotation methods)")

CLIP = real(0, 1, low_open=True)  # a clipping ratio in (0, 1]
BITS = integer(MIN_BITS, MAX_BITS, also=(16,))  # 16 = off


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize",
        help="rotate (optional) and quantize a model (RTN/GPTQ, by scheme name or flag by flag), with a report",
        **help_kwargs(DESCRIPTION, EXAMPLES, DOCS),
    )
    p.add_argument("model_dir", metavar="MODEL",
                   help="model folder (with tokenizer), .gguf file, registered name (smollm2-135m), planted, or Hub id")
    p.add_argument("--out", required=True, help="output folder (written atomically, with report.md)")
    p.add_argument("--recipe", default=None, metavar="FILE.yaml",
                   help="take the rotation, quantization and evaluation settings from a YAML recipe "
                        "(docs/quantization.md, Recipes); the settings flags are then refused")
    p.add_argument("--rotate", default=None, choices=tuple(METHODS), metavar="METHOD",
                   help="rotate the model first with this method (default: no rotation): " + method_choices_help())
    p.add_argument("--method", default="rtn", choices=("rtn", "gptq"), help="weight quantization method (default rtn)")
    p.add_argument("--scheme", default=None, metavar="SCHEME",
                   help="compressed-tensors scheme name, e.g. W4A16 (4-bit weights, groups of 128), W4A16_ASYM, "
                        "W8A16, W4A8, W8A8; sets --wbits, --group-size, --sym/--asym and --abits, and an explicit "
                        f"flag wins over it. One of: {', '.join(SCHEMES)}")
    p.add_argument("--wbits", type=BITS, default=None,
                   help=f"weight bits, {MIN_BITS}-{MAX_BITS} or 16 (off); default: the scheme's, else 4")
    p.add_argument("--group-size", type=integer(1, also=(PER_CHANNEL,)), default=None,
                   help=f"input columns per scale, {PER_CHANNEL} for one scale per output channel; default: the "
                        "scheme's, else per output channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help="symmetric weight grid (default, unless the scheme is asymmetric)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric weight grid with zero point")
    p.add_argument("--mse-clip", action="store_true", help="search the weight clipping ratio per row (MSE grid)")
    p.add_argument("--abits", type=integer(), default=None, choices=(16, 8, 4),
                   help="activation bits, per token and dynamic (16 = off); default: the scheme's, else 16")
    p.add_argument("--act-asym", action="store_true", help="asymmetric per-token activation grid (default symmetric)")
    p.add_argument("--act-clip", type=CLIP, default=1.0, help="activation clipping ratio in (0, 1]; default 1")
    p.add_argument("--online-hadamard", action="store_true", help="online Hadamard before down_proj (R4)")
    p.add_argument("--kvbits", type=BITS, default=16, help="K/V-cache bits (16 = off); default 16")
    p.add_argument("--kv-group-size", type=integer(1), default=None,
                   help="K/V channels per scale within a head (default: head_dim, one scale per token and head)")
    p.add_argument("--kv-sym", action="store_true", help="symmetric K/V grid (default asymmetric, as QuaRot/SpinQuant)")
    p.add_argument("--k-clip", type=CLIP, default=1.0, help="K clipping ratio in (0, 1]; default 1")
    p.add_argument("--v-clip", type=CLIP, default=1.0, help="V clipping ratio in (0, 1]; default 1")
    p.add_argument("--r3", action="store_true", help="online head-wise Hadamard on queries and keys after RoPE (R3)")
    p.add_argument("--calib", default=None, metavar="TEXT",
                   help="calibration text: a text file, or hf:NAME[:CONFIG] (a Hugging Face dataset in the local "
                        "cache); needed by GPTQ and by the rotation methods "
                        f"{', '.join(names(lambda m: m.needs_calibration))}")
    p.add_argument("--calib-split", default=None, help=f"hf: datasets: the split (default {DEFAULT_SPLIT})")
    p.add_argument("--calib-text-column", default=None,
                   help=f"hf: datasets: the text column (default {DEFAULT_COLUMN})")
    p.add_argument("--nsamples", type=integer(1), default=128, help="calibration windows; default 128")
    p.add_argument("--seq-len", type=integer(1), default=None, help="calibration window length (default: context, max 2048)")
    p.add_argument("--seed", type=integer(0), default=0,
                   help="calibration sampling seed (and, with --rotate, the rotation's seed); default 0")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: quantize each layer's input-sharing groups one after the other, each with the "
                        "Hessians of the earlier groups' quantized outputs (default); --no-true-sequential: "
                        "all of a layer's linears from one pass (as llm-compressor; fewer forward passes)")
    p.add_argument("--damp", type=real(0, 1e6), default=0.01, help="GPTQ dampening, fraction of mean diag(H); default 0.01")
    p.add_argument("--block-size", type=integer(1), default=128, help="GPTQ lazy-update block size; default 128")
    p.add_argument(
        "--format", default="auto", choices=FORMAT_CHOICES,
        help="auto (default): compressed-tensors when it can carry the settings, else orthoopt; "
        "compressed-tensors: packed integer weights loadable by transformers/vLLM (refuses what it cannot carry); "
        "orthoopt: fake-quantized float weights + quant.json (docs/export.md)",
    )
    p.add_argument("--eval-text", default=None, metavar="TEXT_FILE",
                   help="measure the float and the quantized perplexity on this text (with the ratio's paired-"
                        "bootstrap 95%% interval) for report.md")
    p.add_argument("--eval-seq-len", type=integer(2), default=None,
                   help="evaluation window length (default: the model's context, at most 2048)")
    p.add_argument("--eval-max-tokens", type=integer(1), default=None, help="evaluate only the first N tokens")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype the model is loaded in and its weights written in (auto, the default: the "
                        "checkpoint's own; RTN/GPTQ compute per layer in float32 and cast back)")
    p.add_argument("--device", default=None,
                   help="where the model computes, e.g. cuda or cuda:1 (default cpu): the whole model is moved there "
                        "after loading (after rotating, with --rotate), or with --streamed one layer at a time; the "
                        "rotation's objective and solver compute there too; refused when not available")
    p.add_argument("--streamed", action="store_true",
                   help="hold one decoder layer at a time in every step: the rotation (with --rotate) streams from "
                        "the safetensors files, quantization (RTN or GPTQ) reads, quantizes and writes one layer's "
                        "shard at a time, and --eval-text is scored layer by layer; same weights as without it. "
                        "Writes orthoopt's format; Hugging Face folders with plain safetensors weights")
    add_force(p)
    r = p.add_argument_group("rotation (with --rotate)", "the options of 'orthoopt rotate'; --calib and --seed are "
                             "shared, and spinquant's loss simulates this command's quantization settings")
    global ROTATE_DESTS
    ROTATE_DESTS = tuple(add_rotate_options(r, r, skip=(*SIM_QUANT_OPTIONS, *SHARED_OPTIONS)))
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    defaults: dict = {}
    for a in p._actions:  # the first action of a dest sets its value (--sym/--asym share one)
        defaults.setdefault(a.dest, a.default)
    p.set_defaults(func=run, _defaults=defaults)
    return p


ROTATE_DESTS: tuple[str, ...] = ()
"""The destinations of the rotation options (set by :func:`add_parser`)."""
SETTINGS_DESTS = tuple(f for f in QuantizeSettings.__dataclass_fields__)
SHARED_OPTIONS = ("dtype", "device", "seed", "streamed")
"""Rotation options ``orthoopt quantize`` has as its own (one --dtype and one --device serve both steps)."""
HOW_TO_RUN = ("resume", "streamed")
"""Rotation options that say how to run, not what: allowed with --recipe."""


def _given(parser_defaults: dict, args, dests) -> list[str]:
    """The options among ``dests`` whose value is not the default (given on the command line)."""
    return [d for d in dests if getattr(args, d) != parser_defaults.get(d)]


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def run(args) -> int:
    from orthoopt.jobs.oneshot import oneshot

    defaults = args._defaults
    if args.recipe is not None:
        from orthoopt.jobs.recipe import load_recipe

        settings = [d for d in ROTATE_DESTS if d not in HOW_TO_RUN]
        given = _given(defaults, args, ("rotate", *settings, *SETTINGS_DESTS, "calib", "calib_split",
                                        "calib_text_column", "eval_text", "eval_seq_len", "eval_max_tokens"))
        if given:
            raise InvalidInputError(f"{', '.join(_flag(d) for d in given)} given with --recipe: put the setting in the "
                             f"recipe file {args.recipe} instead (one place for a run's settings)")
        kwargs = {**load_recipe(args.recipe), "resume": args.resume, "streamed": args.streamed}
    else:
        kwargs = _kwargs_from_args(args, defaults)
    _check_memory(args, kwargs.get("quantize"), kwargs.get("rotate"))
    result = oneshot(args.model_dir, out=args.out, device=args.device, progress=not args.no_progress, **kwargs)
    settings = result.settings
    if args.json:
        print(json.dumps({**settings, "out": str(result.out)}, allow_nan=False))
    else:
        print(f"{result.description}: wrote {result.out} ({sum(result.seconds.values()):.1f} s in all)")
    return 0


def _check_memory(args, quantize: QuantizeSettings | None, rotate=None) -> None:
    """Refuse (exit 2) before loading when the estimated peak does not fit in memory or the output on
    the disk of ``--out`` (``--force`` skips both); ``rotate``: the ``--rotate`` config, whose
    ``--streamed`` run writes the rotated checkpoint (and OptRot+'s weighted blocks) beside the output."""
    from orthoopt.models.dtypes import resolve_model_dtype
    from orthoopt.models.footprint import quantize_estimate
    from orthoopt.models.sources import resolve_source

    q, _ = (quantize or QuantizeSettings()).resolved()
    source = resolve_source(args.model_dir, progress=not args.no_progress)
    dtype = resolve_model_dtype(source, q.dtype)
    seq_len = q.seq_len or 2048
    check_memory("orthoopt quantize", source, lambda ck: quantize_estimate(
        ck, dtype, "gptq" if q.uses_calibration else "rtn", q.nsamples, min(seq_len, ck.max_position or seq_len),
        streamed=args.streamed, packed=q.format != "orthoopt"), args.force,
        disk=lambda ck: _disk(ck, dtype, rotate, args.streamed), out=args.out)
    if q.uses_calibration or args.eval_text or (rotate is not None and rotate.entry.needs_calibration):
        from orthoopt.utils.cpu import bf16_note

        bf16_note("orthoopt quantize", dtype, args.device)


def _disk(ck, dtype, rotate, streamed: bool) -> dict[str, int]:
    from orthoopt.models.footprint import disk_estimate

    if rotate is None or not streamed:
        return disk_estimate(ck, dtype, rotations=rotate is not None)
    parts = disk_estimate(ck, dtype, rotations=True, scratch=rotate.entry.statistics == "hessians")
    return {"rotated checkpoint (until quantized)": parts["output"], **parts}


def _kwargs_from_args(args, defaults: dict) -> dict:
    settings = QuantizeSettings(**{d: getattr(args, d) for d in SETTINGS_DESTS})
    calib = CalibSource.of(args.calib, args.calib_split, args.calib_text_column)
    if calib is not None and not calib.is_dataset and (args.calib_split or args.calib_text_column):
        raise InvalidInputError("--calib-split and --calib-text-column are for a dataset (--calib hf:NAME[:CONFIG])")
    config = None
    if args.rotate is None:
        given = _given(defaults, args, ROTATE_DESTS)
        if given:
            raise InvalidInputError(f"{', '.join(_flag(d) for d in given)} are rotation options: give --rotate METHOD "
                             f"(one of {', '.join(METHODS)})")
    else:
        resolved, _ = settings.resolved()
        ns = argparse.Namespace(**{d: getattr(args, d) for d in ROTATE_DESTS}, method=args.rotate,
                                calib=args.calib, **{d: getattr(args, d) for d in SHARED_OPTIONS},
                                **{d: getattr(resolved, d) for d in SIM_QUANT_OPTIONS})
        config = config_from_args(ns)
    if (calib is not None and not settings.resolved()[0].uses_calibration
            and (config is None or not config.entry.needs_calibration)):
        print("orthoopt quantize: note: --calib is not used by --method rtn"
              + ("" if config is None else f" nor by --rotate {config.method}"), file=sys.stderr)
    return {"rotate": config, "quantize": settings, "calib": calib, "eval_text": args.eval_text,
            "eval_seq_len": args.eval_seq_len, "eval_max_tokens": args.eval_max_tokens,
            "init": getattr(args, "init", None), "resume": getattr(args, "resume", False),
            "streamed": getattr(args, "streamed", False)}
