"""Measure the instrument: how W4 GPTQ perplexity spreads over draws, and how wide a comparison's
interval is, as the calibration and the evaluation grow.

    python benchmarks/instrument.py --jobs 2 --no-progress      # docs/instrument.md, SmolLM2-135M
    python benchmarks/instrument.py --quick --results /tmp/i.md  # smoke test, tiny planted model

Two methods, the comparison the results page talks about: OptRot and random Hadamard (R1 and R2,
:func:`orthoopt.pipeline.rotate_model`, each with its default solver and steps), each quantized W4 GPTQ
per output channel. A **draw** ``d`` uses seed ``--seed + d`` for the random rotation (Hadamard's random
signs, OptRot's Hadamard start) and for GPTQ's calibration windows, the same seed for both methods, so
draws are paired. Every draw is quantized once per calibration setting of ``--calib`` (``NxL``: N random
windows of L tokens from the first half of the text) and scored on the evaluation windows of 256 tokens
(``--seq-len``) of the second half, in text order: all of them (the whole second half) for the first
calibration setting, the first ``--eval-windows`` for the others (where the evaluation size is held).

Reported, from the per-window NLLs alone (nothing is re-run to render):

- per method and calibration setting, the perplexity over draws (mean, standard deviation, range);
- per calibration setting, the OptRot / Hadamard ratio with the two-level bootstrap interval
  (:func:`orthoopt.eval.draws_interval`, draws and windows resampled) and the mean window-only interval
  of one draw (:func:`orthoopt.eval.paired_bootstrap`);
- per method, every pair of calibration settings against each other with the same interval (draws
  paired by seed: the same rotation, other calibration windows);
- for the first calibration setting, the same at evaluation sizes from 16 windows (4k tokens) to the
  whole second half;
- a variance decomposition of the per-draw log ratio into a between-draw part and a window part, and
  from it the draws a reader needs for a 95% interval of half-width log(1.02) (a 2% difference).

Long work is resumable: each (method, draw, calibration) result is written to ``--record DIR`` as soon
as it is made (atomically) and a rerun with the same settings skips what is there. The page is
rendered from that record (``--render`` renders without running anything, under the header of the
run that last added to the record, kept in ``header.json`` beside the units). One torch thread per
worker (``--threads``); ``--jobs`` runs (method, draw) units in parallel processes, OptRot first.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import DEFAULT_TEXT, random_windows, split_halves, token_ids  # noqa: E402
from _models import PlantedLMSpec, load_or_train_planted, load_shared  # noqa: E402

from orthoopt.models.registry import cached_model  # noqa: E402
from orthoopt.eval import MIN_WINDOWS, draws_interval, paired_bootstrap, perplexity  # noqa: E402
from orthoopt.config import RotateConfig  # noqa: E402
from orthoopt.pipeline import rotate_model  # noqa: E402
from orthoopt.quant import quantize_model  # noqa: E402
from orthoopt.quant.config import QuantizeConfig  # noqa: E402
from orthoopt.utils.atomic import atomic_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(__file__).resolve().parent / ".cache"
METHODS = ("optrot", "hadamard")
REFERENCE = "hadamard"
TARGET = 0.02
"""The difference the page asks about: how many draws separate a 2% perplexity ratio."""
EVAL_SIZES = (16, 32, 64, 128, 256)
"""Evaluation sizes (windows) of the evaluation-size table, besides all windows."""


@dataclass(frozen=True)
class Settings:
    """One run (the flags, resolved)."""

    model: str                      # registered name, folder, or "planted"
    text: Path
    calib: tuple[tuple[int, int], ...]  # (windows, tokens per window); the first gets the whole eval half
    seq_len: int                    # evaluation window length
    eval_windows: int               # windows evaluated for every calibration setting but the first
    max_eval_windows: int | None    # cap on the first setting's windows (None: the whole second half)
    draws: int
    seed: int
    steps: int | None               # solver steps per phase (None: each method's default)
    threads: int
    progress: bool

    def key(self) -> str:
        """What a record's results depend on (a rerun with another key starts a new record)."""
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items()
                           if k not in ("threads", "progress", "draws", "calib")}, default=str, sort_keys=True)


