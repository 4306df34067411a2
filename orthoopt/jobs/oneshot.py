"""One call from a model to a quantized checkpoint with its report: rotate, quantize, evaluate, write.

:func:`oneshot` (``orthoopt.oneshot``) is what ``orthoopt quantize`` runs, with ``--rotate METHOD`` or
without. It does exactly what ``orthoopt rotate`` followed by ``orthoopt quantize`` do with the same
settings: the same loading, the same calibration windows, the same phase loop
(:func:`orthoopt.pipeline.rotate_model`) and the same quantizer (:func:`orthoopt.quant.quantize_model`),
so the written tensors are equal (``tests/test_oneshot.py``); the rotated model is kept in memory
(never written as a folder of its own). Everything is checked before any work (settings, the
calibration source, the format, the output path); the output folder is written to a temporary sibling
and renamed into place with ``report.md`` and its pictures (:mod:`orthoopt.jobs.report`), so an
interrupted run leaves the previous output or nothing. A learned rotation checkpoints to
``OUT.partial.safetensors`` as ``orthoopt rotate`` does (``resume=True`` continues from it); the file is
removed once the output is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from orthoopt.config import RotateConfig
from orthoopt.errors import InvalidInputError
from orthoopt.export.choose import choose_format
from orthoopt.jobs.report import snapshot, write_report
from orthoopt.jobs.settings import QuantizeSettings
from orthoopt.methods import METHODS, names
from orthoopt.quant.calib_source import CalibSource

PARTIAL_SUFFIX = ".partial.safetensors"
CHECKPOINT_DIR = "checkpoint.tmp"
"""Where the checkpoint writer puts its files inside the output's temporary folder before they move up."""


@dataclass
class OneshotResult:
    """What :func:`oneshot` wrote.

    out: the output folder; settings: its quant.json (with ``"rotation"``, the rotate report, when
    there was one); format: the format written; passed_over: why compressed-tensors was not chosen
    (``format="auto"``); seconds: per phase; evaluation: the perplexities (None without ``eval_text``);
    description: one line (``W4A16 rtn (scheme W4A16) g128 (compressed-tensors) after optrot``).
    """

    out: Path
    settings: dict
    format: str
    passed_over: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    evaluation: dict | None = None
    description: str = ""


