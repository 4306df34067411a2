"""Paired bootstrap over evaluation windows: a confidence interval for a perplexity ratio.

Two models scored on the same ``n`` windows give per-window mean NLLs ``ref_nll`` and ``nll``
(:func:`orthoopt.eval.perplexity`, key ``"window_nll"``). With equal-length windows,

    ppl(model) / ppl(ref) = exp(mean(nll) - mean(ref_nll)) = exp(mean(d)),   d = nll - ref_nll.

The interval resamples the window indices with replacement (the same indices for both models: the
difference ``d`` is resampled, which is what "paired" means), takes the mean of ``d`` in each of
``resamples`` resamples, the 2.5 and 97.5 percentiles of those means (numpy's linear interpolation),
and exponentiates them. See docs/quantization.md, "Comparing models: paired bootstrap", for what the
interval assumes and what it does not cover.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from orthoopt.errors import InvalidInputError

CONFIDENCE = 0.95
"""Two-sided level of the interval (the ``ci95`` of ``orthoopt compare``)."""
PERCENTILES = (2.5, 97.5)
"""The percentiles of the resampled mean differences that bound the :data:`CONFIDENCE` interval."""

MIN_WINDOWS = 20
"""Fewest windows a paired bootstrap is computed on. The percentile interval of a mean undercovers
when the sample is small (it resamples the sample's own spread, narrower than the population's by
``sqrt((n - 1) / n)``, and ignores the t-distribution's heavier tails): simulated on independent
heavy-tailed (Student t, 5 d.o.f.) window differences, 2,000 experiments each, a nominal 95%
interval covers 84% at 5 windows, 91% at 10, 93% at 20 and 94% at 30. 20 is the smallest count at
which it stays within two points of its nominal level."""

DEFAULT_RESAMPLES = 10_000
"""Bootstrap resamples unless told otherwise (``orthoopt compare --resamples``)."""

_CHUNK_ELEMENTS = 1 << 22  # resampled indices drawn at once (32 MiB of int64), whatever the resamples


def check_positive_int(value, name: str) -> int:
    """``value`` as an int when it is a positive integer (not a bool); else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_seed(value, name: str = "seed") -> int:
    """``value`` as an int when it is a non-negative integer (numpy seeds); else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise InvalidInputError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def check_window_count(windows: int, seq_len: int | None = None) -> None:
    """Raise ValueError when ``windows`` is below :data:`MIN_WINDOWS`, saying why and what to change."""
    if windows < MIN_WINDOWS:
        of = f" of {seq_len} tokens" if seq_len is not None else ""
        raise InvalidInputError(
            f"{windows} evaluation window(s){of} are too few for a paired bootstrap interval: it needs at "
            f"least {MIN_WINDOWS} windows (below that a nominal 95% percentile interval covers the truth "
            "much less often than 95%); use a longer text, a larger max-tokens or a shorter seq-len"
        )


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class PairedInterval:
    """A paired-bootstrap interval of ``ppl(model) / ppl(ref)``, kept on the log scale.

    Attributes
    ----------
    mean_diff : float
        ``mean(nll - ref_nll)`` in nats per token: the log of the perplexity ratio.
    low_diff, high_diff : float
        The 2.5 and 97.5 percentiles of the resampled mean differences (nats).
    windows : int
        Number of paired windows.
    resamples : int
        Bootstrap resamples drawn.
    seed : int
        Seed of the ``numpy.random.default_rng`` generator that drew them.
    """

    mean_diff: float
    low_diff: float
    high_diff: float
    windows: int
    resamples: int
    seed: int

    @property
    def ratio(self) -> float:
        """``exp(mean_diff)``: the perplexity ratio (``inf`` past float64)."""
        return _exp(self.mean_diff)

    @property
    def ci95(self) -> tuple[float, float]:
        """``(exp(low_diff), exp(high_diff))``: the 95% interval of the ratio."""
        return _exp(self.low_diff), _exp(self.high_diff)

    @property
    def verdict(self) -> str:
        """``"lower"`` (the whole interval below 1), ``"higher"`` (above 1) or ``"not separated"``."""
        if self.high_diff < 0:
            return "lower"
        if self.low_diff > 0:
            return "higher"
        return "not separated"


def _as_windows(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise InvalidInputError(f"{name} must be a 1-D sequence of per-window NLLs, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise InvalidInputError(f"{name} has {bad.size} non-finite value(s) (first at window {bad[0]}: {arr[bad[0]]})")
    return arr


def paired_bootstrap(ref_nll, nll, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> PairedInterval:
    """Paired-bootstrap 95% interval of the perplexity ratio of two models scored on the same windows.

    Parameters
    ----------
    ref_nll, nll : sequence of float
        Per-window mean NLLs (nats) of the reference and of the model, the same windows in the same
        order (``perplexity(...)["window_nll"]``); equal lengths, finite, at least :data:`MIN_WINDOWS`.
    resamples : int
        Number of bootstrap resamples (positive).
    seed : int
        Seed of ``numpy.random.default_rng``; the same seed, window count and resamples give the same
        resampled indices, hence the same interval.

    Returns
    -------
    PairedInterval
        ``mean_diff = mean(nll - ref_nll)`` and the percentile interval of the resampled means;
        ``.ratio``, ``.ci95`` and ``.verdict`` give the ratio scale.

    Raises
    ------
    ValueError
        Different lengths, too few windows, non-finite values, a bad ``resamples`` or ``seed``.

    Notes
    -----
    Each resample draws ``n`` window indices uniformly with replacement and averages ``d = nll -
    ref_nll`` over them; the draws are vectorised in chunks of at most 2**22 indices (10,000
    resamples of a few hundred windows take a few tens of milliseconds). Identical inputs give
    ``d == 0`` exactly, hence ratio 1 and the interval ``[1, 1]``.
    """
    resamples = check_positive_int(resamples, "resamples")
    seed = check_seed(seed)
    ref = _as_windows(ref_nll, "ref_nll")
    other = _as_windows(nll, "nll")
    if ref.shape != other.shape:
        raise InvalidInputError(f"ref_nll and nll must cover the same windows, got {ref.size} and {other.size} values")
    n = ref.size
    check_window_count(n)
    diff = other - ref
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        means[start:stop] = diff[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.percentile(means, PERCENTILES)
    return PairedInterval(float(diff.mean()), float(low), float(high), n, resamples, seed)