HEADER_FILE = "header.json"
"""The record's account of the run that last added to it (command, date, code, wall time, machine),
which ``--render`` shows instead of its own."""


def parse_calib(spec: str) -> tuple[tuple[int, int], ...]:
    out = []
    for item in spec.split(","):
        try:
            n, length = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--calib {spec!r}: each item is WINDOWSxTOKENS, e.g. 16x256") from None
        if n < 1 or length < 2:
            raise ValueError(f"--calib {item}: windows must be >= 1 and tokens >= 2")
        out.append((n, length))
    return tuple(out)


def calib_name(c: tuple[int, int]) -> str:
    return f"{c[0]}x{c[1]}"


# ------------------------------------------------------------------------------------------------ run
def load(settings: Settings):
    """``(model, eval_ids, calib_ids, description)``."""
    split = split_halves(settings.text)
    if settings.model == "planted":
        spec = PlantedLMSpec(hidden_size=64, num_layers=2, num_heads=2, steps=20, warmup=2, seq_len=64)
        prepared = load_or_train_planted(spec, split.calib, split.sha256, CACHE_DIR, progress=settings.progress)
    else:
        folder = cached_model(settings.model) or Path(settings.model)
        if not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(f"{settings.model}: not fetched (orthoopt fetch {settings.model}) nor a model folder")
        prepared = load_shared(Path(folder))
    tok = prepared.tokenizer
    return prepared.model, token_ids(split.eval, tok), token_ids(split.calib, tok), prepared.description


def unit_path(record: Path, method: str, seed: int, calib: tuple[int, int]) -> Path:
    return record / f"{method}-seed{seed}-{calib_name(calib)}.json"


def run_unit(settings: Settings, record: Path, method: str, seed: int, state: dict) -> None:
    """Rotate a copy of the model with ``method`` and ``seed``, then quantize and score it once per
    calibration setting whose result is not yet in ``record``."""
    todo = [c for c in settings.calib if not unit_path(record, method, seed, c).exists()]
    if not todo:
        return
    model, eval_ids, calib_ids = state["model"], state["eval_ids"], state["calib_ids"]
    rotated = copy.deepcopy(model)
    start = time.perf_counter()
    rotate_model(rotated, RotateConfig(method, seed=seed, solve={"steps": settings.steps}), progress=settings.progress)
    rotation_seconds = time.perf_counter() - start
    all_windows = eval_ids.numel() // settings.seq_len
    for c in todo:
        windows = random_windows(calib_ids, c[0], c[1], seed=seed)
        q_model = copy.deepcopy(rotated)
        start = time.perf_counter()
        q = quantize_model(q_model, QuantizeConfig("gptq", wbits=4), calib=windows, progress=settings.progress)
        gptq_seconds = time.perf_counter() - start
        n = all_windows if c == settings.calib[0] else settings.eval_windows
        if c == settings.calib[0] and settings.max_eval_windows:
            n = min(n, settings.max_eval_windows)
        start = time.perf_counter()
        ppl = perplexity(q_model, eval_ids, seq_len=settings.seq_len, max_tokens=n * settings.seq_len,
                         progress=settings.progress)
        eval_seconds = time.perf_counter() - start
        q.hooks.remove()
        row = {"method": method, "seed": seed, "calib": list(c), "ppl": ppl["ppl"], "window_nll": ppl["window_nll"],
               "rotation_seconds": rotation_seconds, "gptq_seconds": gptq_seconds, "eval_seconds": eval_seconds,
               "key": settings.key()}
        with atomic_file(unit_path(record, method, seed, c)) as f:
            f.write(json.dumps(row))
        log(f"{method} seed {seed} calib {calib_name(c)}: ppl {ppl['ppl']:.4f} over {len(ppl['window_nll'])} windows "
            f"(rotate {rotation_seconds:.0f} s, gptq {gptq_seconds:.0f} s, eval {eval_seconds:.0f} s)")
        rotation_seconds = 0.0  # counted once per rotation