def partial_path(out: str | os.PathLike) -> Path:
    """The partial checkpoint of output ``out`` (``OUT.partial.safetensors``, as ``orthoopt rotate``)."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def sim_quant_of(q: QuantizeSettings):
    """SpinQuant's simulated quantization for resolved settings ``q``, as ``orthoopt rotate``'s
    spinquant options give it (weight bits; activation bits, grid and R4; K/V bits and R3)."""
    from orthoopt.quant.act import ActQuantConfig
    from orthoopt.quant.kv import KVQuantConfig
    from orthoopt.quant.rotated import SimQuantConfig

    return SimQuantConfig(wbits=q.wbits, act=ActQuantConfig(bits=q.abits, symmetric=not q.act_asym,
                                                            online_hadamard=q.online_hadamard),
                          kv=KVQuantConfig(bits=q.kvbits, r3=q.r3))


def _rotate_config(rotate, q: QuantizeSettings) -> RotateConfig | None:
    if rotate is None or isinstance(rotate, RotateConfig):
        return rotate
    if isinstance(rotate, str):
        rotate = {"method": rotate}
    if not isinstance(rotate, Mapping):
        raise InvalidInputError(f"rotate must be a method name, a mapping of RotateConfig fields or a RotateConfig, got "
                         f"{type(rotate).__name__}")
    values = dict(rotate)
    if "method" not in values:
        raise InvalidInputError(f"rotate: give the method (one of {', '.join(METHODS)})")
    if values["method"] not in METHODS:
        raise InvalidInputError(f"unknown rotation method {values['method']!r}; choose one of {', '.join(METHODS)}")
    if METHODS[values["method"]].simulates_quantization and not (values.get("spinquant") or {}).get("sim_quant"):
        spin = values.get("spinquant") or {}
        if isinstance(spin, Mapping):  # the loss simulates the quantization this run applies
            values["spinquant"] = {**spin, "sim_quant": sim_quant_of(q)}
    try:
        return RotateConfig(**{k: (tuple(v) if k == "rotations" and not isinstance(v, str) else v)
                               for k, v in values.items()})
    except TypeError as e:  # an unknown field
        raise InvalidInputError(f"rotate: {e}") from None


def _settings(quantize, scheme) -> tuple[QuantizeSettings, dict | None]:
    if quantize is None:
        quantize = QuantizeSettings()
    elif isinstance(quantize, Mapping):
        quantize = QuantizeSettings.from_mapping(dict(quantize))
    if scheme is not None:
        if quantize.scheme is not None and quantize.scheme.upper() != scheme.upper():
            raise InvalidInputError(f"two schemes given: {scheme!r} and quantize's {quantize.scheme!r}")
        quantize = QuantizeSettings.from_mapping({**quantize.to_dict(), "scheme": scheme})
    q, record = quantize.resolved()
    q.check()
    return q, record


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"orthoopt quantize: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _phase(seconds: dict, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def check_inputs(model, out, config: RotateConfig | None, q: QuantizeSettings, calib: CalibSource | None,
                 eval_text, init, resume: bool, streamed: bool) -> tuple[str, list[str]]:
    """Every refusal that needs no model: bad combinations, missing inputs, the format, the output path.

    Returns ``(format, why compressed-tensors was passed over)`` (:func:`orthoopt.export.choose.choose_format`).
    """
    from orthoopt.models.sources import input_location
    from orthoopt.utils.paths import prepare_output

    data_free = ", ".join(names(lambda m: not m.needs_calibration))
    if config is not None and config.entry.needs_calibration and calib is None:
        raise InvalidInputError(f"--rotate {config.method} learns from calibration text: pass --calib TEXT_FILE (or "
                         f"hf:NAME[:CONFIG]), or pick a method without data ({data_free})")
    if q.uses_calibration and calib is None:
        raise InvalidInputError("--method gptq needs calibration text: pass --calib TEXT_FILE (or hf:NAME[:CONFIG]), "
                         "or use --method rtn")
    if config is None and (init is not None or resume):
        raise InvalidInputError("--init and --resume are rotation options: give --rotate METHOD")
    if streamed and config is not None:
        config.check_streamed()
    fmt, passed_over = choose_format(q.format, {**q.export_settings(), "layered": streamed})
    if fmt == "compressed-tensors":
        from orthoopt.export.compressed_tensors import _import_ct

        try:
            _import_ct()
        except ValueError as e:
            raise InvalidInputError(f"{e}; or write orthoopt's format: --format orthoopt") from None
    if calib is not None:
        calib.check()
    if eval_text is not None and not Path(eval_text).is_file():
        raise FileNotFoundError(f"--eval-text file not found: {eval_text}")
    if init is not None and not Path(init).exists():
        raise FileNotFoundError(f"--init not found: {init}")
    partial = partial_path(out)
    inputs = {"MODEL": input_location(model), "--calib": calib.file if calib else None, "--init": init,
              "--eval-text": eval_text}
    resume_file = partial if resume and partial.is_file() else None
    prepare_output(out, {**inputs, "--resume file": resume_file}, marker="quant.json")
    if config is not None:
        prepare_output(partial, inputs, kind="file", what="partial checkpoint")
    return fmt, passed_over


def oneshot(model, *, out, rotate=None, scheme: str | None = None, calib=None, quantize=None,
            eval_text=None, eval_seq_len: int | None = None, eval_max_tokens: int | None = None,
            init=None, resume: bool = False, streamed: bool = False, device=None,
            progress: bool = True) -> OneshotResult:
    """Rotate (optionally), quantize and write ``model`` to ``out`` with ``report.md``, in one call.

    Parameters
    ----------
    model : str or os.PathLike
        A model source with a tokenizer (folder, ``.gguf``, registered name such as ``smollm2-135m``,
        ``planted``, Hub id; ``docs/adapters.md``).
    out : str or os.PathLike
        The output folder, written atomically (a previous output of this command is replaced).
    rotate : str, mapping or RotateConfig, optional
        The rotation: a method of :data:`orthoopt.methods.METHODS` (``"optrot"``), a mapping of
        :class:`~orthoopt.config.RotateConfig` fields with ``"method"`` (``{"method": "optrot",
        "solve": {"steps": 50}}``, as ``report.json["config"]`` holds it), or a config. None: no rotation (quantize the model as it is). SpinQuant's
        simulated quantization defaults to this run's settings (:func:`sim_quant_of`).
    scheme : str, optional
        A compressed-tensors scheme name (``"W4A16"``; :data:`orthoopt.quant.schemes.SCHEMES`).
    calib : str, os.PathLike or CalibSource, optional
        Calibration text for a data method and for GPTQ: a text file or ``"hf:NAME[:CONFIG]"``
        (:mod:`orthoopt.quant.calib_source`).
    quantize : mapping or QuantizeSettings, optional
        The other quantizer settings (:class:`~orthoopt.jobs.settings.QuantizeSettings`: ``method``,
        ``wbits``, ``group_size``, ..., ``format``; an explicit one wins over the scheme).
    eval_text : str or os.PathLike, optional
        A text file: the float and the quantized model's perplexity go into the report, with the
        ratio's paired-bootstrap 95% interval.
    eval_seq_len, eval_max_tokens : int, optional
        Evaluation window length (default the model's context, at most 2048) and token budget.
    init, resume, streamed : optional
        As ``orthoopt rotate``'s ``--init`` (a rotations folder or file), ``--resume`` (continue from
        ``OUT.partial.safetensors``) and ``--streamed`` (rotate layer by layer from the safetensors
        folder, into the output's temporary folder, then load it for quantization).
    device : str or torch.device, optional
        Where the model computes (``orthoopt quantize --device``; default the CPU): the whole model is
        moved there after loading (after rotating, with ``rotate``), and the rotation's objective and
        solver compute there too; refused when not available.
    progress : bool
        Progress bars and phase messages on stderr.

    Returns
    -------
    OneshotResult

    Raises
    ------
    InvalidInputError, FileNotFoundError
        Bad settings or combinations (a method that needs calibration without ``calib``, a format that
        cannot carry the scheme, ...), missing inputs or an unusable output, before any work.
    """
    from orthoopt.eval.bootstrap import DEFAULT_RESAMPLES, check_window_count, paired_bootstrap
    from orthoopt.eval.compare import check_options
    from orthoopt.eval.perplexity import default_seq_len
    from orthoopt.quant.calib import check_context, read_text, tokenize_text
    from orthoopt.quant.model import load_checkpoint
    from orthoopt.utils.atomic import atomic_dir

    from orthoopt.models import resolve_source
    from orthoopt.models.dtypes import dtype_name, resolve_model_dtype
    from orthoopt.utils.checks import check_device

    q, scheme_record = _settings(quantize, scheme)
    config = _rotate_config(rotate, q)
    device = check_device(device, "--device")
    if config is not None and device is not None and config.compute.device is None:
        config = config.replace(compute={"device": str(device)})
    calib = CalibSource.of(calib)
    check_options(DEFAULT_RESAMPLES, 0, eval_seq_len, eval_max_tokens)
    out = Path(out)
    fmt, passed_over = check_inputs(model, out, config, q, calib, eval_text, init, resume, streamed)
    seconds: dict[str, float] = {}
    partial = partial_path(out)
    source_folder = None
    resolved = resolve_source(model, progress=progress)
    model_dtype = resolve_model_dtype(resolved, q.dtype)
    if config is not None and config.checkpoint.dtype != dtype_name(model_dtype):  # the one --dtype serves both steps
        config = config.replace(checkpoint={"dtype": dtype_name(model_dtype)},
                                compute={"dtype": "float64" if model_dtype == torch.float64 else config.compute.dtype})
    if streamed:
        from orthoopt.models.io import check_model_folder

        if resolved.folder is None:
            raise InvalidInputError(f"--streamed needs a Hugging Face folder with safetensors weights (or a registered "
                             f"name), got {resolved.kind} {model!r}")
        check_model_folder(resolved.folder)
        source_folder = resolved.folder

    layered = None
    with _phase(seconds, "load"):
        if streamed:  # the skeleton: embedding, norm and lm_head loaded, every decoder layer left on disk
            layered, tokenizer = _layered(source_folder, model_dtype, device)
            net = layered.model
        else:
            net, tokenizer = load_checkpoint(model, dtype=model_dtype)
    if device is not None and config is None and layered is None:
        net.to(device)
    _check_group_size(net, q)  # before the evaluation and the rotation (their minutes)
    fmt, passed_over = _loaded_check(net, q, fmt, passed_over, streamed)

    evaluation, ids, float_nll = None, None, None
    if eval_text is not None:
        with _phase(seconds, "eval float"):
            ids = tokenize_text(read_text(eval_text), tokenizer)
            seq_len = eval_seq_len if eval_seq_len is not None else default_seq_len(net)
            check_context(net, seq_len, "--eval-seq-len")
            check_window_count(min(ids.numel(), eval_max_tokens or ids.numel()) // seq_len, seq_len)
            _log(progress, f"perplexity of the float model on {eval_text}")
            float_res = _perplexity(net, layered, ids, seq_len=seq_len, max_tokens=eval_max_tokens,
                                    progress=progress)
            float_nll = float_res["window_nll"]
    bits = q.wbits if q.wbits < 16 else 4
    with _phase(seconds, "report"):  # (weight statistics need the weights in memory: not with --streamed)
        snaps = [] if streamed else [snapshot(net, "input", bits)]
    init_rotations = None
    if init is not None:
        from orthoopt.models import load_rotations

        init_rotations = load_rotations(init)

    with atomic_dir(out) as tmp:
        rotation_report, solves = None, {}
        if config is not None:
            with _phase(seconds, "rotate"):
                _log(progress, f"rotation {config.method} ({','.join(config.rotations)})")
                net, rotation_report, solves, rotations = _rotate(net, tokenizer, config, calib, init_rotations,
                                                                  resume, partial, source_folder, tmp, progress,
                                                                  layered=streamed, device=device)
            if streamed:
                layered = net
                net = layered.model
            else:
                with _phase(seconds, "report"):
                    snaps.append(snapshot(net, "rotated", bits, tuple(snaps[0].channels)))
                if device is not None:
                    net.to(device)
        staging = tmp / CHECKPOINT_DIR
        with _phase(seconds, "quantize"):  # with --streamed: layer by layer, each layer's shard written at once
            result, calib_info = _quantize(net, tokenizer, q, calib, progress,
                                           layered=layered, staging=staging)
        if layered is not None:
            rotated_folder = layered.folder if config is not None else None
            layered = _reload_written(staging, model_dtype, device, result)
            net = layered.model
            if rotated_folder is not None:
                shutil.rmtree(rotated_folder)
        settings = {**result.settings, "scheme": scheme_record, "source": str(model), "calibration": calib_info,
                    "dtype": dtype_name(next(net.parameters()).dtype)}
        if rotation_report is not None:
            settings["rotation"] = rotation_report
        if ids is not None:
            with _phase(seconds, "eval quantized"):
                _log(progress, "perplexity of the quantized model")
                quant_res = _perplexity(net, layered, ids, seq_len=float_res["seq_len"], max_tokens=eval_max_tokens,
                                        progress=progress)
                interval = paired_bootstrap(float_nll, quant_res["window_nll"], DEFAULT_RESAMPLES, 0)
                evaluation = {"text": str(eval_text), "windows": quant_res["windows"], "seq_len": quant_res["seq_len"],
                              "tokens": quant_res["tokens"], "float": float_res["ppl"], "quantized": quant_res["ppl"],
                              "ratio": interval.ratio, "ci95": list(interval.ci95), "verdict": interval.verdict,
                              "resamples": DEFAULT_RESAMPLES, "seed": 0}
        with _phase(seconds, "write"):
            settings = _write_checkpoint(net, tokenizer, tmp, fmt, result, settings, progress, layered=layered)
            if rotation_report is not None:
                from orthoopt.models.io import write_rotations

                write_rotations(tmp, {k: v.detach().cpu() for k, v in rotations.items()})
        with _phase(seconds, "report"):
            notes = ([f"--format auto wrote orthoopt's format, since compressed-tensors cannot carry this: "
                      f"{'; '.join(passed_over)}"] if passed_over else [])
            write_report(tmp, title=f"orthoopt quantize: {model}", settings=_settings_rows(
                model, config, q, scheme_record, calib, fmt, rotation_report, settings["dtype"]), evaluation=evaluation,
                phases=seconds, snapshots=snaps, bits=bits, solves=solves, notes=notes)
    partial.unlink(missing_ok=True)
    description = q.describe(scheme_record, fmt) + (f" after {config.method}" if config is not None else "")
    return OneshotResult(out, settings, fmt, passed_over, dict(seconds), evaluation, description)


def _check_group_size(net, q: QuantizeSettings) -> None:
    """Refuse a weight group size that does not divide every quantized input width, naming those that do."""
    import math

    if q.group_size is None or q.wbits >= 16:
        return
    from orthoopt.adapters.archs import locate
    from orthoopt.quant.experts import quantized_expert_tensors

    located = locate(net)
    widths = {}
    for L in located.layers:
        for role, lin in L.quant_linears(located.spec).items():
            widths.setdefault(lin.in_features, L.names[role])
        for name, t in quantized_expert_tensors(located.spec, L).items():
            widths.setdefault(t.shape[-1], name)
    bad = {w: n for w, n in widths.items() if w % q.group_size}
    if not bad:
        return
    g = math.gcd(*widths)
    fits = [d for d in (256, 128, 64, 32, 16) if g % d == 0][:2]
    w, name = min(bad.items())
    what = f"--scheme {q.scheme}'s group size" if q.scheme else "--group-size"
    raise InvalidInputError(f"{what} {q.group_size} does not divide {name}'s {w} input columns; groups that fit every "
                     f"linear of this model: {', '.join(map(str, fits)) or 'none of 16..256'} "
                     f"(--group-size {fits[0] if fits else -1}), or --group-size -1 for one scale per output channel")


def _loaded_check(net, q: QuantizeSettings, fmt: str, passed_over: list[str],
                  streamed: bool) -> tuple[str, list[str]]:
    """What the format question needs the loaded model for (MoE expert tensors, the R4 size): ``auto``
    falls back to orthoopt's format, a named format refuses."""
    if fmt != "compressed-tensors" or q.wbits >= 16:
        return fmt, passed_over
    from orthoopt.adapters.archs import locate
    from orthoopt.export.compressed_tensors import r4_record
    from orthoopt.quant.experts import quantized_expert_tensors

    located = locate(net)
    known = {"experts": [n for L in located.layers for n in quantized_expert_tensors(located.spec, L)],
             "layered": streamed}
    if q.online_hadamard:
        known["online_hadamard"] = r4_record(net)
    return choose_format(q.format, {**q.export_settings(), **known})


def _rotate(net, tokenizer, config, calib, init, resume, partial, source_folder, tmp, progress, layered=False,
            device=None):
    """Rotate ``net`` in memory (or, streamed, from ``source_folder`` into ``tmp``, then read back: whole,
    or with ``layered`` as a :class:`~orthoopt.models.onload.LayeredModel` whose folder the caller
    removes); ``(model, rotate report, solves, rotations)``."""
    from orthoopt.pipeline import rotate_model, rotate_streamed
    from orthoopt.pipeline.calibration import rotation_calibration

    calib_ids = rotation_calibration(config, calib, tokenizer, net.config)
    if source_folder is not None:
        from orthoopt.quant.model import load_checkpoint

        folder = tmp / "rotated.tmp"
        result = rotate_streamed(source_folder, folder, config, calib=calib_ids, init=init, progress=progress,
                                 checkpoint=partial, resume=resume)
        del net
        report = {"model": str(source_folder), **result.report}
        if layered:
            from orthoopt.models.onload import LayeredModel

            return (LayeredModel(folder, config.checkpoint.torch_dtype, device), report, result.solves,
                    result.rotations)
        net, _ = load_checkpoint(folder, dtype=config.checkpoint.torch_dtype)
        shutil.rmtree(folder)
        return net, report, result.solves, result.rotations
    seed = config.seed
    ids = torch.randint(0, net.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))
    result = rotate_model(net, config, calib=calib_ids, init=init, verify_ids=ids, progress=progress,
                          checkpoint=partial, resume=resume)
    return net, result.report, result.solves, result.rotations


