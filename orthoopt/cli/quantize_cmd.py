"""``orthoopt quantize``: fake-quantize a checkpoint's weights (RTN or GPTQ) and record activation settings.

Writes OUT_DIR atomically: the dequantized weights (``save_pretrained``, safetensors), the tokenizer,
and ``quant.json`` (settings, calibration, seconds), which ``orthoopt eval`` reads to re-install the
activation quantization and online Hadamard. See docs/quantization.md. With ``--format
compressed-tensors`` the weights are stored packed (integer codes, scales, zero-points) with a
``quantization_config`` in config.json, for transformers and vLLM (docs/export.md).
"""

from __future__ import annotations

import argparse
import json
import sys

from orthoopt.errors import InvalidInputError
from orthoopt.eval.perplexity import default_seq_len
from orthoopt.export import FORMATS
from orthoopt.quant.act import ActQuantConfig
from orthoopt.quant.calib import calibration_batches, check_context
from orthoopt.quant.kv import KVQuantConfig
from orthoopt.quant.model import load_checkpoint, quantize_model, save_quantized
from orthoopt.quant.quantizer import MAX_BITS, MIN_BITS
from orthoopt.quant.schemes import PER_CHANNEL, SCHEMES, resolve
from orthoopt.adapters.archs import locate
from orthoopt.adapters.dtypes import DTYPE_CHOICES
from orthoopt.adapters.sources import input_location
from orthoopt.utils.argtypes import integer, real
from orthoopt.utils.paths import prepare_output
from orthoopt.cli.memory_check import add_force, check_memory
from orthoopt.utils.checks import check_device
from orthoopt.cli.usage import help_kwargs

DEFAULTS = {"wbits": 4, "group_size": None, "sym": True, "abits": 16, "act_sym": True}
"""The weight/activation settings without --scheme (and without the flags)."""

DESCRIPTION = """\
Quantize a checkpoint's weights (RTN or GPTQ), optionally with activation and K/V-cache quantization.

Pick the settings by compressed-tensors scheme name (--scheme W4A16, the names llm-compressor's
recipes use) or flag by flag; --wbits, --group-size, --sym/--asym and --abits given explicitly win
over the scheme (quant.json records the scheme and what was overridden). Without either, the
weights are 4-bit, symmetric, one scale per output channel, activations not quantized.

--format orthoopt (default) writes fake-quantized float weights and quant.json; 'orthoopt eval'
reads it and re-installs the activation and K/V-cache quantization. --format compressed-tensors
writes integer weights that transformers and vLLM load without orthoopt; it carries the W*A16
schemes, W4A8/W8A8 (dynamic int8 activations) and --online-hadamard for power-of-two intermediate
sizes, and refuses the rest before any work. Quantize a rotated model
('orthoopt rotate') to get the benefit of the rotation."""

EXAMPLES = (
    "orthoopt quantize runs/rot --out runs/rot-w4 --scheme W4A16 --format compressed-tensors",
    "orthoopt quantize runs/rot --out runs/rot-gptq --scheme W4A16 --method gptq --calib calib.txt",
    "orthoopt quantize runs/rot --out runs/rot-w4a8 --scheme W4A8 --online-hadamard",
    "orthoopt quantize runs/rot --out runs/rot-g64 --scheme W4A16 --group-size 64  # flag wins: groups of 64",
)
DOCS = ("docs/quantization.md", "docs/export.md (compressed-tensors, vLLM)")

