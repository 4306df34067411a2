"""The two-level (draws, then windows) bootstrap of ``orthoopt.eval.draws`` on simulated data whose
truth is known (issue 21, item 3): coverage, width against the draw variance, K=1, pairing."""

from __future__ import annotations

import numpy as np
import pytest

from orthoopt.eval import MIN_WINDOWS, draws_interval, paired_bootstrap

TRUE_DIFF = 0.02  # nats: the methods' true log perplexity ratio in every simulation


def simulate(rng: np.random.Generator, draws: int, windows: int, draw_sd: float, window_sd: float,
             noise_sd: float = 0.02, shared_draw_sd: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(ref, other)`` of shape ``[draws, windows]``: a reference whose windows differ a lot (sd 1,
    the same for every draw) plus a draw effect shared by both methods (``shared_draw_sd``), and
    ``other = ref + TRUE_DIFF + a_k + b_w + e_kw`` with a draw effect ``a`` (``draw_sd``), a window
    effect of the difference ``b`` (``window_sd``) and interaction noise ``e`` (``noise_sd``)."""
    ref = 3.0 + rng.standard_normal(windows)[None] + shared_draw_sd * rng.standard_normal((draws, 1))
    a = draw_sd * rng.standard_normal((draws, 1))
    b = window_sd * rng.standard_normal(windows)[None]
    return ref, ref + TRUE_DIFF + a + b + noise_sd * rng.standard_normal((draws, windows))


def test_coverage_is_close_to_95_percent_on_two_level_data():
    """1,000 simulated experiments, 5 draws x 64 windows, draw and window effects of similar weight in
    the variance of the mean difference (93% measured). The window-only bootstrap of the draw-averaged windows
    misses the draw variance, and covers much less often: the simulation can tell them apart."""
    rng = np.random.default_rng(2026)
    two_level = window_only = 0
    experiments = 1000
    for e in range(experiments):
        ref, other = simulate(rng, draws=5, windows=64, draw_sd=0.03, window_sd=0.1)
        iv = draws_interval(ref, other, resamples=1000, seed=e)
        two_level += iv.low_diff <= TRUE_DIFF <= iv.high_diff
        naive = paired_bootstrap(ref.mean(axis=0), other.mean(axis=0), resamples=1000, seed=e)
        window_only += naive.low_diff <= TRUE_DIFF <= naive.high_diff
    assert 0.92 <= two_level / experiments <= 0.98, two_level
    assert window_only / experiments < 0.86, window_only  # 82% measured


def test_interval_widens_as_the_draw_variance_grows():
    base = np.random.default_rng(5)
    ref = 3.0 + base.standard_normal(40)[None].repeat(4, axis=0)
    window = 0.05 * base.standard_normal(40)[None]
    draw = base.standard_normal((4, 1))
    draw -= draw.mean()  # the same grand mean at every scale: only the spread over draws changes
    widths = []
    for scale in (0.0, 0.02, 0.05, 0.1):
        iv = draws_interval(ref, ref + TRUE_DIFF + window + scale * draw, resamples=4000, seed=1)
        assert iv.mean_diff == pytest.approx(TRUE_DIFF + float(window.mean()), abs=1e-12)
        widths.append(iv.high_diff - iv.low_diff)
    assert all(a < b for a, b in zip(widths, widths[1:])), widths
    assert widths[-1] > 3 * widths[0]


def test_one_draw_is_the_window_bootstrap_exactly():
    rng = np.random.default_rng(3)
    ref, other = simulate(rng, draws=1, windows=50, draw_sd=0.1, window_sd=0.05)
    window = paired_bootstrap(ref[0], other[0], resamples=3000, seed=7)
    assert draws_interval(ref, other, resamples=3000, seed=7) == window
    assert draws_interval(ref[0], other[0], resamples=3000, seed=7) == window  # 1-D: one draw
    assert draws_interval(ref, other, resamples=3000, seed=7, paired=False) == window
    assert draws_interval(ref, other, resamples=3000, seed=8) != window  # the seed is used


def test_identical_inputs_give_ratio_one():
    rng = np.random.default_rng(4)
    ref, _ = simulate(rng, draws=3, windows=30, draw_sd=0.0, window_sd=0.0, shared_draw_sd=0.1)
    ref = ref + 0.05 * rng.standard_normal(ref.shape)  # draws differ, windows differ
    same = draws_interval(ref, ref.copy(), resamples=500)
    assert (same.ratio, same.ci95, same.verdict) == (1.0, (1.0, 1.0), "not separated")
    unpaired = draws_interval(ref, ref.copy(), resamples=2000, paired=False)
    assert unpaired.ratio == 1.0 and unpaired.ci95[0] < 1.0 < unpaired.ci95[1]
    assert unpaired.verdict == "not separated"


def test_pairing_by_draw_removes_a_draw_effect_both_methods_share():
    """A draw effect common to both methods (the same calibration windows help both) cancels in the
    paired difference; resampling each method's draws independently counts it twice."""
    rng = np.random.default_rng(6)
    ref, other = simulate(rng, draws=6, windows=64, draw_sd=0.0, window_sd=0.01, shared_draw_sd=0.2)
    paired = draws_interval(ref, other, resamples=4000)
    unpaired = draws_interval(ref, other, resamples=4000, paired=False)
    assert paired.verdict == "higher" and paired.ci95[0] > 1
    assert unpaired.verdict == "not separated"
    assert (unpaired.high_diff - unpaired.low_diff) > 10 * (paired.high_diff - paired.low_diff)
    assert paired.mean_diff == pytest.approx(unpaired.mean_diff, abs=1e-12)
    # unpaired: the draw counts may differ
    three = draws_interval(ref[:3], other, resamples=500, paired=False)
    assert three.mean_diff == pytest.approx(other.mean() - ref[:3].mean(), abs=1e-12)


def test_bad_input_is_refused():
    ok = np.zeros((2, MIN_WINDOWS))
    with pytest.raises(ValueError, match="same number of draws"):
        draws_interval(ok, np.zeros((3, MIN_WINDOWS)))
    with pytest.raises(ValueError, match="same windows"):
        draws_interval(ok, np.zeros((2, MIN_WINDOWS + 1)))
    with pytest.raises(ValueError, match="at least 20 windows"):
        draws_interval(ok[:, 1:], ok[:, 1:])
    with pytest.raises(ValueError, match=r"non-finite.*draw 1, window 4"):
        draws_interval(ok, np.where((np.arange(2)[:, None] == 1) & (np.arange(MIN_WINDOWS) == 4), np.inf, 0.0))
    with pytest.raises(ValueError, match=r"\[draws, windows\]"):
        draws_interval(np.zeros((2, 2, MIN_WINDOWS)), ok)
    with pytest.raises(ValueError, match="resamples must be a positive integer"):
        draws_interval(ok, ok, resamples=0)
