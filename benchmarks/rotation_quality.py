"""Rotation quality benchmark: perplexity after rotating with every method and quantizing seven ways, over draws.

    python benchmarks/rotation_quality.py --jobs 2 --no-progress   # docs/results.md: SmolLM2-135M defaults
    python benchmarks/rotation_quality.py --quick --results /tmp/r.md   # smoke test, tiny model

For one model: the unrotated original (norms not fused: the real baseline), then rotate (R1 then R2,
``orthoopt.pipeline.rotate_model``) with each of identity (norms fused, no rotation), random
orthogonal, random Hadamard, OptRot, OptRot+, KurTail kurtosis, DFRot and SpinQuant (trained for
W4 RTN per channel and for g64); quantize every model with W4 RTN, W4 RTN g128, W4 RTN g64, W4 GPTQ,
W4 GPTQ g128, W4 GPTQ g64 and W4A8 RTN (symmetric 4-bit weights per output channel or per group of 128
/ 64 input columns, g128 being the W4A16 scheme llm-compressor and vLLM use by default; 8-bit per-token
activations; embeddings and lm_head in full precision, ``docs/quantization.md``). A group size that
does not divide every decoder linear's input columns is not run (SmolLM2-135M: hidden 576, so no
g128; llm-compressor refuses such layers too). Reported: WikiText-style perplexity (non-overlapping
windows), the float baseline, each rotation's seconds, the relative logit error
``||L_q - L_float||_F / ||L_float||_F`` of each quantized model, and the claims (``_claims.py``).

**Draws.** Each (method, quantization) cell is evaluated over ``--draws`` K draws: draw d uses seed
``--seed`` + d for GPTQ's calibration windows, the rotation's calibration windows (optrot+, kurtosis,
dfrot; SpinQuant's training windows use seed 1000 + that) and the random rotation (random, hadamard,
the Hadamard start of every learned method). The methods of :data:`EXPENSIVE` (rotation over ten
minutes on SmolLM2-135M) get ``--expensive-draws`` draws. The tables give the mean over draws and the
spread (max - min and standard deviation); each claim (two methods, one column) gets the ratio of
perplexities with a 95% interval over draws and evaluation windows
(:func:`orthoopt.eval.draws_interval`, docs/quantization.md, "Comparing methods over draws").

**Defaults.** On a real checkpoint: 16384 evaluation tokens in 64 windows of 256 (the protocol
``docs/instrument.md`` chose: past about 64 windows a comparison's interval stops narrowing, since
the spread is in the draws; at least 20 windows are needed for an interval), 16 calibration windows
of 256, 3 draws, 1 draw of the expensive methods, every learned method its default steps. The wall
time of that run is in the Time section of ``docs/results.md``. On the planted fallback model
(``--model-dir planted``): 65536 tokens in windows of 128, 64 calibration windows, the same draws.

**Resumable.** Each finished method's row (all its draws) is saved in ``--cache-dir`` under a folder
named for the settings (:func:`record_dir`); a rerun with the same settings reads those rows instead
of computing them, so a stopped run continues with the methods it had not finished, and methods
can be added to a finished run (``--fresh``: compute everything again).

Model: SmolLM2-135M when it is in the orthoopt cache (``orthoopt fetch smollm2-135m``), else the first
real checkpoint in ``../shared/models`` if there is one (``--model-dir``), else a
planted-outlier Llama trained briefly on the calibration half of the text (``_models.py``; cached in
``benchmarks/.cache``). Text: the first half of ``--text`` (default ``../shared/data/wikitext2-test.txt``)
trains the fallback model and calibrates (optrot+, kurtosis, dfrot, GPTQ); the second half is only
evaluated. Every learned method runs its default solver for its default budget of steps per phase
(``orthoopt.methods.METHODS``, ``docs/solvers.md``; ``--steps`` gives all the same count). The
report goes to ``docs/results.md`` (atomically) with the command, date, code version, machine and
load; the wall time is printed last. ``--json OUT`` also saves the rows (every draw's perplexities
and per-window NLLs) with the settings and header; ``--render OUT`` makes the same page from them
without running anything (the page is always rendered from that record). Runs on one torch thread by default (``--threads``): the
machine is shared, and oversubscribed threads are far slower than one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from orthoopt.models.registry import cached_model
from orthoopt.models.sources import resolve_source
from orthoopt.adapters.verify import logits
from orthoopt.eval import perplexity
from orthoopt.methods import METHODS as REGISTRY
from orthoopt.config import RotateConfig
from orthoopt.pipeline import rotate_model
from orthoopt.quant import ActQuantConfig, QuantizeConfig, quantize_model
from orthoopt.quant.rotated import SimQuantConfig
from orthoopt.utils.atomic import atomic_file

# SpinQuant's end-to-end objective is trained for one quantization setting: here two rows, one trained
# for per-channel W4 RTN and one for W4 RTN with groups of 64 (its A4/KV4 training is in
# benchmarks/full_settings.py).
SPINQUANT_ROWS = {"spinquant": None, "spinquant-g64": 64}
"""Benchmark row -> the weight group size its simulated W4 RTN uses (None: per output channel)."""
METHODS = (*(m for m in REGISTRY if m != "spinquant"), *SPINQUANT_ROWS)

# helpers beside this script (its folder is sys.path[0] when it runs)
from _claims import claims_section
from _data import DEFAULT_TEXT, SHARED, random_windows, split_halves, token_ids
from _models import CACHE_DIR, PlantedLMSpec, PreparedModel, load_or_train_planted, load_shared, shared_model_dir

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL_MODEL = "smollm2-135m"
"""The model of ``--model-dir auto`` when it is in the orthoopt cache (``orthoopt fetch smollm2-135m``)."""
INVARIANCE_TOL = 1e-4  # rotate_model's own tolerance for float32 models
DEFAULT_RESULTS = REPO / "docs" / "results.md"

ORIGINAL = "original"
"""The pseudo-method of the unrotated checkpoint as loaded: no norm fusion, no rotation (the real baseline)."""
METHOD_LABELS = {
    ORIGINAL: "unrotated original (norms not fused)",
    "identity": "norm-fused, no rotation", "random": "random orthogonal", "hadamard": "random Hadamard",
    "optrot": "OptRot", "optrot+": "OptRot+", "kurtosis": "KurTail (kurtosis)", "dfrot": "DFRot",
    "spinquant": "SpinQuant (trained for W4 RTN)", "spinquant-g64": "SpinQuant (trained for W4 RTN g64)",
}
QUANT_CONFIGS: dict[str, dict] = {
    "W4 RTN": {"method": "rtn", "wbits": 4},
    "W4 RTN g128": {"method": "rtn", "wbits": 4, "group_size": 128},
    "W4 RTN g64": {"method": "rtn", "wbits": 4, "group_size": 64},
    "W4 GPTQ": {"method": "gptq", "wbits": 4},
    "W4 GPTQ g128": {"method": "gptq", "wbits": 4, "group_size": 128},
    "W4 GPTQ g64": {"method": "gptq", "wbits": 4, "group_size": 64},
    "W4A8 RTN": {"method": "rtn", "wbits": 4, "act": ActQuantConfig(bits=8)},
}
"""The quantization columns. g128 is the W4A16 scheme llm-compressor and vLLM use by default
(symmetric 4-bit weights in groups of 128 input columns, activations in 16 bits); g64 is the nearest
group size that divides SmolLM2-135M's widths (576, 1536), where g128 cannot run."""
FIXED_ROTATIONS = (ORIGINAL, "identity")
"""Methods whose rotated model does not depend on the draw: their data-free (RTN) cells are computed
once and are the same in every draw; their GPTQ cells still vary with the calibration windows."""
EXPENSIVE = ("kurtosis", "dfrot", "spinquant", "spinquant-g64")
"""Methods whose rotation takes over ten minutes on SmolLM2-135M: ``--expensive-draws`` draws each."""