def _quantize(net, tokenizer, q: QuantizeSettings, calib, progress, layered=None, staging=None):
    """``quantize_model`` with ``q``'s settings (GPTQ's windows from ``calib``); ``(result, calibration record)``.
    With ``layered`` (a LayeredModel), layer by layer, writing the weights into ``staging``."""
    from orthoopt.eval.perplexity import default_seq_len
    from orthoopt.quant.calib import calibration_batches, check_context
    from orthoopt.quant.model import quantize_model

    batches, info = None, None
    if q.uses_calibration:
        seq_len = q.seq_len if q.seq_len is not None else default_seq_len(net)
        check_context(net, seq_len, "--seq-len")
        batches = calibration_batches(calib, tokenizer, nsamples=q.nsamples, seq_len=seq_len, seed=q.seed)
        info = {**calib.describe(), "nsamples": q.nsamples, "seq_len": seq_len, "seed": q.seed}
    if layered is not None:
        from orthoopt.quant.layered import write_layered

        staging.mkdir()
        return write_layered(layered, tokenizer, staging, q.quantize_config(), batches, progress=progress), info
    result = quantize_model(net, q.quantize_config(), calib=batches, progress=progress)
    return result, info


def _layered(folder, dtype, device):
    """``(LayeredModel, tokenizer)`` of a Hugging Face folder."""
    from orthoopt.models.io import load_tokenizer
    from orthoopt.models.onload import LayeredModel

    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise FileNotFoundError(f"{folder} has no tokenizer (tokenizer.json / tokenizer_config.json / "
                                "tokenizer.model); copy the tokenizer files into it")
    return LayeredModel(folder, dtype, device), tokenizer