CLIP = real(0, 1, low_open=True)  # a clipping ratio in (0, 1]
BITS = integer(MIN_BITS, MAX_BITS, also=(16,))  # 16 = off


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize",
        help="quantize a model's weights (RTN/GPTQ, by scheme name or flag by flag) and set activation quantization",
        **help_kwargs(DESCRIPTION, EXAMPLES, DOCS),
    )
    p.add_argument("model_dir", metavar="MODEL",
                   help="model folder (with tokenizer), .gguf file, registered name (smollm2-135m), planted, or Hub id")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
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
    p.add_argument("--calib", default=None, help="calibration text file (required for GPTQ)")
    p.add_argument("--nsamples", type=integer(1), default=128, help="calibration windows; default 128")
    p.add_argument("--seq-len", type=integer(1), default=None, help="calibration window length (default: context, max 2048)")
    p.add_argument("--seed", type=integer(0), default=0, help="calibration sampling seed; default 0")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: quantize each layer's input-sharing groups one after the other, each with the "
                        "Hessians of the earlier groups' quantized outputs (default); --no-true-sequential: "
                        "all of a layer's linears from one pass (as llm-compressor; fewer forward passes)")
    p.add_argument("--damp", type=real(0, 1e6), default=0.01, help="GPTQ dampening, fraction of mean diag(H); default 0.01")
    p.add_argument("--block-size", type=integer(1), default=128, help="GPTQ lazy-update block size; default 128")
    p.add_argument(
        "--format", default="orthoopt", choices=FORMATS,
        help="orthoopt: fake-quantized float weights + quant.json (default); compressed-tensors: "
        "integer weights loadable by transformers/vLLM (docs/export.md)",
    )
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype the model is loaded in and its weights written in (auto, the default: the "
                        "checkpoint's own; RTN/GPTQ compute per layer in float32 and cast back)")
    p.add_argument("--device", default=None, help="where the model computes, e.g. cuda or cuda:1 (default cpu): the whole model is moved there after loading (no layer-by-layer onloading yet); refused when not available")
    add_force(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=run)
    return p


def _validate(args) -> None:
    if not (args.wbits == 16 or MIN_BITS <= args.wbits <= MAX_BITS):
        raise InvalidInputError(f"--wbits must be in [{MIN_BITS}, {MAX_BITS}] or 16, got {args.wbits}")
    if args.group_size is not None and args.group_size < 1:
        raise InvalidInputError(f"--group-size must be positive or {PER_CHANNEL} (per output channel), got {args.group_size}")
    if args.method == "gptq" and args.wbits < 16 and args.calib is None:
        raise InvalidInputError("--method gptq needs calibration text: pass --calib TEXT_FILE")
    if args.nsamples < 1:
        raise InvalidInputError(f"--nsamples must be positive, got {args.nsamples}")
    if args.seq_len is not None and args.seq_len < 1:
        raise InvalidInputError(f"--seq-len must be positive, got {args.seq_len}")
    if not 0 <= args.damp:
        raise InvalidInputError(f"--damp must be non-negative, got {args.damp}")
    if args.block_size < 1:
        raise InvalidInputError(f"--block-size must be positive, got {args.block_size}")
    # before any work: --out may not be, contain or lie inside an input, and must be writable
    prepare_output(args.out, {"MODEL": input_location(args.model_dir), "--calib": args.calib}, marker="quant.json")
    if args.format == "compressed-tensors":  # refuse before spending time on quantization
        from orthoopt.export.compressed_tensors import _import_ct, check_exportable

        check_exportable({
            "wbits": args.wbits, "abits": args.abits, "group_size": args.group_size,
            "gptq": {"act_order": args.act_order} if args.method == "gptq" else None,
            "act": {"bits": args.abits, "symmetric": not args.act_asym, "clip_ratio": args.act_clip,
                    "online_hadamard": args.online_hadamard},
            "kvbits": args.kvbits, "r3": args.r3,
        })
        _import_ct()


def _check_memory(args) -> None:
    """Refuse (exit 2) before loading when the estimated peak does not fit (``--force`` skips it)."""
    from orthoopt.adapters.dtypes import resolve_model_dtype
    from orthoopt.adapters.footprint import quantize_estimate
    from orthoopt.adapters.sources import resolve_source

    source = resolve_source(args.model_dir, progress=not args.no_progress)
    dtype = resolve_model_dtype(source, args.dtype)
    gptq = args.method == "gptq" and args.wbits < 16
    seq_len = args.seq_len or 2048
    check_memory("orthoopt quantize", source, lambda ck: quantize_estimate(
        ck, dtype, "gptq" if gptq else "rtn", args.nsamples, min(seq_len, ck.max_position or seq_len)), args.force)


