"""Compare models on the same evaluation windows: perplexity ratios with paired-bootstrap intervals.

Every model is loaded as ``orthoopt eval`` loads it (:func:`orthoopt.quant.model.load_quantized`:
folders with quant.json get their activation / K-V hooks back, registered names, ``.gguf`` files,
``planted``, Hub ids), scored with :func:`orthoopt.eval.perplexity` on the windows of the
reference's tokenization of the text, and freed before the next one is loaded, so memory holds one
model at a time. Each model's per-window NLLs are paired with the reference's
(:func:`orthoopt.eval.bootstrap.paired_bootstrap`, the same seed for every model, hence the same
resampled windows).
"""

from __future__ import annotations

import gc
import math
import os
import sys

from orthoopt.errors import InvalidInputError
from orthoopt.eval.bootstrap import (
    CONFIDENCE,
    DEFAULT_RESAMPLES,
    check_positive_int,
    check_seed,
    check_window_count,
    paired_bootstrap,
)
from orthoopt.eval.perplexity import default_seq_len, perplexity
from orthoopt.quant.calib import tokenize_text
from orthoopt.quant.model import load_quantized


def _name(option: str, flags: bool) -> str:
    return "--" + option.replace("_", "-") if flags else option


def check_options(resamples, seed, seq_len=None, max_tokens=None, batch_size=1, *, flags: bool = False) -> None:
    """Raise ValueError naming the first bad setting of :func:`compare_models`.

    Parameters
    ----------
    resamples, seed, seq_len, max_tokens, batch_size
        As in :func:`compare_models` (``seq_len`` and ``max_tokens`` may be None).
    flags : bool
        Name the settings as command-line flags (``--max-tokens``) instead of parameters (``max_tokens``).
    """
    check_positive_int(resamples, _name("resamples", flags))
    check_seed(seed, _name("seed", flags))
    check_positive_int(batch_size, _name("batch_size", flags))
    if max_tokens is not None:
        check_positive_int(max_tokens, _name("max_tokens", flags))
    if seq_len is not None and check_positive_int(seq_len, _name("seq_len", flags)) < 2:
        raise InvalidInputError(f"{_name('seq_len', flags)} must be at least 2, got {seq_len}")


def _check_source(spec: str) -> None:
    """Fail at once on a model path that does not exist (before minutes of scoring the others)."""
    from orthoopt.models.registry import REGISTRY
    from orthoopt.models.sources import resolve_source

    if spec not in REGISTRY:  # registered names are fetched on load, as `orthoopt eval` does
        resolve_source(spec, fetch=False)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"compare: {message}", file=sys.stderr, flush=True)