@dataclass(frozen=True)
class Settings:
    """What one benchmark run does (the command-line flags, resolved)."""

    model_dir: Path | None          # None: the trained planted-outlier model
    planted: PlantedLMSpec
    text: Path
    methods: tuple[str, ...]
    steps: int | None               # solver steps per phase (R1, R2) of every learned method; None: each one's default
    seq_len: int                    # window length: calibration, GPTQ and evaluation
    calib_samples: int              # calibration windows (rotation data + GPTQ)
    calib_tokens: int               # activation rows for kurtosis / dfrot (rotate_model's calib_tokens)
    eval_tokens: int                # evaluated tokens (cut into eval_tokens // seq_len windows)
    logit_windows: int              # eval windows used for the relative logit error
    spin_windows: int               # SpinQuant's training windows (seq_len tokens each, from the first half)
    spin_batch: int                 # SpinQuant's windows per step
    seed: int
    draws: int                      # draws of every method but the EXPENSIVE ones: seeds seed .. seed+draws-1
    expensive_draws: int            # draws of the EXPENSIVE methods
    cache_dir: Path
    progress: bool

    def seeds(self, method: str | None = None) -> tuple[int, ...]:
        """The draw seeds of ``method`` (draw ``d`` uses seed ``seed + d`` for its GPTQ and rotation
        calibration windows and its random rotation); all methods' together when None."""
        k = self.expensive_draws if method in EXPENSIVE else self.draws
        k = max(self.draws, self.expensive_draws) if method is None else k
        return tuple(range(self.seed, self.seed + k))