_WORKER: dict = {}


def _worker_init(settings: Settings) -> None:
    torch.set_num_threads(settings.threads)
    model, eval_ids, calib_ids, description = load(settings)
    _WORKER.update(model=model, eval_ids=eval_ids, calib_ids=calib_ids, description=description)


def _worker_unit(settings: Settings, record: Path, method: str, seed: int) -> None:
    run_unit(settings, record, method, seed, _WORKER)


def run_all(settings: Settings, record: Path, jobs: int) -> None:
    units = [(m, settings.seed + d) for m in METHODS for d in range(settings.draws)]
    if jobs <= 1:
        _worker_init(settings)
        for m, s in units:
            run_unit(settings, record, m, s, _WORKER)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(settings,)) as pool:
        for f in [pool.submit(_worker_unit, settings, record, m, s) for m, s in units]:
            f.result()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ analysis
def read_record(record: Path, key: str | None = None) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(record.glob("*.json")) if p.name != HEADER_FILE]
    if key is not None:
        stale = [r for r in rows if r["key"] != key]
        if stale:
            raise ValueError(f"{record} holds {len(stale)} result(s) made with other settings; "
                             "pass another --record or remove it")
    return rows


def paired_seeds(rows: list[dict], calib: tuple[int, int]) -> list[int]:
    """The draw seeds both methods have for ``calib`` (draws are paired by seed)."""
    have = [{r["seed"] for r in rows if r["method"] == m and tuple(r["calib"]) == calib} for m in METHODS]
    return sorted(set.intersection(*have))


def nll_matrix(rows: list[dict], method: str, calib: tuple[int, int], windows: int | None = None) -> np.ndarray:
    """``[draws, windows]`` per-window NLLs of one method and calibration over the paired draws
    (:func:`paired_seeds`), in seed order, the first ``windows`` windows (all the draws share when None)."""
    seeds = paired_seeds(rows, calib)
    sel = sorted((r for r in rows if r["method"] == method and tuple(r["calib"]) == calib and r["seed"] in seeds),
                 key=lambda r: r["seed"])
    n = min(len(r["window_nll"]) for r in sel) if windows is None else windows
    return np.array([r["window_nll"][:n] for r in sel], dtype=np.float64)


def decompose(ref: np.ndarray, other: np.ndarray) -> dict:
    """Two-way random-effects split of the per-window log ratio ``diff[k, w] = other - ref`` (draw
    ``k``, window ``w``): ``diff = mu + a_k + b_w + e_kw`` with variances ``draw_var`` (between draws),
    ``window_var`` (between windows, shared by every draw: one text) and ``residual_var`` (the
    draw-by-window interaction), from the ANOVA mean squares (a negative estimate is set to 0).
    The variance of the grand mean over ``K`` draws and ``n`` windows is then
    ``draw_var / K + window_var / n + residual_var / (K n)``. With one draw ``draw_var`` is NaN and
    ``window_var`` holds the whole per-window variance."""
    diff = other - ref
    k, n = diff.shape
    m = diff.mean()
    rows, cols = diff.mean(axis=1), diff.mean(axis=0)
    if k == 1:
        return {"draws": 1, "windows": n, "mean": float(m), "draw_var": float("nan"),
                "window_var": float(diff.var(ddof=1)), "residual_var": 0.0}
    ms_rows = n * float(((rows - m) ** 2).sum()) / (k - 1)
    ms_cols = k * float(((cols - m) ** 2).sum()) / (n - 1)
    ms_err = float(((diff - rows[:, None] - cols[None, :] + m) ** 2).sum()) / ((k - 1) * (n - 1))
    return {"draws": k, "windows": n, "mean": float(m), "draw_var": max(0.0, (ms_rows - ms_err) / n),
            "window_var": max(0.0, (ms_cols - ms_err) / k), "residual_var": ms_err}


