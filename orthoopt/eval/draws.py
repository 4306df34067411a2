"""Two-level bootstrap over draws and windows: a 95% interval for a perplexity ratio of two *methods*.

A method (a rotation, then a quantization) is one random draw of how it was made: GPTQ's calibration
windows, the rotation's random start. Each of ``K`` draws of a method is scored on the same ``n``
evaluation windows, giving per-draw per-window mean NLLs ``[K, n]``. With equal-length windows the
ratio of the methods' geometric-mean perplexities over draws is

    exp(mean_k mean_w draws[k, w] - mean_k mean_w ref_draws[k, w]).

Each resample draws ``K`` draw indices with replacement and, independently, ``n`` window indices with
replacement (the same window indices for both methods and for every draw: the windows are one text,
shared by all of them), and averages over the resampled draws and windows; the 2.5 and 97.5
percentiles of the resampled means, exponentiated, are the interval. Draws are paired by index
(``paired=True``: draw ``k`` of both methods used the same seeds, so the same draw indices are taken
for both, as windows are) or resampled independently for each method (``paired=False``; their counts
may then differ). See docs/quantization.md, "Comparing methods over draws", for the assumptions.
"""

from __future__ import annotations

import numpy as np

from orthoopt.errors import InvalidInputError
from orthoopt.eval.bootstrap import (
    _CHUNK_ELEMENTS,
    DEFAULT_RESAMPLES,
    PERCENTILES,
    PairedInterval,
    check_positive_int,
    check_seed,
    check_window_count,
)


def _as_draws(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise InvalidInputError(f"{name} must be [draws, windows] per-window NLLs, got shape {arr.shape}")
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        k, w = bad[0]
        raise InvalidInputError(f"{name} has {len(bad)} non-finite value(s) (first at draw {k}, window {w})")
    return arr


def _draw_weights(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """``[rows, k]`` counts of each draw among ``k`` drawn with replacement, divided by ``k``."""
    if k == 1:  # nothing to resample: no random numbers used, so K=1 is the window bootstrap exactly
        return np.ones((rows, 1))
    picks = rng.integers(0, k, size=(rows, k))
    return (picks[:, :, None] == np.arange(k)).sum(axis=1) / k


def draws_interval(ref_draws, draws, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, *,
                   paired: bool = True) -> PairedInterval:
    """Two-level (draws, then windows) bootstrap 95% interval of the perplexity ratio of two methods.

    Parameters
    ----------
    ref_draws, draws : array_like
        Per-draw per-window mean NLLs (nats), ``[K_ref, n]`` and ``[K, n]`` (a 1-D array is one
        draw): the reference method and the other, every draw scored on the same ``n`` windows in the
        same order; finite, ``n`` at least :data:`orthoopt.eval.bootstrap.MIN_WINDOWS`.
    resamples : int
        Bootstrap resamples (positive).
    seed : int
        Seed of ``numpy.random.default_rng``.
    paired : bool
        Draw ``k`` of both methods shares its seeds (calibration windows, rotation start): resample
        the same draw indices for both (``K_ref == K`` required). False: resample each method's draws
        independently.

    Returns
    -------
    PairedInterval
        ``mean_diff`` is the difference of the grand means (nats), ``windows`` is ``n``;
        ``.ratio``, ``.ci95`` and ``.verdict`` as for
        :func:`orthoopt.eval.bootstrap.paired_bootstrap`.

    Raises
    ------
    ValueError
        Different window counts, too few windows, unequal draw counts when paired, non-finite values,
        a bad ``resamples`` or ``seed``.

    Notes
    -----
    With one draw of each method (paired or not) no draw is resampled and no random number is spent
    on draws: the result equals ``paired_bootstrap(ref_draws[0], draws[0], resamples, seed)`` exactly.
    Identical inputs give ratio 1 and the interval ``[1, 1]`` when paired.
    """
    resamples = check_positive_int(resamples, "resamples")
    seed = check_seed(seed)
    ref = _as_draws(ref_draws, "ref_draws")
    other = _as_draws(draws, "draws")
    if ref.shape[1] != other.shape[1]:
        raise InvalidInputError(f"ref_draws and draws must cover the same windows, got {ref.shape[1]} and "
                         f"{other.shape[1]} windows")
    if paired and ref.shape[0] != other.shape[0]:
        raise InvalidInputError(f"paired draws need the same number of draws, got {ref.shape[0]} and {other.shape[0]}")
    n = ref.shape[1]
    check_window_count(n)
    diff = other - ref if paired else None
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        windows = rng.integers(0, n, size=(stop - start, n))
        if paired:
            per_window = _draw_weights(rng, stop - start, diff.shape[0]) @ diff
        else:
            per_window = (_draw_weights(rng, stop - start, other.shape[0]) @ other
                          - _draw_weights(rng, stop - start, ref.shape[0]) @ ref)
        means[start:stop] = np.take_along_axis(per_window, windows, axis=1).mean(axis=1)
    low, high = np.percentile(means, PERCENTILES)
    mean_diff = (other - ref).mean() if other.shape == ref.shape else other.mean() - ref.mean()
    return PairedInterval(float(mean_diff), float(low), float(high), n, resamples, seed)