@dataclass
class MethodResult:
    """One row: a rotation method over its draws, each quantized every way (lists are per draw)."""

    method: str
    seeds: tuple[int, ...]          # the draws' seeds
    rotation_seconds: list[float] = field(default_factory=list)
    invariance_error: float = 0.0   # largest relative logit error of a rotated float model (should be ~1e-6)
    loss: dict = field(default_factory=dict)  # {phase: (first, final)} of learned methods, first draw
    ppl: dict[str, list[float]] = field(default_factory=dict)
    window_nll: dict[str, list[list[float]]] = field(default_factory=dict)  # [draw][window] mean NLL
    logit_error: dict[str, list[float]] = field(default_factory=dict)
    quant_seconds: dict[str, float] = field(default_factory=dict)  # summed over draws
    eval_seconds: dict[str, float] = field(default_factory=dict)

    def mean_ppl(self, config: str) -> float | None:
        """The mean over draws of the perplexity of one quantization column (None: not run)."""
        return _mean(self.ppl[config]) if config in self.ppl else None


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def columns_for(model: torch.nn.Module) -> tuple[dict[str, dict], list[str]]:
    """The quantization columns that apply to ``model`` and a note per column that does not: a group
    size must divide the input columns of every decoder linear (orthoopt refuses others, and so does
    llm-compressor for its group strategy; SmolLM2-135M's hidden size 576 is not a multiple of 128)."""
    widths = {m.in_features for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"}
    run, skipped = {}, []
    for name, config in QUANT_CONFIGS.items():
        bad = sorted(w for w in widths if config.get("group_size") and w % config["group_size"])
        if bad:
            skipped.append(f"{name}: not run, group size {config['group_size']} does not divide the decoder "
                           f"linears' {', '.join(map(str, bad))} input columns")
        else:
            run[name] = config
    return run, skipped


# ------------------------------------------------------------------------------------------------ run
def prepare(settings: Settings, split) -> PreparedModel:
    if settings.model_dir is not None:
        return load_shared(settings.model_dir)
    return load_or_train_planted(settings.planted, split.calib, split.sha256, settings.cache_dir,
                                 progress=settings.progress)


def relative_error(L: torch.Tensor, ref: torch.Tensor) -> float:
    """``||L - ref||_F / ||ref||_F`` in float64."""
    return float((L - ref).norm() / ref.norm())


def rotate(base: torch.nn.Module, method: str, settings: Settings, calib: torch.Tensor, seed: int,
           spin_calib: torch.Tensor | None = None):
    """A rotated copy of ``base`` and :func:`rotate_model`'s result with the random start / random
    rotation of ``seed`` and the calibration windows ``calib`` (SpinQuant rows train on ``spin_calib``)."""
    rotated = copy.deepcopy(base)
    if method == ORIGINAL:
        return rotated, None
    if method in SPINQUANT_ROWS:
        sim = SimQuantConfig(wbits=4, w_group_size=SPINQUANT_ROWS[method])
        result = rotate_model(
            rotated,
            RotateConfig("spinquant", seed=seed, solve={"steps": settings.steps},
                         spinquant={"batch_size": settings.spin_batch, "sim_quant": sim}),
            calib=spin_calib,
            progress=settings.progress,
        )
        return rotated, result
    result = rotate_model(
        rotated,
        RotateConfig(method, seed=seed, solve={"steps": settings.steps}, calib={"tokens": settings.calib_tokens}),
        calib=calib if method in REGISTRY and REGISTRY[method].learned else None,
        progress=settings.progress,
    )
    return rotated, result


def quantize_and_eval(rotated: torch.nn.Module, config: dict, settings: Settings, calib: torch.Tensor,
                      eval_ids: torch.Tensor, probe: torch.Tensor, ref_logits: torch.Tensor) -> dict:
    """Quantize a copy of ``rotated`` with ``config`` (GPTQ on ``calib``); ``{"ppl", "window_nll",
    "logit_error", "quant_seconds", "eval_seconds"}``."""
    model = copy.deepcopy(rotated)
    q = quantize_model(model, QuantizeConfig(**config), calib=calib if config["method"] == "gptq" else None,
                       progress=settings.progress)
    start = time.perf_counter()
    ppl = perplexity(model, eval_ids, seq_len=settings.seq_len, max_tokens=settings.eval_tokens,
                     progress=settings.progress)
    out = {"ppl": ppl["ppl"], "window_nll": ppl["window_nll"], "eval_seconds": time.perf_counter() - start,
           "logit_error": relative_error(logits(model, probe), ref_logits), "quant_seconds": q.settings["seconds"]}
    q.hooks.remove()
    return out


def run_method(base: torch.nn.Module, method: str, settings: Settings, probe: torch.Tensor, ref_logits: torch.Tensor,
               calibs: dict[int, torch.Tensor], eval_ids: torch.Tensor,
               spin_calibs: dict[int, torch.Tensor] | None = None,
               columns: dict[str, dict] | None = None) -> MethodResult:
    """One row over the draws of ``method``: for each draw seed ``k``, rotate a copy of ``base``
    (random start ``k``, rotation calibration ``calibs[k]``, SpinQuant training ``spin_calibs[k]``) and
    quantize a copy of the rotated model per config (GPTQ calibrated on ``calibs[k]``). The rotation
    and the RTN cells of :data:`FIXED_ROTATIONS` are computed once and repeated in every draw.
    ``columns``: the quantization configs to run (default all of :data:`QUANT_CONFIGS`)."""
    columns = QUANT_CONFIGS if columns is None else columns
    row = MethodResult(method, settings.seeds(method))
    rotated = None
    for d, seed in enumerate(row.seeds):
        fixed = method in FIXED_ROTATIONS and d > 0
        if not fixed:
            rotated, result = rotate(base, method, settings, calibs[seed], seed, (spin_calibs or {}).get(seed))
            invariance = relative_error(logits(rotated, probe), ref_logits)
            if not invariance <= INVARIANCE_TOL:
                raise RuntimeError(f"{method}: the rotated float model's logits differ by {invariance:.2e} (relative)")
            row.invariance_error = max(row.invariance_error, invariance)
            row.rotation_seconds.append(0.0 if result is None else result.report["seconds"])
            if result is not None and d == 0:
                row.loss = {p: (r.history[0] if r.history else None, r.final_loss) for p, r in result.solves.items()}
        for name, config in columns.items():
            if fixed and config["method"] != "gptq":
                r = {"ppl": row.ppl[name][0], "window_nll": row.window_nll[name][0],
                     "logit_error": row.logit_error[name][0], "quant_seconds": 0.0, "eval_seconds": 0.0}
            else:
                r = quantize_and_eval(rotated, config, settings, calibs[seed], eval_ids, probe, ref_logits)
                log(f"  {method:<9} {name:<12} seed {seed}: ppl {r['ppl']:10.4f}  logit err {r['logit_error']:.4f}")
            for key in ("ppl", "window_nll", "logit_error"):
                getattr(row, key).setdefault(name, []).append(r[key])
            row.quant_seconds[name] = row.quant_seconds.get(name, 0.0) + r["quant_seconds"]
            row.eval_seconds[name] = row.eval_seconds.get(name, 0.0) + r["eval_seconds"]
    return row


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- report
def fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if math.isfinite(x) and abs(x) < 1e5 else f"{x:.3e}"


def settings_section(settings: Settings, prepared: PreparedModel, split, n_eval: int,
                     skipped: list[str] = ()) -> list[str]:
    s = settings
    windows = min(s.eval_tokens, n_eval) // s.seq_len
    def base(m: str) -> str:
        return "spinquant" if m in SPINQUANT_ROWS else m

    learned = ", ".join(f"{m} {REGISTRY[base(m)].solver} {REGISTRY[base(m)].steps if s.steps is None else s.steps} steps"
                        for m in s.methods if base(m) in REGISTRY and REGISTRY[base(m)].learned)
    out = ["## Settings", "", f"- model: {prepared.description}"]
    if prepared.source == "planted":
        info, tr = prepared.info, prepared.info["train"]
        before, after = info["outliers_before"], info["outliers_after"]
        where = f"loaded from cache {info['cache']}" if info["cached"] else "trained in this run"
        per_layer = lambda xs: "[" + ", ".join(f"{x:.1f}" for x in xs) + "]"  # noqa: E731
        out.append(
            f"- fallback model: {info['parameters'] / 1e6:.2f}M parameters; training loss {tr['loss_first']:.3f} "
            f"-> {tr['loss_last']:.3f} nats/byte, {tr['seconds']:.0f} s ({where}). The default size, hidden "
            f"{FULL['hidden']} / {FULL['layers']} layers, is below the planted model's 512 / 8 so that the whole "
            "run, training included, stays well under 30 minutes on a shared 2-core CPU (--hidden, --layers)")
        out.append(
            f"- planted outlier channels {info['channels']} (ratio to the median other channel, before -> after "
            f"training): embedding columns {before['embedding']:.1f} -> {after['embedding']:.1f}, o_proj rows "
            f"{before['o_rows']:.1f} -> {after['o_rows']:.1f}, down_proj rows {before['down_rows']:.1f} -> "
            f"{after['down_rows']:.1f}, residual RMS per layer {per_layer(before['residual'])} -> "
            f"{per_layer(after['residual'])}")
    out += [
        f"- text: {split.describe()}",
        "- rotation s: wall time of `rotate_model` (norm fusion, calibration capture, solve, write-back)",
        f"- rotations: R1 and R2; learned methods: solver and steps per phase ({learned}), "
        f"start at the random Hadamard matrix",
        f"- draws: {s.draws} of every method ({s.expensive_draws} of {', '.join(EXPENSIVE)}); draw d uses seed "
        f"{s.seed} + d for GPTQ's calibration windows, the rotation calibration windows and the random "
        "rotation (random, hadamard, the Hadamard start of learned methods); norm fusion alone and the "
        "unrotated original are the same model in every draw (their RTN cells too)",
        *([f"- SpinQuant rows: R1 and R2 learned jointly on the causal-LM loss of the rotated model with its "
           f"decoder linears W4 RTN-quantized (straight-through), per output channel or per group of 64 as the "
           f"row says, activations in full precision; Cayley SGD lr 1.5, cosine decay, {s.spin_batch} windows "
           f"of {s.seq_len} tokens per step from {s.spin_windows} windows of the first half (seed 1000 + the draw's)"]
          if any(m in SPINQUANT_ROWS for m in s.methods) else []),
        f"- calibration: {s.calib_samples} windows x {s.seq_len} tokens = {s.calib_samples * s.seq_len} tokens "
        f"from the first half (optrot+ Hessians, GPTQ); kurtosis/dfrot use {s.calib_tokens} activation rows "
        "of them",
        f"- evaluation: {windows} windows x {s.seq_len} tokens = {windows * s.seq_len} tokens "
        f"({windows * (s.seq_len - 1)} predicted) of the second half; logit errors on its first "
        f"{s.logit_windows} windows",
        "- quantization: weights symmetric per output channel or per group of 128 / 64 input columns (g128: "
        "the W4A16 scheme llm-compressor and vLLM use by default; RTN or GPTQ, damp 0.01, no act-order); A8 = "
        "8-bit symmetric per-token activations of every decoder linear, no online Hadamard; embeddings and "
        "lm_head in full precision",
        *(f"- {note} (`-` in the tables)" for note in skipped),
    ]
    return out


def perplexity_table(float_ppl: dict, rows: dict[str, MethodResult]) -> list[str]:
    names = list(QUANT_CONFIGS)
    out = ["## Perplexity", "", "Mean over the draws; the spread is in the next table.", "",
           "| method | rotation s | " + " | ".join(names) + " |",
           "|---|---:|" + "---:|" * len(names),
           "| float (unquantized) | - | " + " | ".join(fmt(float_ppl["ppl"]) for _ in names) + " |"]
    for m, r in rows.items():
        cells = " | ".join(fmt(r.mean_ppl(n)) for n in names)
        out.append(f"| {METHOD_LABELS[m]} | {_mean(r.rotation_seconds):.1f} | {cells} |")
    return out


def logit_table(rows: dict[str, MethodResult]) -> list[str]:
    names = list(QUANT_CONFIGS)
    out = ["## Relative logit error vs the float model", "",
           "`||L_q - L_float||_F / ||L_float||_F`, mean over the draws; `rotated float` is the rotated, "
           "unquantized model (rotation invariance check, largest over the draws).", "",
           "| method | rotated float | " + " | ".join(names) + " | solver loss R1 (start -> end) |",
           "|---|---:|" + "---:|" * len(names) + "---|"]
    for m, r in rows.items():
        loss = r.loss.get("R1")
        loss_s = f"{loss[0]:.4g} -> {loss[1]:.4g}" if loss and loss[0] is not None else "-"
        cells = " | ".join(fmt(_mean(r.logit_error[n]) if n in r.logit_error else None, 4) for n in names)
        out.append(f"| {METHOD_LABELS[m]} | {r.invariance_error:.1e} | {cells} | {loss_s} |")
    return out


def spread_table(rows: dict[str, MethodResult]) -> list[str]:
    """Per cell: the perplexity's max - min and standard deviation (ddof 1) over the draws."""
    if all(len(r.seeds) < 2 for r in rows.values()):
        return []
    names = list(QUANT_CONFIGS)
    out = ["## Perplexity spread over draws", "",
           "Per cell `max - min / standard deviation` of the perplexity over the method's draws (`draws` "
           "column; one draw: `-`).", "",
           "| method | draws | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for m, r in rows.items():
        cells = " | ".join(_spread(r.ppl.get(n, [])) for n in names)
        out.append(f"| {METHOD_LABELS[m]} | {len(r.seeds)} | {cells} |")
    return out


def _spread(xs: list[float]) -> str:
    if len(xs) < 2:
        return "-"
    return f"{max(xs) - min(xs):.4f} / {statistics.stdev(xs):.4f}"


def time_section(rows: dict[str, MethodResult], float_ppl: dict, timings: dict) -> list[str]:
    rotation = sum(sum(r.rotation_seconds) for r in rows.values())
    quant = sum(sum(r.quant_seconds.values()) for r in rows.values())
    evaluation = sum(sum(r.eval_seconds.values()) for r in rows.values()) + float_ppl["seconds"]
    jobs = timings.get("jobs", 1)
    workers = f" (methods in {jobs} worker processes; the per-part sums below add up their times)" if jobs > 1 else ""
    return ["## Time", "",
            f"total {timings['total']:.0f} s{workers}: model {timings['model']:.0f} s, float baseline "
            f"{timings['baseline']:.0f} s, methods {timings['methods']:.0f} s (all draws: rotation {rotation:.0f} s, "
            f"quantization {quant:.0f} s, evaluation {evaluation:.0f} s)"] + (
        ["", f"Read from the record of an earlier run with the same settings (their seconds are that run's): "
              f"{', '.join(METHOD_LABELS[m] for m in timings['resumed'])}."] if timings.get("resumed") else [])


def render(settings: Settings, prepared: PreparedModel, split, float_ppl: dict, rows: dict[str, MethodResult],
           n_eval: int, timings: dict, skipped: list[str] = ()) -> str:
    """The markdown report (also printed): settings, tables, the claims with their intervals, times;
    ``skipped``: why some quantization columns were not run."""
    sections = [settings_section(settings, prepared, split, n_eval, skipped), perplexity_table(float_ppl, rows),
                spread_table(rows), logit_table(rows), claims_section(rows, METHOD_LABELS),
                time_section(rows, float_ppl, timings)]
    return "\n\n".join("\n".join(sec) for sec in sections if sec) + "\n"


def code_version() -> str:
    """``git describe``-like id of the checkout: commit, plus whether tracked files were modified."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (" with uncommitted changes to tracked files" if dirty else "")


def machine_info(load_start: tuple, load_end: tuple, jobs: int = 1) -> list[str]:
    return [f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads"
            + (f" in each of {jobs} worker processes (one method at a time each)" if jobs > 1 else ""),
            f"- load average (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in load_start)}, at end "
            f"{'/'.join(f'{x:.1f}' for x in load_end)} (other jobs shared the CPUs when it is above "
            f"{os.cpu_count()})"]


FINDINGS_MARKER = "<!-- findings: written by hand, kept when the benchmark rewrites this page -->"
"""Everything from this line on in an existing results page is kept: the analysis of the numbers
(how they were made is stated there) is not the benchmark's to overwrite."""


def kept_findings(path: Path) -> str:
    """The hand-written findings of an existing page (from :data:`FINDINGS_MARKER` on, after a blank
    line), or "" when the page or its marker is missing."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    return "\n" + old[old.index(FINDINGS_MARKER):] if FINDINGS_MARKER in old else ""


def write_results(path: Path, body: str, command: str, header: list[str]) -> None:
    """``path`` <- a markdown page with the command, date, machine and ``body``, atomically; the
    hand-written findings of an existing page (from :data:`FINDINGS_MARKER` on) are carried over."""
    findings = kept_findings(path)
    text = "\n".join(["# Rotation quality benchmark", "",
                      "Written by `benchmarks/rotation_quality.py` down to the findings marker; rerun it rather "
                      "than editing the tables by hand.", "",
                      "```", command, "```", ""] + header + ["", body]) + findings
    with atomic_file(path) as f:
        f.write(text)


# -------------------------------------------------------------------------------------------- CLI
FULL = {"hidden": 256, "layers": 4, "heads": 4, "train_steps": 300, "steps": None, "eval_tokens": 65536,
        "seq_len": 128, "calib_samples": 64, "calib_tokens": 2048, "logit_windows": 8, "draws": 3,
        "expensive_draws": 1,
        "spin_windows": 400, "spin_batch": 4}
REAL = {**FULL, "eval_tokens": 16384, "seq_len": 256, "calib_samples": 16}
"""The defaults on a real checkpoint (SmolLM2-135M: about an hour with ``--jobs 2`` on 2 cores)."""
QUICK = {"hidden": 128, "layers": 2, "heads": 2, "train_steps": 20, "steps": 3, "eval_tokens": 2048,
         "seq_len": 64, "calib_samples": 8, "calib_tokens": 256, "logit_windows": 2, "draws": 2,
         "expensive_draws": 1,
         "spin_windows": 8, "spin_batch": 2}


def _default(key: str) -> str:
    if FULL[key] is None:
        return "each method its default"
    return str(FULL[key]) if REAL[key] == FULL[key] else f"{FULL[key]}; on a real model {REAL[key]}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Defaults in [brackets] are the full run's; --quick changes them.")
    p.add_argument("--model-dir", default="auto",
                   help="Hugging Face model folder or a fetched registered name (smollm2-135m); 'auto': "
                        "smollm2-135m when cached, else the first folder in ../shared/models, else the planted "
                        "model; 'planted': always the trained planted-outlier model")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text file: first half calibrates, second evaluates")
    p.add_argument("--methods", default=",".join((ORIGINAL, *METHODS)),
                   help=f"comma-separated rotation methods, '{ORIGINAL}' = the unrotated checkpoint [all]")
    sizes = [("--steps", "steps", "solver steps per phase (R1, R2) of every learned method"),
             ("--eval-tokens", "eval_tokens", "tokens evaluated"),
             ("--seq-len", "seq_len", "window length of calibration, GPTQ and evaluation"),
             ("--calib-samples", "calib_samples", "calibration windows"),
             ("--calib-tokens", "calib_tokens", "activation rows for kurtosis/dfrot"),
             ("--logit-windows", "logit_windows", "evaluation windows for the logit error"),
             ("--spin-windows", "spin_windows", "SpinQuant training windows from the first half"),
             ("--spin-batch", "spin_batch", "SpinQuant windows per step"),
             ("--draws", "draws", "draws of each method: draw d uses seed seed+d for GPTQ and rotation "
              "calibration windows and random rotations"),
             ("--expensive-draws", "expensive_draws", f"draws of {', '.join(EXPENSIVE)}"),
             ("--hidden", "hidden", "planted model hidden size"),
             ("--layers", "layers", "planted model layers"),
             ("--heads", "heads", "planted model attention heads"),
             ("--train-steps", "train_steps", "planted model AdamW steps")]
    for flag, key, text in sizes:
        p.add_argument(flag, type=int, default=None,
                       help=f"{text} [{_default(key)}]")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the first draw (rotations, calibration windows) and of training [0]")
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="where trained planted models are cached")
    p.add_argument("--results", type=Path, default=None,
                   help=f"markdown output [{DEFAULT_RESULTS.relative_to(REPO)}; with --quick: none]")
    p.add_argument("--no-results", action="store_true", help="print only, write no markdown file")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, 0: torch's default [1]. On the shared 2-core machine a 2-thread "
                        "training step next to other jobs was measured 15x slower than a 1-thread one, while "
                        "alone it is 1.75x faster")
    p.add_argument("--jobs", type=int, default=1,
                   help="methods computed in this many worker processes at once, each with --threads torch "
                        "threads [1]; on 2 cores, --jobs 2 --threads 1 keeps both busy (small products scale "
                        "poorly over threads)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: always the planted model, tiny (hidden 128, 2 layers), 3 steps, 2048 eval "
                        "tokens, 2 draws (1 of the expensive methods); writes no results page unless --results is given")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--json", type=Path, default=None, metavar="OUT",
                   help="also write the rows (every draw's perplexities and per-window NLLs) and settings to OUT")
    p.add_argument("--render", type=Path, default=None, metavar="ROWS_JSON",
                   help="run nothing: make the page from rows saved by --json (printed, and written as --results "
                        "says)")
    p.add_argument("--fresh", action="store_true",
                   help="compute every method again instead of reading the rows an earlier run with the same "
                        "settings finished (kept in --cache-dir; a stopped run resumes from them)")
    p.add_argument("--seeds", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> Settings:
    if args.model_dir == "auto":
        model_dir = None if args.quick else (cached_model(DEFAULT_REAL_MODEL) or shared_model_dir(SHARED))
    elif args.model_dir == "planted":
        model_dir = None
    else:
        try:
            model_dir = resolve_source(args.model_dir, fetch=False).folder
        except FileNotFoundError:
            model_dir = None
        if model_dir is None:
            raise FileNotFoundError(f"--model-dir {args.model_dir} is not a Hugging Face folder (no config.json) "
                                    "nor a fetched registered name")
    base = QUICK if args.quick else FULL if model_dir is None else REAL
    v = {k: getattr(args, k) if getattr(args, k) is not None else d for k, d in base.items()}
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in (ORIGINAL, *METHODS)]
    if bad or not methods:
        raise ValueError(f"unknown methods {bad}; choose from {', '.join((ORIGINAL, *METHODS))}")
    for k in ("steps", "eval_tokens", "seq_len", "calib_samples", "calib_tokens", "logit_windows", "train_steps",
              "draws", "expensive_draws", "spin_windows", "spin_batch"):
        if v[k] is not None and v[k] < (2 if k == "seq_len" else 1):
            raise ValueError(f"--{k.replace('_', '-')} must be positive (seq-len at least 2), got {v[k]}")
    if v["eval_tokens"] < v["seq_len"] * v["logit_windows"]:
        raise ValueError(f"--eval-tokens {v['eval_tokens']} is less than --logit-windows x --seq-len")
    planted = PlantedLMSpec(hidden_size=v["hidden"], num_layers=v["layers"], num_heads=v["heads"],
                            steps=v["train_steps"], warmup=min(30, v["train_steps"] // 10), seed=args.seed,
                            seq_len=v["seq_len"])
    return Settings(model_dir, planted, args.text, methods, v["steps"], v["seq_len"], v["calib_samples"],
                    v["calib_tokens"], v["eval_tokens"], v["logit_windows"], v["spin_windows"], v["spin_batch"],
                    args.seed,
                    v["draws"], v["expensive_draws"], args.cache_dir,
                    not args.no_progress)


def results_path(args: argparse.Namespace) -> Path | None:
    """Where the markdown goes: ``--results``, else docs/results.md, except with ``--quick`` (a smoke
    test must not replace the real results) or ``--no-results``."""
    if args.no_results:
        return None
    if args.results is not None:
        return args.results
    return None if args.quick else DEFAULT_RESULTS


@dataclass
class Inputs:
    """Everything every method's row needs, built the same way by the main process and by each worker
    of ``--jobs``: the model (float, unrotated), the token windows and the float model's reference."""

    prepared: PreparedModel
    split: object
    calibs: dict[int, torch.Tensor]          # {draw seed: [calib_samples, seq_len]}: rotation data and GPTQ
    spin_calibs: dict[int, torch.Tensor]     # {draw seed: [spin_windows, seq_len]} SpinQuant training windows
    eval_ids: torch.Tensor
    probe: torch.Tensor                      # [logit_windows, seq_len] windows of the logit error
    ref_logits: torch.Tensor
    columns: dict[str, dict]                 # the quantization columns that apply to the model
    skipped: list[str]                       # why each other column is not run


def build_inputs(settings: Settings) -> Inputs:
    torch.manual_seed(settings.seed)
    split = split_halves(settings.text)
    prepared = prepare(settings, split)
    tok = prepared.tokenizer
    calib_ids, eval_ids = token_ids(split.calib, tok), token_ids(split.eval, tok)
    seeds = settings.seeds()
    calibs = {k: random_windows(calib_ids, settings.calib_samples, settings.seq_len, seed=k) for k in seeds}
    spin_calibs = {k: random_windows(calib_ids, settings.spin_windows, settings.seq_len, seed=k + 1000)
                   for k in seeds}
    n_eval = min(settings.eval_tokens, eval_ids.numel())
    if n_eval < settings.seq_len * settings.logit_windows:
        raise ValueError(f"the evaluation half has {eval_ids.numel()} tokens, fewer than "
                         f"{settings.logit_windows} windows of {settings.seq_len}")
    probe = eval_ids[: settings.logit_windows * settings.seq_len].reshape(settings.logit_windows, settings.seq_len)
    return Inputs(prepared, split, calibs, spin_calibs, eval_ids, probe, logits(prepared.model, probe),
                  *columns_for(prepared.model))


def method_row(settings: Settings, inputs: Inputs, method: str) -> MethodResult:
    log(f"method {method}")
    i = inputs
    row = run_method(i.prepared.model, method, settings, i.probe, i.ref_logits, i.calibs, i.eval_ids, i.spin_calibs,
                     i.columns)
    log(f"  {method} rotation took {sum(row.rotation_seconds):.1f} s over {len(row.rotation_seconds)} draw(s)")
    return row


COST_ORDER = ("dfrot", "kurtosis", "spinquant-g64", "spinquant", "optrot+", "optrot")
"""Methods in decreasing cost: ``--jobs`` starts the longest first so the workers finish together."""
_WORKER: dict = {}


def _worker_init(settings: Settings, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["inputs"] = build_inputs(settings)


def record_dir(settings: Settings) -> Path:
    """The folder of this run's resumable record: one JSON file per finished method, in a folder
    named for everything a row depends on (the settings but ``methods`` and ``progress``, and the
    quantization columns), so a rerun with other settings starts its own record."""
    key = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("methods", "progress", "cache_dir")}
    key["columns"] = {name: {k: str(v) for k, v in c.items()} for name, c in QUANT_CONFIGS.items()}
    digest = hashlib.sha256(json.dumps(key, default=str, sort_keys=True).encode()).hexdigest()[:12]
    return settings.cache_dir / f"rotation-quality-{digest}"


def _row_path(record: Path, method: str) -> Path:
    return record / f"{method}.json"


def save_row(record: Path | None, row: MethodResult) -> None:
    """``record/METHOD.json`` <- ``row``, atomically (a stopped run leaves whole rows only)."""
    if record is None:
        return
    record.mkdir(parents=True, exist_ok=True)
    with atomic_file(_row_path(record, row.method)) as f:
        json.dump(json.loads(json.dumps(dataclasses.asdict(row), default=str)), f)


def load_row(record: Path | None, method: str) -> MethodResult | None:
    """The row of ``method`` kept in ``record`` by an earlier run with the same settings, or None."""
    path = None if record is None else _row_path(record, method)
    if path is None or not path.is_file():
        return None
    r = json.loads(path.read_text(encoding="utf-8"))
    return MethodResult(**dict(r, seeds=tuple(r["seeds"]), loss={k: tuple(v) for k, v in r["loss"].items()}))


def _computed_row(settings: Settings, inputs: Inputs, method: str, record: Path | None) -> MethodResult:
    row = method_row(settings, inputs, method)
    save_row(record, row)
    return row


def _worker_row(settings: Settings, method: str, record: Path | None) -> MethodResult:
    return _computed_row(settings, _WORKER["inputs"], method, record)


def run_rows(settings: Settings, inputs: Inputs, jobs: int, threads: int,
             record: Path | None = None) -> dict[str, MethodResult]:
    """Every method's row, in ``settings.methods`` order: read from ``record`` where an earlier run
    with the same settings finished it, else computed (and saved there) in this process (``jobs`` 1),
    or in ``jobs`` worker processes (spawned, each building its own :class:`Inputs` and using
    ``threads`` torch threads), longest methods first. The rows do not depend on which process
    computed them, nor on whether they were read back."""
    rows = {m: r for m in settings.methods if (r := load_row(record, m)) is not None}
    if rows:
        log(f"read {len(rows)} finished method(s) from {record}: {', '.join(rows)}")
    todo = [m for m in settings.methods if m not in rows]
    if jobs <= 1 or len(todo) <= 1:
        rows.update({m: _computed_row(settings, inputs, m, record) for m in todo})
        return {m: rows[m] for m in settings.methods}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    order = sorted(todo, key=lambda m: COST_ORDER.index(m) if m in COST_ORDER else len(COST_ORDER))
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(settings, threads)) as pool:
        futures = {m: pool.submit(_worker_row, settings, m, record) for m in order}
        rows.update({m: futures[m].result() for m in todo})
    return {m: rows[m] for m in settings.methods}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads < 0 or args.jobs < 1:
        raise ValueError(f"--threads must be >= 0 and --jobs >= 1, got {args.threads} and {args.jobs}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seeds is not None:
        raise ValueError("--seeds (W4 GPTQ repeated over calibration seeds) is replaced by --draws: every cell over "
                         "K draws of calibration and rotation seeds")
    settings = resolve(args)
    command = "python " + " ".join(shlex.quote(a) for a in [
        str(Path(sys.argv[0]).resolve().relative_to(REPO)) if argv is None else "benchmarks/rotation_quality.py",
        *(sys.argv[1:] if argv is None else argv)])
    out_path = results_path(args)
    load_start, code = os.getloadavg(), code_version()
    if args.render is not None:
        record = json.loads(args.render.read_text(encoding="utf-8"))
        publish(record, out_path)
        return 0
    t0 = time.perf_counter()
    inputs = build_inputs(settings)
    prepared = inputs.prepared
    t_model = time.perf_counter() - t0
    log(f"model: {prepared.description}")

    t1 = time.perf_counter()
    float_ppl = perplexity(prepared.model, inputs.eval_ids, seq_len=settings.seq_len, max_tokens=settings.eval_tokens,
                           progress=settings.progress)
    t_baseline = time.perf_counter() - t1
    log(f"float baseline perplexity {float_ppl['ppl']:.4f} on {float_ppl['tokens']} predicted tokens")

    t2 = time.perf_counter()
    record = None if args.fresh else record_dir(settings)
    resumed = [m for m in settings.methods if record is not None and _row_path(record, m).is_file()]
    rows = run_rows(settings, inputs, args.jobs, args.threads or torch.get_num_threads(), record)
    timings = {"model": t_model, "baseline": t_baseline, "methods": time.perf_counter() - t2,
               "total": time.perf_counter() - t0, "jobs": args.jobs,
               "resumed": resumed}
    code_end = code_version()
    if code_end != code:
        code += f" at the start; {code_end} at the end (the checkout changed during the run)"
    header = [f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}", f"- code: {code}"]
    header += machine_info(load_start, os.getloadavg(), args.jobs)
    record = {"command": command, "header": header, "settings": dataclasses.asdict(settings),
              "model": {"source": prepared.source, "description": prepared.description, "info": prepared.info},
              "split": inputs.split.describe(), "n_eval": min(settings.eval_tokens, inputs.eval_ids.numel()),
              "float_ppl": {"ppl": float_ppl["ppl"], "seconds": t_baseline}, "timings": timings,
              "skipped": inputs.skipped, "rows": [dataclasses.asdict(r) for r in rows.values()]}
    record = json.loads(json.dumps(record, default=str))  # the page is made from what --json saves
    if args.json is not None:
        with atomic_file(args.json) as f:
            json.dump(record, f)
        log(f"wrote the rows to {args.json}")
    publish(record, out_path)
    wall = time.perf_counter() - t0
    print(f"wall time {wall:.0f} s ({wall / 60:.1f} min)")
    return 0


def render_record(record: dict) -> str:
    """The markdown body of a run saved by ``--json`` (:func:`render` on the objects rebuilt from it)."""
    s = dict(record["settings"], planted=PlantedLMSpec(**record["settings"]["planted"]),
             methods=tuple(record["settings"]["methods"]), text=Path(record["settings"]["text"]),
             cache_dir=Path(record["settings"]["cache_dir"]))
    s["model_dir"] = None if s["model_dir"] is None else Path(s["model_dir"])
    rows = {r["method"]: MethodResult(**dict(r, seeds=tuple(r["seeds"]))) for r in record["rows"]}
    split = SimpleNamespace(describe=lambda: record["split"])
    return render(Settings(**s), SimpleNamespace(**record["model"]), split, record["float_ppl"], rows,
                  record["n_eval"], record["timings"], record["skipped"])


def publish(record: dict, out_path: Path | None) -> None:
    """Print the page of ``record`` (the run's header, then the body) and write it to ``out_path``."""
    body = render_record(record)
    print("\n".join(record["header"]) + "\n\n" + body)
    if out_path is not None:
        write_results(out_path, body, record["command"], record["header"])
        log(f"wrote {out_path}")


if __name__ == "__main__":
    sys.exit(main())
