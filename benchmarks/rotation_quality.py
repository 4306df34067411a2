"""Rotation quality benchmark: perplexity after rotating with every method and quantizing seven ways, over draws.

    python benchmarks/rotation_quality.py --no-progress             # SmolLM2-135M defaults: the claims, ~50 min
    python benchmarks/rotation_quality.py --draws 3 --no-progress   # docs/results.md (3 draws)
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
of 256, the methods the claims compare (unrotated, Hadamard, OptRot, OptRot+; ``--methods all`` adds
the others), 2 draws (1 of the expensive methods), every learned method its default steps, 2 worker
processes: about 50 minutes on 2 cores (:data:`_rq_rows.REAL`). ``docs/results.md`` is the same with
``--draws 3``; its Time section gives what that run took. On the planted fallback model
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
without running anything: the page is always rendered from that record, by ``_results_page.py``
(the rows' types and the columns are in ``_rq_rows.py``). Runs on one torch thread by default (``--threads``): the
machine is shared, and oversubscribed threads are far slower than one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from orthoopt.models.registry import cached_model
from orthoopt.models.sources import resolve_source
from orthoopt.adapters.verify import logits
from orthoopt.eval import perplexity
from orthoopt.config import RotateConfig
from orthoopt.pipeline import rotate_model
from orthoopt.quant import QuantizeConfig, quantize_model
from orthoopt.quant.rotated import SimQuantConfig
from orthoopt.utils.atomic import atomic_file

# helpers beside this script (its folder is sys.path[0] when it runs): the rows (_rq_rows), the page
# rendered from their JSON record (_results_page, with the claims of _claims)
from _data import DEFAULT_TEXT, SHARED, random_windows, split_halves, token_ids
from _models import CACHE_DIR, PlantedLMSpec, PreparedModel, load_or_train_planted, load_shared, shared_model_dir
from _results_page import log, publish
from _rq_rows import (A4_COLUMNS, ALL_COLUMNS, CLAIM_METHODS, EXPENSIVE, FIXED_ROTATIONS, FULL, METHODS, ORIGINAL, QUANT_CONFIGS, QUICK,
                      REAL, REGISTRY, SPINQUANT_ROWS, MethodResult, Settings)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL_MODEL = "smollm2-135m"
"""The model of ``--model-dir auto`` when it is in the orthoopt cache (``orthoopt fetch smollm2-135m``)."""
INVARIANCE_TOL = 1e-4  # rotate_model's own tolerance for float32 models
DEFAULT_RESULTS = REPO / "docs" / "results.md"

def columns_for(model: torch.nn.Module, configs: dict[str, dict] = QUANT_CONFIGS) -> tuple[dict[str, dict], list[str]]:
    """The quantization columns that apply to ``model`` and a note per column that does not: a group
    size must divide the input columns of every decoder linear (orthoopt refuses others, and so does
    llm-compressor for its group strategy; SmolLM2-135M's hidden size 576 is not a multiple of 128)."""
    widths = {m.in_features for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"}
    run, skipped = {}, []
    for name, config in configs.items():
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


# -------------------------------------------------------------------------------------------- CLI
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
    p.add_argument("--methods", default=None,
                   help=f"comma-separated rotation methods, '{ORIGINAL}' = the unrotated checkpoint, or 'all' "
                        f"[all; on a real model the claims' {','.join(CLAIM_METHODS)}]")
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
    p.add_argument("--columns", default=None,
                   help=f"comma-separated quantization columns of {', '.join(ALL_COLUMNS)} [all but "
                        f"{', '.join(A4_COLUMNS)}]")
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
    p.add_argument("--jobs", type=int, default=None,
                   help="methods computed in this many worker processes at once, each with --threads torch "
                        "threads [1; on a real model 2]; on 2 cores, --jobs 2 --threads 1 keeps both busy (small "
                        "products scale poorly over threads)")
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
    given = args.methods or ("all" if base is not REAL else ",".join(CLAIM_METHODS))
    methods = (ORIGINAL, *METHODS) if given == "all" else tuple(m.strip() for m in given.split(",") if m.strip())
    bad = [m for m in methods if m not in (ORIGINAL, *METHODS)]
    if bad or not methods:
        raise ValueError(f"unknown methods {bad}; choose from {', '.join((ORIGINAL, *METHODS))}")
    for k in ("steps", "eval_tokens", "seq_len", "calib_samples", "calib_tokens", "logit_windows", "train_steps",
              "draws", "expensive_draws", "spin_windows", "spin_batch"):
        if v[k] is not None and v[k] < (2 if k == "seq_len" else 1):
            raise ValueError(f"--{k.replace('_', '-')} must be positive (seq-len at least 2), got {v[k]}")
    columns = None if args.columns is None else tuple(c.strip() for c in args.columns.split(",") if c.strip())
    if columns is not None and (not columns or set(columns) - set(ALL_COLUMNS)):
        raise ValueError(f"unknown columns {sorted(set(columns) - set(ALL_COLUMNS))}; choose from "
                         f"{', '.join(ALL_COLUMNS)}")
    if v["eval_tokens"] < v["seq_len"] * v["logit_windows"]:
        raise ValueError(f"--eval-tokens {v['eval_tokens']} is less than --logit-windows x --seq-len")
    planted = PlantedLMSpec(hidden_size=v["hidden"], num_layers=v["layers"], num_heads=v["heads"],
                            steps=v["train_steps"], warmup=min(30, v["train_steps"] // 10), seed=args.seed,
                            seq_len=v["seq_len"])
    return Settings(model_dir, planted, args.text, methods, v["steps"], v["seq_len"], v["calib_samples"],
                    v["calib_tokens"], v["eval_tokens"], v["logit_windows"], v["spin_windows"], v["spin_batch"],
                    args.seed,
                    v["draws"], v["expensive_draws"], args.cache_dir,
                    not args.no_progress, columns)


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
                  *columns_for(prepared.model, settings.column_configs()))


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
    key = {k: v for k, v in dataclasses.asdict(settings).items()
           if k not in ("methods", "progress", "cache_dir", "columns")}
    key["columns"] = {name: {k: str(v) for k, v in c.items()} for name, c in settings.column_configs().items()}
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
    if args.threads < 0 or (args.jobs is not None and args.jobs < 1):
        raise ValueError(f"--threads must be >= 0 and --jobs >= 1, got {args.threads} and {args.jobs}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seeds is not None:
        raise ValueError("--seeds (W4 GPTQ repeated over calibration seeds) is replaced by --draws: every cell over "
                         "K draws of calibration and rotation seeds")
    settings = resolve(args)
    if args.jobs is None:
        args.jobs = min(2, os.cpu_count() or 1) if settings.model_dir is not None else 1
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


if __name__ == "__main__":
    sys.exit(main())