def _reload_written(folder, dtype, device, result):
    """The quantized weights just written to ``folder``, as a LayeredModel with the run's hooks."""
    from orthoopt.models.onload import LayeredModel
    from orthoopt.quant.model import install_from_settings

    layered = LayeredModel(folder, dtype, device)
    install_from_settings(layered.model, result.settings)
    return layered


def _perplexity(net, layered, ids, **kw):
    """:func:`~orthoopt.eval.perplexity` of ``net``, or layer by layer of ``layered`` when given."""
    from orthoopt.eval.layered import perplexity_layered
    from orthoopt.eval.perplexity import perplexity

    return perplexity(net, ids, **kw) if layered is None else perplexity_layered(layered, ids, **kw)


def _write_checkpoint(net, tokenizer, tmp: Path, fmt: str, result, settings: dict, progress: bool,
                      layered=None) -> dict:
    """Write the checkpoint's files into ``tmp`` (through the format's writer, into a subfolder whose
    files then move up); returns quant.json as written. ``layered``: the layer-by-layer quantizer has
    already put the fake-quantized weights, config and tokenizer in the subfolder (a LayeredModel of
    it): orthoopt's format adds quant.json, compressed-tensors packs them layer by layer into a new
    subfolder that replaces it."""
    from orthoopt.quant.model import QUANT_JSON, save_quantized

    staging = tmp / CHECKPOINT_DIR
    if layered is not None and fmt == "compressed-tensors":
        from orthoopt.export.ct_layered import save_compressed_tensors_layered

        packed = tmp / (CHECKPOINT_DIR + ".ct")
        save_compressed_tensors_layered(layered, tokenizer, packed, result, settings, progress=progress)
        shutil.rmtree(staging)
        staging = packed
    elif layered is not None:
        (staging / QUANT_JSON).write_text(json.dumps(settings, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    elif fmt == "compressed-tensors":
        from orthoopt.export.compressed_tensors import save_compressed_tensors

        save_compressed_tensors(net, tokenizer, staging, result, settings, progress=progress)
    else:
        save_quantized(net, tokenizer, staging, settings)
    for entry in staging.iterdir():
        os.replace(entry, tmp / entry.name)
    staging.rmdir()
    return json.loads((tmp / QUANT_JSON).read_text(encoding="utf-8"))


def _settings_rows(model, config, q: QuantizeSettings, scheme, calib, fmt, rotation,
                   dtype: str) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [("model", str(model)), ("model dtype (loaded, written)", dtype)]
    if config is None:
        rows.append(("rotation", "none"))
    else:
        steps = config.phase_steps() if config.learned else "-"
        rows += [("rotation", f"{config.method} ({', '.join(config.rotations)})"),
                 ("solver, steps", f"{config.solver_name or '-'}, {steps}"),
                 ("rotation seed, dtype", f"{config.seed}, {config.compute.dtype}")]
        if rotation is not None and rotation.get("invariance_error") is not None:
            rows.append(("rotated logits vs input (relative)", rotation["invariance_error"]))
    rows += [("scheme", scheme["name"] if scheme else "none"),
             ("weights", f"{q.wbits}-bit {'symmetric' if q.sym else 'asymmetric'}, "
                         + (f"groups of {q.group_size}" if q.group_size else "per output channel")),
             ("activations", "not quantized" if q.abits >= 16 else f"{q.abits}-bit per token, dynamic"),
             ("quantizer", q.method + (f", {q.nsamples} windows" if q.uses_calibration else "")),
             ("online Hadamard (R4), R3", f"{q.online_hadamard}, {q.r3}"),
             ("K/V cache", "not quantized" if q.kvbits >= 16 else f"{q.kvbits}-bit"),
             ("calibration", "none" if calib is None else calib.spec),
             ("format", fmt)]
    if scheme and scheme["overrides"]:
        rows.append(("overridden scheme settings", ", ".join(scheme["overrides"])))
    return rows


__all__ = ["OneshotResult", "check_inputs", "oneshot", "partial_path", "sim_quant_of"]