def half_width(parts: dict, draws: int, windows: int) -> float:
    """Normal 95% half-width of the log ratio over ``draws`` paired draws scored on ``windows`` windows."""
    return 1.96 * math.sqrt(parts["draw_var"] / draws + parts["window_var"] / windows
                            + parts["residual_var"] / (draws * windows))


def draws_needed(parts: dict, windows: int, target: float = TARGET, most: int = 1000) -> int | None:
    """The fewest paired draws whose 95% half-width (:func:`half_width`) is at most ``log(1 + target)``
    at ``windows`` evaluation windows; None when not even ``most`` draws are enough (the window part,
    shared by all draws, does not shrink with more draws) or the draw variance is unknown (one draw)."""
    if not math.isfinite(parts["draw_var"]):
        return None
    goal = math.log1p(target)
    for k in range(1, most + 1):
        if half_width(parts, k, windows) <= goal:
            return k
    return None


def fmt_ci(iv) -> str:
    lo, hi = iv.ci95
    return f"{iv.ratio:.4f} [{lo:.4f}, {hi:.4f}]"


def render(settings: Settings, rows: list[dict], header: dict) -> str:
    calib = [c for c in settings.calib if paired_seeds(rows, c)]
    out = ["# Measuring the instrument", "",
           "Written by `benchmarks/instrument.py`; rerun it rather than editing the tables by hand.", "",
           "```", header["command"], "```", "",
           f"- date: {header['date']}; code: {header['code']}; wall time of the run that completed the record: "
           f"{header['wall']}",
           f"- {header['machine']}",
           f"- model: {header['model']}",
           f"- text: `{settings.text.name}`: calibration windows from the first half, evaluation windows of "
           f"{settings.seq_len} tokens of the second half in text order",
           "- methods: OptRot and random Hadamard (R1, R2; default solver and steps), each W4 GPTQ per output "
           "channel (damp 0.01, no act-order)",
           f"- draws: seeds {settings.seed}..{settings.seed + settings.draws - 1}; draw d uses one seed for the "
           "random rotation (Hadamard signs, OptRot's start) and for GPTQ's calibration windows, the same for both "
           "methods (paired)",
           "- intervals: two-level bootstrap over draws and windows (`orthoopt.eval.draws_interval`, 10,000 "
           "resamples, seed 0), docs/quantization.md \"Comparing methods over draws\"", ""]

    out += ["## Perplexity over draws, by calibration", "",
            f"Every calibration setting scored on the first {settings.eval_windows} evaluation windows "
            f"({settings.eval_windows * settings.seq_len} tokens).", "",
            "| calibration | tokens | method | draws | mean ppl | sd | min - max | GPTQ s (mean) |",
            "|---|---:|---|---:|---:|---:|---|---:|"]
    for c in [c for c in settings.calib if any(tuple(r["calib"]) == c for r in rows)]:  # unpaired rows too
        for m in METHODS:
            sel = [r for r in rows if r["method"] == m and tuple(r["calib"]) == c]
            if not sel:
                continue
            ppls = [math.exp(float(np.mean(r["window_nll"][: settings.eval_windows]))) for r in sel]
            sd = float(np.std(ppls, ddof=1)) if len(ppls) > 1 else float("nan")
            out.append(f"| {calib_name(c)} | {c[0] * c[1]} | {m} | {len(ppls)} | {np.mean(ppls):.3f} | {sd:.3f} | "
                       f"{min(ppls):.3f} - {max(ppls):.3f} | {np.mean([r['gptq_seconds'] for r in sel]):.0f} |")

    out += ["", "## OptRot / Hadamard, by calibration", "",
            "Ratio `ppl(OptRot) / ppl(Hadamard)` with its 95% interval; `one draw`: the mean over draws of the "
            "window-only interval's width (what one pair of models would claim); `draw sd`: the between-draw "
            "standard deviation of the log ratio beyond window noise.", "",
            "| calibration | draws | ratio [95% over draws and windows] | width | one draw: width | draw sd | verdict |",
            "|---|---:|---|---:|---:|---:|---|"]
    for c in calib:
        ref, oth = (nll_matrix(rows, m, c, settings.eval_windows) for m in (REFERENCE, "optrot"))
        if ref.shape != oth.shape or ref.shape[0] < 1:
            continue
        iv = draws_interval(ref, oth)
        one = np.mean([np.subtract(*paired_bootstrap(ref[k], oth[k]).ci95[::-1]) for k in range(ref.shape[0])])
        parts = decompose(ref, oth)
        out.append(f"| {calib_name(c)} | {ref.shape[0]} | {fmt_ci(iv)} | {iv.ci95[1] - iv.ci95[0]:.4f} | {one:.4f} | "
                   f"{math.sqrt(parts['draw_var']):.4f} | {iv.verdict} |")

    out += ["", "## Calibration against calibration, per method", "",
            "Ratio `ppl(second) / ppl(first)` of one method quantized with two calibration settings, on the same "
            f"{settings.eval_windows} windows; draws paired by seed (the same rotation, other calibration windows).", "",
            "| method | first | second | ratio [95% over draws and windows] | verdict |",
            "|---|---|---|---|---|"]
    for m in METHODS:
        for i, a in enumerate(calib):
            for b in calib[i + 1:]:
                first, second = (nll_matrix(rows, m, c, settings.eval_windows) for c in (a, b))
                if first.shape != second.shape:  # settings with different paired seeds
                    continue
                iv = draws_interval(first, second)
                out.append(f"| {m} | {calib_name(a)} | {calib_name(b)} | {fmt_ci(iv)} | {iv.verdict} |")

    c0 = calib[0] if calib else None
    if c0 is not None:
        full = nll_matrix(rows, REFERENCE, c0).shape[1]
        sizes = [n for n in EVAL_SIZES if n < full] + [full]
        out += ["", f"## By evaluation size (calibration {calib_name(c0)})", "",
                "| windows | tokens | Hadamard ppl sd over draws | OptRot ppl sd | ratio [95%] | width | one draw: width "
                "| draws for 2% |",
                "|---:|---:|---:|---:|---|---:|---:|---:|"]
        for n in sizes:
            ref, oth = (nll_matrix(rows, m, c0, n) for m in (REFERENCE, "optrot"))
            sds = [float(np.std(np.exp(x.mean(axis=1)), ddof=1)) if x.shape[0] > 1 else float("nan") for x in (ref, oth)]
            k = draws_needed(decompose(ref, oth), n)
            if n < MIN_WINDOWS:
                out.append(f"| {n} | {n * settings.seq_len} | {sds[0]:.3f} | {sds[1]:.3f} | no interval: fewer than "
                           f"{MIN_WINDOWS} windows | - | - | {'-' if k is None else k} |")
                continue
            iv = draws_interval(ref, oth)
            one = np.mean([np.subtract(*paired_bootstrap(ref[k], oth[k]).ci95[::-1]) for k in range(ref.shape[0])])
            out.append(f"| {n} | {n * settings.seq_len} | {sds[0]:.3f} | {sds[1]:.3f} | {fmt_ci(iv)} | "
                       f"{iv.ci95[1] - iv.ci95[0]:.4f} | {one:.4f} | {'-' if k is None else k} |")
        parts = decompose(*(nll_matrix(rows, m, c0) for m in (REFERENCE, "optrot")))
        sd = {key: math.sqrt(parts[key]) for key in ("draw_var", "window_var", "residual_var")}
        out += ["", f"Split of the per-window log ratio at {calib_name(c0)} over {parts['draws']} draws and "
                f"{parts['windows']} windows (two-way random effects, ANOVA estimates): between draws sd "
                f"{sd['draw_var']:.4f}, between windows sd {sd['window_var']:.4f}, draw-by-window sd "
                f"{sd['residual_var']:.4f}. The 95% half-width over K draws and n windows is "
                "`1.96 sqrt(draw_var/K + window_var/n + residual_var/(K n))`; `draws for 2%` is the smallest K "
                "with half-width at most log(1.02) at that evaluation size, `-` when no K is enough (the "
                "window part is shared by every draw: one text, so more draws do not shrink it)."]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="registered name or folder; 'planted' for the tiny model")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--calib", default="16x256,64x256,128x256,16x2048",
                   help="calibration settings WINDOWSxTOKENS, comma-separated; the first is scored on the whole "
                        "second half (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="evaluation window (default %(default)s)")
    p.add_argument("--eval-windows", type=int, default=64,
                   help="evaluation windows of every calibration setting but the first (default %(default)s)")
    p.add_argument("--max-eval-windows", type=int, default=None, help="cap on the first setting's windows")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="solver steps per phase (default: each method's)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--record", type=Path, default=None,
                   help="folder of per-unit results (default benchmarks/.cache/instrument-<model>)")
    p.add_argument("--results", type=Path, default=None, help="markdown page (default docs/instrument.md)")
    p.add_argument("--render", action="store_true", help="render the page from --record without running")
    p.add_argument("--quick", action="store_true", help="tiny planted model, 2 draws, small windows (smoke test)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def resolve(args) -> Settings:
    if args.quick:
        args.model, args.seq_len, args.eval_windows, args.steps = "planted", 32, 20, args.steps or 2
        args.calib = "4x32,8x64" if args.calib == parse_args([]).calib else args.calib
        args.max_eval_windows = args.max_eval_windows or 24
        args.draws = min(args.draws, 2)
    for name in ("seq_len", "eval_windows", "draws", "jobs", "threads"):
        if getattr(args, name) < (2 if name == "seq_len" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return Settings(args.model, args.text, parse_calib(args.calib), args.seq_len, args.eval_windows,
                    args.max_eval_windows, args.draws, args.seed, args.steps, args.threads, not args.no_progress)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = resolve(args)
    record = args.record or CACHE_DIR / f"instrument-{Path(settings.model).name}"
    record.mkdir(parents=True, exist_ok=True)
    results = args.results or (None if args.quick else REPO / "docs" / "instrument.md")
    start, load_start = time.perf_counter(), os.getloadavg()
    before = None if args.render else len(read_record(record, settings.key()))
    if not args.render:
        run_all(settings, record, args.jobs)
    rows = read_record(record, settings.key())
    wall = time.perf_counter() - start
    description = _WORKER.get("description") or load(settings)[3]  # loaded once when it ran here
    from _results_page import kept_findings  # noqa: E402
    from rotation_quality import code_version, machine_info  # noqa: E402

    header = {"command": "python benchmarks/instrument.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "code": code_version(),
              "wall": f"{wall / 60:.1f} min" if not args.render else "(rendered only)",
              "machine": "; ".join(line.removeprefix("- ") for line in machine_info(load_start, os.getloadavg(), args.jobs)),
              "model": description}
    header_file = record / HEADER_FILE
    if before is not None and len(rows) > before:  # the run's facts stay with its record, for later renders
        with atomic_file(header_file) as f:
            f.write(json.dumps(header, indent=2) + "\n")
    elif header_file.is_file():
        header = json.loads(header_file.read_text())
    page = render(settings, rows, header)
    print(page)
    if results is not None:
        findings = kept_findings(results)
        with atomic_file(results) as f:
            f.write(page + findings)
    log(f"wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