def _apply_scheme(args) -> dict | None:
    """Fill ``args.wbits/group_size/sym/abits/act_asym`` from ``--scheme`` and the flags given (a flag
    wins); returns quant.json's ``scheme`` record (None without ``--scheme``)."""
    flags = {k: v for k, v in {"wbits": args.wbits, "sym": args.sym, "abits": args.abits,
                               "act_sym": False if args.act_asym else None}.items() if v is not None}
    if args.group_size is not None:  # given; PER_CHANNEL is None in the settings
        flags["group_size"] = None if args.group_size == PER_CHANNEL else args.group_size
    settings, overrides = resolve(args.scheme, flags, DEFAULTS)
    args.wbits, args.group_size, args.sym, args.abits = (settings[k] for k in ("wbits", "group_size", "sym", "abits"))
    args.act_asym = not settings["act_sym"]
    if args.scheme is None:
        return None
    return {"name": args.scheme.upper(), "overrides": overrides}


def run(args) -> int:
    scheme = _apply_scheme(args)
    device = check_device(args.device, "--device")  # before any work
    _validate(args)
    act = ActQuantConfig(
        bits=args.abits, symmetric=not args.act_asym, clip_ratio=args.act_clip, online_hadamard=args.online_hadamard
    )
    kv = KVQuantConfig(bits=args.kvbits, group_size=args.kv_group_size, symmetric=args.kv_sym,
                       k_clip_ratio=args.k_clip, v_clip_ratio=args.v_clip, r3=args.r3)
    _check_memory(args)
    model, tokenizer = load_checkpoint(args.model_dir, args.dtype)
    if device is not None:
        model.to(device)
    if args.format == "compressed-tensors" and args.wbits < 16:  # MoE experts, R4 size: refuse before quantizing
        from orthoopt.export.compressed_tensors import check_exportable, r4_record
        from orthoopt.quant.experts import quantized_expert_tensors

        located = locate(model)
        experts = [n for L in located.layers for n in quantized_expert_tensors(located.spec, L)]
        check_exportable({"wbits": args.wbits, "experts": experts, "act": {"online_hadamard": args.online_hadamard},
                          "online_hadamard": r4_record(model) if args.online_hadamard else None})
    calib, calib_info = None, None
    if args.method == "gptq" and args.wbits < 16:
        seq_len = args.seq_len if args.seq_len is not None else default_seq_len(model)
        check_context(model, seq_len, "--seq-len")
        calib = calibration_batches(args.calib, tokenizer, nsamples=args.nsamples, seq_len=seq_len, seed=args.seed)
        calib_info = {"file": str(args.calib), "nsamples": args.nsamples, "seq_len": seq_len, "seed": args.seed}
    elif args.calib is not None:
        print("orthoopt quantize: note: --calib is not used by --method rtn", file=sys.stderr)

    result = quantize_model(
        model, method=args.method, wbits=args.wbits, group_size=args.group_size, sym=args.sym, act=act,
        calib=calib, kv=kv, act_order=args.act_order, true_sequential=args.true_sequential, mse_clip=args.mse_clip,
        percdamp=args.damp,
        block_size=args.block_size, progress=not args.no_progress,
    )
    settings = {**result.settings, "scheme": scheme, "source": str(args.model_dir), "calibration": calib_info,
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if args.format == "compressed-tensors":
        from orthoopt.export.compressed_tensors import save_compressed_tensors

        out = save_compressed_tensors(model, tokenizer, args.out, result, settings, progress=not args.no_progress)
        settings = json.loads((out / "quant.json").read_text(encoding="utf-8"))  # with its export record
    else:
        out = save_quantized(model, tokenizer, args.out, settings)
    if args.json:
        print(json.dumps({**settings, "out": str(out)}, allow_nan=False))
    else:
        desc = f"W{args.wbits}A{args.abits}" + (f"KV{args.kvbits}" if args.kvbits < 16 else "") + f" {args.method}"
        if scheme:
            overridden = f", overridden: {', '.join(scheme['overrides'])}" if scheme["overrides"] else ""
            desc += f" (scheme {scheme['name']}{overridden})"
        if args.group_size:
            desc += f" g{args.group_size}"
        if args.r3:
            desc += " +R3"
        if args.online_hadamard:
            desc += " +R4"
        if args.format != "orthoopt":
            desc += f" ({args.format})"
        print(f"{desc}: wrote {out} ({settings['seconds']:.1f} s)")
    return 0