def _score(spec: str, text: str, ref_ids, seq_len, max_tokens, batch_size, progress) -> tuple[dict, object]:
    """Load ``spec``, score it on the reference's windows (its own tokenization when ``ref_ids`` is
    None), free it; ``(perplexity result with "quant", the token ids used)``."""
    loaded = load_quantized(spec)
    try:
        ids = tokenize_text(text, loaded.tokenizer)
        if ref_ids is None:
            seq_len = default_seq_len(loaded.model) if seq_len is None else seq_len
            check_window_count(min(ids.numel(), max_tokens or ids.numel()) // seq_len, seq_len)
        else:
            used = ref_ids.numel()
            if ids.numel() < used or not bool((ids[:used] == ref_ids).all()):
                raise InvalidInputError(f"{spec} tokenizes the text differently from the reference: the windows would "
                                 "not be the same (compare models that share a tokenizer)")
            ids = ref_ids
        result = perplexity(loaded.model, ids, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                            progress=progress)
        result["quant"] = loaded.quant
    finally:
        if loaded.hooks is not None:
            loaded.hooks.remove()
        del loaded
        gc.collect()
    return result, ids[: result["windows"] * result["seq_len"]]


def compare_models(reference, models, text: str, *, seq_len: int | None = None, max_tokens: int | None = None,
                   batch_size: int = 1, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                   progress: bool = True) -> dict:
    """Perplexity of each model against a reference on the same windows, with a paired-bootstrap 95% interval.

    Parameters
    ----------
    reference : str or os.PathLike
        The reference model source (anything ``orthoopt eval`` accepts).
    models : sequence of str or os.PathLike
        The models to compare with it (at least one; the reference itself may be among them).
    text : str
        The evaluation text; tokenized by the reference's tokenizer and windowed as
        :func:`orthoopt.eval.perplexity` does (non-overlapping ``seq_len`` windows, tail dropped).
    seq_len : int, optional
        Window length (default: the reference's context, capped at 2048).
    max_tokens : int, optional
        Use only the first ``max_tokens`` tokens.
    batch_size : int
        Windows per forward pass.
    resamples : int
        Bootstrap resamples (default 10,000).
    seed : int
        Bootstrap seed, the same for every model.
    progress : bool
        Which model is being scored, and the perplexity bars, on stderr.

    Returns
    -------
    dict
        ``{"reference": {"model", "ppl", "nll", "quant", "window_nll"}, "windows", "seq_len", "tokens",
        "resamples", "seed", "confidence", "models": [{"model", "ppl", "nll", "ratio", "ci95",
        "verdict", "quant", "window_nll"}, ...]}``, strict-JSON ready (non-finite figures are None).
        ``ratio`` is ``exp(mean(window_nll) - mean(reference window_nll))``, which is
        ``ppl / reference ppl`` up to float32 summation rounding; ``ci95`` is ``[low, high]``;
        ``verdict`` is ``"lower"``, ``"higher"``, ``"not separated"`` (the interval contains 1) or
        ``"undefined"`` (the model's NLL is not finite on some window; ``ratio`` and ``ci95`` are None
        and ``error`` says why). The reference is not an entry of ``models`` unless it is passed there.

    Raises
    ------
    ValueError
        No model to compare, a bad setting, fewer than
        :data:`orthoopt.eval.bootstrap.MIN_WINDOWS` windows (refused before any model is scored), a
        model whose tokenizer gives other windows, a reference whose NLL is not finite.
    FileNotFoundError
        A model path that does not exist (checked for every model before any is loaded).
    """
    check_options(resamples, seed, seq_len, max_tokens, batch_size)
    specs = [os.fspath(reference), *(os.fspath(m) for m in models)]
    if len(specs) < 2:
        raise InvalidInputError("nothing to compare: give at least one model besides the reference")
    for spec in specs:
        _check_source(spec)
    _log(progress, f"[1/{len(specs)}] reference {specs[0]}")
    ref, ids = _score(specs[0], text, None, seq_len, max_tokens, batch_size, progress)
    if not all(math.isfinite(v) for v in ref["window_nll"]):
        raise InvalidInputError(f"the reference {specs[0]} has a non-finite NLL on this text: nothing to compare against")
    entries = []
    for i, spec in enumerate(specs[1:], start=2):
        _log(progress, f"[{i}/{len(specs)}] {spec}")
        result, _ = _score(spec, text, ids, ref["seq_len"], None, batch_size, progress)
        entries.append(_entry(spec, result, ref["window_nll"], resamples, seed))
    return {
        "reference": {"model": specs[0], "ppl": _finite(ref["ppl"]), "nll": ref["nll"], "quant": ref["quant"],
                      "window_nll": ref["window_nll"]},
        "windows": ref["windows"], "seq_len": ref["seq_len"], "tokens": ref["tokens"],
        "resamples": resamples, "seed": seed, "confidence": CONFIDENCE, "models": entries,
    }


def _entry(spec: str, result: dict, ref_nll: list[float], resamples: int, seed: int) -> dict:
    entry = {"model": spec, "ppl": _finite(result["ppl"]), "nll": _finite(result["nll"])}
    window_nll = [_finite(v) for v in result["window_nll"]]
    if None in window_nll:
        bad = window_nll.index(None)
        entry.update(ratio=None, ci95=None, verdict="undefined",
                     error=f"the NLL is not finite on window {bad} (logits overflow?): no ratio")
    else:
        interval = paired_bootstrap(ref_nll, window_nll, resamples, seed)
        entry.update(ratio=_finite(interval.ratio), ci95=[_finite(v) for v in interval.ci95],
                     verdict=interval.verdict)
    entry.update(quant=result["quant"], window_nll=window_nll)
    return entry
