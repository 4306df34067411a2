"""Diagnostics: weight and activation statistics (against direct float64 / scipy recomputation and
closed-form values) and the plots (real PNG/SVG files of the documented size, readable fonts)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure
from matplotlib.text import Text

from orthoopt.testing import planted_outlier_model
from orthoopt.diagnostics import (
    activation_stats,
    aggregate_blocks,
    aggregate_layers,
    block_stats,
    channel_max_abs,
    excess_kurtosis,
    group_of,
    incoherence,
    layer_of,
    massive_tokens,
    outlier_fraction,
    plot_activation_heatmap,
    plot_channel_magnitudes,
    plot_layer_bars,
    plot_solve_history,
    plot_weight_channels,
    plot_weight_histogram,
    rtn_error,
    save_figure,
    token_kurtosis,
    weight_stats,
)
from orthoopt.diagnostics.plots import DPI, channels, histogram, layer_bars, solve_curve
from orthoopt.diagnostics.report import (
    activation_report,
    calibration_tokens,
    input_roles,
    stored_weights,
    weight_report,
)
from orthoopt.hadamard import hadamard_matrix, random_hadamard
from orthoopt.objectives import WeightBlock


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64)


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    q, r = torch.linalg.qr(randn(n, n, seed=seed))
    return q * torch.sign(torch.diagonal(r))


# ---------------------------------------------------------------------------------------------
# weight statistics


@pytest.mark.parametrize("n", [4, 12, 64, 512])
def test_incoherence_of_hadamard_is_one(n):
    assert incoherence(hadamard_matrix(n, dtype=torch.float64)) == pytest.approx(1.0, abs=1e-12)
    assert incoherence(random_hadamard(n, seed=3)) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), data=st.data())
def test_incoherence_of_one_hot_is_sqrt_numel(rows, cols, data):
    i, j = data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, cols - 1))
    value = data.draw(st.floats(-1e3, 1e3).filter(lambda v: abs(v) > 1e-3))
    W = torch.zeros(rows, cols, dtype=torch.float64)
    W[i, j] = value
    assert incoherence(W) == pytest.approx(math.sqrt(rows * cols), rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3), sign=st.sampled_from([1.0, -1.0]))
def test_incoherence_and_kurtosis_are_scale_invariant(seed, scale, sign):
    W = randn(17, 9, seed=seed) ** 3  # heavy-tailed
    c = sign * scale
    assert incoherence(c * W) == pytest.approx(incoherence(W), rel=1e-10)
    assert excess_kurtosis(c * W) == pytest.approx(excess_kurtosis(W), rel=1e-9, abs=1e-9)
    assert outlier_fraction(c * W) == outlier_fraction(W)


def test_incoherence_bounds_and_direct_formula():
    W = randn(30, 20, seed=1)
    mu = incoherence(W)
    assert 1.0 <= mu <= math.sqrt(W.numel())
    assert mu == pytest.approx(W.abs().max().item() * math.sqrt(600) / torch.linalg.norm(W).item(), rel=1e-14)


def test_excess_kurtosis_of_known_distributions():
    g = np.random.default_rng(0)
    n = 400_000  # std of the Gaussian estimate ~ sqrt(24 / n) = 0.008
    assert excess_kurtosis(torch.from_numpy(g.standard_normal(n))) == pytest.approx(0.0, abs=0.05)
    assert excess_kurtosis(torch.from_numpy(g.uniform(-1, 1, n))) == pytest.approx(-1.2, abs=0.02)
    assert excess_kurtosis(torch.from_numpy(g.laplace(size=n))) == pytest.approx(3.0, abs=0.3)


def test_excess_kurtosis_matches_scipy_population_estimator():
    x = randn(50, 7, seed=2) ** 3 + 0.5
    want = scipy.stats.kurtosis(x.numpy().ravel(), fisher=True, bias=True)
    assert excess_kurtosis(x) == pytest.approx(want, rel=1e-12)


def test_outlier_fraction_counts_entries_beyond_k_std():
    x = randn(200, 50, seed=4)
    a = x.numpy().ravel()
    for k in (1.0, 2.5, 3.0):
        want = np.mean(np.abs(a - a.mean()) > k * a.std())
        assert outlier_fraction(x, k) == pytest.approx(want, abs=1e-15)
    g = np.random.default_rng(1)  # Gaussian reference 2 * (1 - Phi(3)) = 0.0027
    big = torch.from_numpy(g.standard_normal(1_000_000))
    assert outlier_fraction(big, 3.0) == pytest.approx(2 * scipy.stats.norm.sf(3.0), abs=3e-4)


def test_rtn_error_matches_independent_per_row_rounding():
    W = randn(16, 40, seed=5) ** 3
    for bits in (2, 3, 4, 8):
        qmax = 2 ** (bits - 1) - 1
        a = W.numpy()
        scale = np.abs(a).max(axis=1, keepdims=True) / qmax
        q = np.clip(np.round(a / scale), -qmax, qmax) * scale
        want = np.linalg.norm(a - q) / np.linalg.norm(a)
        assert rtn_error(W, bits) == pytest.approx(want, rel=1e-12)
    errors = [rtn_error(W, b) for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > 0


def test_rtn_error_is_zero_on_the_grid():
    codes = torch.randint(-7, 8, (8, 32), generator=gen(6)).double()
    codes[:, 0] = 7  # the row max sits on the top code, so the scale is the row's step
    W = codes * torch.linspace(0.1, 2.0, 8, dtype=torch.float64)[:, None]
    assert rtn_error(W, 4) == pytest.approx(0.0, abs=1e-15)


def test_weight_stats_agree_with_the_single_statistics():
    W = (randn(24, 36, seed=7) ** 3).float()
    s = weight_stats(W, k=2.0, bits=3)
    W64 = W.double()
    assert s["shape"] == [24, 36] and s["numel"] == 864
    assert s["max_abs"] == W64.abs().max().item()
    assert s["frobenius_norm"] == pytest.approx(torch.linalg.norm(W64).item(), rel=1e-14)
    assert s["incoherence"] == pytest.approx(incoherence(W), rel=1e-14)
    assert s["excess_kurtosis"] == pytest.approx(excess_kurtosis(W), rel=1e-12)
    assert s["fourth_power_sum"] == pytest.approx(W64.pow(4).sum().item(), rel=1e-13)
    assert s["outlier_fraction"] == outlier_fraction(W, 2.0)
    assert s["rtn_error"] == pytest.approx(rtn_error(W, 3), rel=1e-14)
    assert (s["outlier_k"], s["rtn_bits"]) == (2.0, 3)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3), "2-D"),
    (torch.zeros(0, 4), "no entries"),
    (torch.zeros(3, 4), "all-zero"),
    (torch.full((3, 4), 2.0), "all entries are equal"),
])
def test_weight_stats_reject_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        weight_stats(bad)


def test_bad_parameters_raise():
    W = randn(4, 4)
    with pytest.raises(ValueError, match="positive"):
        outlier_fraction(W, 0.0)
    with pytest.raises(ValueError, match="bits"):
        rtn_error(W, 1)
    with pytest.raises(ValueError, match="torch.Tensor"):
        incoherence(np.ones((2, 2)))


def test_block_stats_rotate_by_side():
    W = randn(12, 8, seed=8) ** 3
    R_in, R_out = random_orthogonal(8, 1), random_orthogonal(12, 2)
    s_in = block_stats(WeightBlock(W, "R1", "in", "layers.0.mlp.up_proj"), R_in)
    assert s_in["incoherence"] == pytest.approx(incoherence(W @ R_in), rel=1e-12)
    assert s_in["rtn_error"] == pytest.approx(rtn_error(W @ R_in), rel=1e-12)
    s_out = block_stats(WeightBlock(W, "R1", "out", "layers.0.mlp.down_proj"), {"R1": R_out})
    assert s_out["incoherence"] == pytest.approx(incoherence(R_out.T @ W), rel=1e-12)
    assert s_out["rtn_error"] == pytest.approx(rtn_error(R_out.T @ W), rel=1e-12)
    assert (s_out["name"], s_out["rotation"], s_out["side"]) == ("layers.0.mlp.down_proj", "R1", "out")
    plain = block_stats(WeightBlock(W, "R1", "in"))
    assert plain["incoherence"] == incoherence(W)
    # entrywise statistics do not depend on the side, only on the rotated matrix
    assert block_stats(WeightBlock(W, "R1", "out"), torch.eye(12, dtype=torch.float64))["max_abs"] == plain["max_abs"]


def test_block_stats_reject_wrong_rotation():
    block = WeightBlock(randn(6, 4), "R2.0", "in", "x")
    with pytest.raises(ValueError, match="size 4"):
        block_stats(block, torch.eye(6))
    with pytest.raises(ValueError, match="R2.0"):
        block_stats(block, {"R1": torch.eye(4)})


def test_hadamard_rotation_flattens_a_planted_outlier_column():
    W = randn(64, 64, seed=9)
    W[:, 5] *= 50.0
    H = random_hadamard(64, seed=1)
    before = block_stats(WeightBlock(W, "R1", "in"))
    after = block_stats(WeightBlock(W, "R1", "in"), H)
    assert after["incoherence"] < before["incoherence"] / 3
    assert after["excess_kurtosis"] < before["excess_kurtosis"]
    assert after["rtn_error"] < before["rtn_error"]
    assert after["frobenius_norm"] == pytest.approx(before["frobenius_norm"], rel=1e-12)


@pytest.mark.parametrize("name, layer, group", [
    ("layers.3.self_attn.q_proj", 3, "layers.3"),
    ("model.layers.12.mlp.down_proj", 12, "layers.12"),
    ("layers.0.self_attn.v_proj.head2", 0, "layers.0"),
    ("embed_tokens", None, "embed_tokens"),
    ("model.embed_tokens", None, "embed_tokens"),
    ("lm_head", None, "lm_head"),
    ("mylayers.3.x", None, "mylayers.3.x"),
])
def test_layer_parsing(name, layer, group):
    assert layer_of(name) == layer
    assert group_of(name) == group


def test_aggregate_layers_pools_exactly():
    weights = {
        "embed_tokens": randn(20, 8, seed=1),
        "layers.0.self_attn.q_proj": randn(8, 8, seed=2) ** 3,
        "layers.0.mlp.down_proj": 5 * randn(8, 16, seed=3),
        "layers.1.self_attn.q_proj": randn(8, 8, seed=4),
        "lm_head": randn(20, 8, seed=5),
    }
    rows = weight_report(weights, k=2.0, progress=False)["blocks"]
    layers = aggregate_layers(rows)
    assert [r["group"] for r in layers] == ["embed_tokens", "layers.0", "layers.1", "lm_head"]
    assert [r["layer"] for r in layers] == [None, 0, 1, None]
    l0 = layers[1]
    A, B = weights["layers.0.self_attn.q_proj"], weights["layers.0.mlp.down_proj"]
    assert l0["blocks"] == ["layers.0.self_attn.q_proj", "layers.0.mlp.down_proj"]
    assert l0["numel"] == A.numel() + B.numel()
    assert l0["max_abs"] == max(A.abs().max().item(), B.abs().max().item())
    assert l0["fourth_power_sum"] == pytest.approx((A.pow(4).sum() + B.pow(4).sum()).item(), rel=1e-13)
    err2 = sum((rtn_error(M) * torch.linalg.norm(M).item()) ** 2 for M in (A, B))
    assert l0["rtn_error"] == pytest.approx(math.sqrt(err2 / (A.square().sum() + B.square().sum()).item()), rel=1e-12)
    count = sum(outlier_fraction(M, 2.0) * M.numel() for M in (A, B))
    assert l0["outlier_fraction"] == pytest.approx(count / l0["numel"], rel=1e-14)
    assert l0["incoherence_max"] == pytest.approx(max(incoherence(A), incoherence(B)), rel=1e-14)
    assert l0["incoherence_mean"] == pytest.approx((incoherence(A) + incoherence(B)) / 2, rel=1e-14)
    assert l0["excess_kurtosis_max"] == pytest.approx(max(excess_kurtosis(A), excess_kurtosis(B)), rel=1e-12)
    everything = aggregate_blocks(rows)
    assert everything["numel"] == sum(w.numel() for w in weights.values())
    assert everything["blocks"] == list(weights)


@pytest.mark.parametrize("tied", [False, True])
def test_stored_weights_are_the_parameters_as_stored(tied):
    model = planted_outlier_model(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                                  tie_word_embeddings=tied)
    weights = stored_weights(model)
    layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    want = ["embed_tokens"] + [f"layers.{i}.{m}" for i in range(2) for m in layer] + ([] if tied else ["lm_head"])
    assert list(weights) == want
    assert weights["layers.1.mlp.down_proj"].data_ptr() == model.model.layers[1].mlp.down_proj.weight.data_ptr()
    roles = input_roles(model)
    assert roles["layers.0.self_attn.k_proj"] == "attn_in" and roles["layers.1.mlp.up_proj"] == "mlp_in"
    assert roles["layers.1.self_attn.o_proj"] == "attn_out" and roles["layers.0.mlp.down_proj"] == "mlp_hidden"
    assert roles["lm_head"] == "head_in" and len(roles) == 2 * 7 + 1


class _TwentyCharsPerToken:
    """A stand-in tokenizer: one token (its character offset) per 20 characters."""

    def __call__(self, text, return_tensors=None, verbose=False):
        return {"input_ids": torch.arange(0, len(text), 20).reshape(1, -1)}


def test_calibration_tokens_take_the_first_tokens_of_the_whole_text(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text("abcdefghij" * 1000)  # 10000 characters -> 500 tokens
    ids = calibration_tokens(f, _TwentyCharsPerToken(), 400)  # the 8x prefix holds only 164 tokens
    assert torch.equal(ids, torch.arange(0, 8000, 20))
    assert calibration_tokens(f, _TwentyCharsPerToken(), 10).tolist() == list(range(0, 200, 20))
    assert calibration_tokens(f, _TwentyCharsPerToken(), 10_000).numel() == 500  # fewer than asked: all
    with pytest.raises(ValueError, match=">= 1"):
        calibration_tokens(f, _TwentyCharsPerToken(), 0)


# ---------------------------------------------------------------------------------------------
# activation statistics


def test_channel_magnitude_and_token_kurtosis_match_direct_computation():
    X = (randn(64, 32, seed=10) ** 3).float()
    assert torch.equal(channel_max_abs(X), X.double().abs().amax(0))
    want = scipy.stats.kurtosis(X.double().numpy(), axis=1, fisher=True, bias=True)
    np.testing.assert_allclose(token_kurtosis(X).numpy(), want, rtol=1e-10)


def test_massive_tokens_finds_planted_tokens():
    X = randn(100, 48, seed=11)
    X[17, 3] = 500.0
    X[5, 40] = -900.0
    X[60, 0] = 30.0  # large but below 100 x median|x| (~67)
    m = massive_tokens(X, ratio=100.0, top=5)
    median = np.median(np.abs(X.numpy()))
    assert m["median_abs"] == pytest.approx(median, rel=1e-15)
    assert m["threshold"] == pytest.approx(100 * median, rel=1e-15)
    assert m["count"] == 2
    assert m["tokens"] == [{"token": 5, "channel": 40, "max_abs": 900.0}, {"token": 17, "channel": 3, "max_abs": 500.0}]
    assert massive_tokens(X, ratio=100.0, min_abs=600.0)["count"] == 1
    assert massive_tokens(X, ratio=10.0)["count"] >= 3
    assert massive_tokens(X, top=1)["tokens"][0]["token"] == 5


def test_activation_stats_summary():
    X = randn(128, 16, seed=12)
    X[:, 7] *= 40.0  # an outlier channel
    X[3] = 2.0  # a constant token row: its kurtosis is undefined and skipped
    s = activation_stats(X, top=3)
    cmax = X.abs().amax(0)
    assert s["tokens"] == 128 and s["channels"] == 16
    assert s["max_abs"] == cmax.max().item()
    assert s["channel_max_abs"] == cmax.tolist()
    assert s["top_channels"][0]["channel"] == 7 and len(s["top_channels"]) == 3
    assert s["channel_max_ratio"] == pytest.approx(cmax.max().item() / np.median(cmax.numpy()), rel=1e-14)
    assert s["constant_tokens"] == 1
    k = token_kurtosis(X).numpy()
    k = k[~np.isnan(k)]
    assert s["token_kurtosis"]["mean"] == pytest.approx(k.mean(), rel=1e-12)
    assert s["token_kurtosis"]["median"] == pytest.approx(np.median(k), rel=1e-12)
    assert s["token_kurtosis"]["max"] == pytest.approx(k.max(), rel=1e-12)
    assert "channel_max_abs" not in activation_stats(X, per_channel=False)


@pytest.mark.parametrize("bad", [torch.zeros(4), torch.zeros(0, 3), torch.tensor([[1.0, float("nan")]])])
def test_activation_stats_reject_bad_input(bad):
    with pytest.raises(ValueError):
        activation_stats(bad)


def test_activation_report_measures_shared_inputs_once():
    X, Y = randn(32, 8, seed=13), randn(32, 16, seed=14)
    inputs = {"layers.0.self_attn.q_proj": X, "layers.0.self_attn.k_proj": X, "layers.0.mlp.down_proj": Y,
              "lm_head": randn(32, 8, seed=15)}
    roles = {"layers.0.self_attn.q_proj": "attn_in", "layers.0.mlp.down_proj": "mlp_hidden"}
    rep = activation_report(inputs, roles=roles, progress=False)
    assert [r["name"] for r in rep["inputs"]] == ["layers.0.self_attn.q_proj", "layers.0.mlp.down_proj", "lm_head"]
    assert rep["inputs"][0]["modules"] == ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj"]
    assert [r["role"] for r in rep["inputs"]] == ["attn_in", "mlp_hidden", None]
    layer0 = rep["layers"][0]
    assert layer0["group"] == "layers.0"
    assert layer0["max_abs"] == max(X.abs().max().item(), Y.abs().max().item())
    assert set(layer0["by_role"]) == {"attn_in", "mlp_hidden"}
    assert layer0["by_role"]["mlp_hidden"]["channel_max_ratio"] == rep["inputs"][1]["channel_max_ratio"]
    assert layer0["channel_max_ratio"] == max(r["channel_max_ratio"] for r in rep["inputs"][:2])


# ---------------------------------------------------------------------------------------------
# plots


def check_png(path: Path, size_in: tuple[float, float]) -> None:
    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (round(size_in[1] * DPI), round(size_in[0] * DPI))
    assert img[..., :3].std() > 0.01, "flat image"


def check_saved(stem: Path, size_in) -> None:
    check_png(stem.with_suffix(".png"), size_in)
    svg = stem.with_suffix(".svg").read_text()
    assert "<svg" in svg and "</svg>" in svg
    assert not [p for p in stem.parent.iterdir() if p.name.endswith(".tmp")], "temporary file left behind"


def check_fonts(fig: Figure) -> None:
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert texts
    small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 10]
    assert not small, small


def layer_rows(scale: float, groups=("embed_tokens", "layers.0", "layers.1", "lm_head")):
    return [{"group": g, "incoherence_mean": scale * (i + 2), "excess_kurtosis_mean": scale * (i - 1)}
            for i, g in enumerate(groups)]


def test_plot_layer_bars(tmp_path):
    series = {"identity": layer_rows(100.0), "hadamard": layer_rows(1.0), "learned": layer_rows(0.5)}
    fig = plot_layer_bars(series, save=tmp_path / "bars")
    check_saved(tmp_path / "bars", layer_bars.SIZE)
    check_fonts(fig)
    top, bottom = fig.axes[:2]
    assert len(top.patches) == 4 * 3 and len(bottom.patches) == 4 * 3
    assert top.get_yscale() == "log"  # 1 .. 500
    assert bottom.get_yscale() == "symlog"  # -100 .. 200
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["embed", "0", "1", "lm_head"]
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == ["hadamard", "identity", "learned"]
    small = plot_layer_bars({"a": layer_rows(1.0)})
    assert small.axes[0].get_yscale() == "linear"


def test_plot_layer_bars_missing_group_leaves_a_gap():
    fig = plot_layer_bars({"a": layer_rows(1.0), "b": layer_rows(1.0, groups=("layers.0",))})
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert len(heights) == 8 and sum(np.isnan(heights)) == 3


def test_plot_layer_bars_rejects_unknown_metric():
    with pytest.raises(ValueError, match="no metric"):
        plot_layer_bars({"a": layer_rows(1.0)}, metrics=("rtn_error",))
    with pytest.raises(ValueError):
        plot_layer_bars({})


def test_plot_weight_histogram(tmp_path):
    W = randn(64, 64, seed=16)
    W[:, 3] *= 30.0
    weights = {"identity": W, "hadamard": W @ random_hadamard(64, seed=2)}
    fig = plot_weight_histogram(weights, "layers.0.mlp.up_proj", bins=51, save=tmp_path / "hist.png")
    check_saved(tmp_path / "hist", histogram.SIZE)
    check_fonts(fig)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    steps = ax.patches
    assert len(steps) == 2
    edges = [s.get_data()[1] for s in steps]
    assert np.array_equal(edges[0], edges[1]) and len(edges[0]) == 52
    assert edges[0][-1] == pytest.approx(max(w.abs().max().item() for w in weights.values()))
    assert all(s.get_data()[0].sum() == W.numel() for s in steps)
    assert "layers.0.mlp.up_proj" in ax.get_title()


def test_plot_channel_magnitudes(tmp_path):
    X = randn(50, 40, seed=17)
    X[:, 9] *= 25.0
    series = {"identity": channel_max_abs(X), "hadamard": channel_max_abs(X @ torch.eye(40, dtype=torch.float64)).tolist()}
    fig = plot_channel_magnitudes(series, "layers.0.self_attn.q_proj", save=tmp_path / "ch")
    check_saved(tmp_path / "ch", channels.SIZE)
    check_fonts(fig)
    assert len(fig.axes) == 2
    values = fig.axes[0].patches[0].get_data()[0]
    np.testing.assert_allclose(values, X.abs().amax(0).numpy())
    assert plot_channel_magnitudes({"a": [1.0, 2.0]}, log_y=True).axes[0].get_yscale() == "log"
    with pytest.raises(ValueError):
        plot_channel_magnitudes({"a": []})


def test_plot_weight_channels(tmp_path):
    W = randn(48, 32, seed=18)
    W[:, 5] *= 40.0  # one outlier input column
    rotated = W @ random_hadamard(32, seed=3)
    fig = plot_weight_channels({"identity": W, "hadamard": rotated}, "layers.2.mlp.up_proj", save=tmp_path / "wch")
    check_saved(tmp_path / "wch", channels.SIZE)
    check_fonts(fig)
    top, bottom = fig.axes[:2]
    np.testing.assert_allclose(top.patches[0].get_data()[0], W.abs().amax(0).numpy())
    np.testing.assert_allclose(bottom.patches[0].get_data()[0], rotated.abs().amax(0).numpy())
    assert int(np.argmax(top.patches[0].get_data()[0])) == 5
    assert top.get_ylabel() == "max |W|" and "layers.2.mlp.up_proj" in fig.get_suptitle()
    with pytest.raises(ValueError, match="2-D"):
        plot_weight_channels({"a": torch.ones(3)})
    with pytest.raises(ValueError):
        plot_weight_channels({})


def test_plot_activation_heatmap(tmp_path):
    series = {"identity": randn(300, 32, seed=18), "hadamard": randn(300, 32, seed=19)}
    fig = plot_activation_heatmap(series, "layers.1.mlp.gate_proj", max_tokens=100, save=tmp_path / "heat")
    check_saved(tmp_path / "heat", channels.SIZE)
    check_fonts(fig)
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 2 and images[0].get_array().shape == (100, 32)
    assert images[0].norm.vmax == pytest.approx(max(x[:100].abs().max().item() for x in series.values()))
    with pytest.raises(ValueError, match="all zero"):
        plot_activation_heatmap({"z": torch.zeros(3, 3)})


def test_plot_solve_history_from_result_object(tmp_path):
    result = SimpleNamespace(history=[10.0 / (i + 1) for i in range(40)], orthogonality_error=3e-7)
    fig = plot_solve_history(result, save=tmp_path / "solve")
    check_saved(tmp_path / "solve", solve_curve.SIZE)
    check_fonts(fig)
    loss_ax, orth_ax = fig.axes
    assert loss_ax.get_yscale() == "log" and orth_ax.get_yscale() == "log"  # losses span 10 .. 0.25
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), result.history)
    assert orth_ax.lines[0].get_ydata()[0] == pytest.approx(3e-7)
    assert {line.get_ydata()[0] for line in orth_ax.lines[1:]} == {1e-5, 1e-10}  # tolerance lines


def test_plot_solve_history_variants():
    fig = plot_solve_history([1.0, -0.5, -2.0], orthogonality_error=[1e-8, 2e-8, 4e-8])
    loss_ax, orth_ax = fig.axes
    assert loss_ax.get_yscale() == "linear"  # negative losses
    np.testing.assert_allclose(orth_ax.lines[0].get_ydata(), [1e-8, 2e-8, 4e-8])
    fig = plot_solve_history([3.0, 2.0], orthogonality_error={"R1": 1e-6, "R2.0": 0.0})
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["R1", "R2.0"]
    assert fig.axes[1].get_yscale() == "linear"  # an exact zero cannot be drawn on a log axis
    assert fig.axes[0].get_yscale() == "linear"  # losses within a factor 10: log would hide the change
    assert plot_solve_history([1.0]).axes[1].texts[0].get_text() == "not recorded"
    with pytest.raises(ValueError, match="NaN"):
        plot_solve_history([1.0, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        plot_solve_history([])


def test_save_figure_writes_png_and_svg_atomically(tmp_path):
    fig = plot_solve_history([2.0, 1.0])
    paths = save_figure(fig, tmp_path / "sub" / "curve.svg")
    assert [p.name for p in paths] == ["curve.png", "curve.svg"]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["curve.png", "curve.svg"]
    with pytest.raises(ValueError, match="format"):
        save_figure(fig, tmp_path / "x", formats=("pdf",))


def test_one_kurtosis_definition():
    # diagnostics report core's Pearson kurtosis minus 3 (excess); the KurTail objective uses it about 0
    from orthoopt.core.moments import kurtosis
    from orthoopt.objectives import row_kurtosis

    X = randn(16, 40, seed=3) ** 3
    torch.testing.assert_close(token_kurtosis(X), kurtosis(X, dim=1) - 3, rtol=1e-14, atol=0)
    assert excess_kurtosis(X) == pytest.approx(float(kurtosis(X.reshape(-1), dim=0)) - 3, rel=1e-14)
    torch.testing.assert_close(row_kurtosis(X), kurtosis(X, center=False), rtol=0, atol=0)
    torch.testing.assert_close(row_kurtosis(X, center=True), kurtosis(X), rtol=0, atol=0)


def test_weight_stats_in_row_chunks_are_the_whole_tensors(monkeypatch):
    """weight_stats converts STATS_CHUNK entries at a time to float64; chunks of a few rows (the last one
    partial) give the statistics of one chunk to float64 rounding, and exactly the same counts."""
    from orthoopt.diagnostics import stats

    W = torch.randn(37, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    W[5, 3] = 40.0  # an outlier
    whole = stats.weight_stats(W)
    monkeypatch.setattr(stats, "STATS_CHUNK", 48)  # 3 rows per chunk: 13 chunks
    chunked = stats.weight_stats(W)
    for key, value in whole.items():
        if isinstance(value, float):
            assert chunked[key] == pytest.approx(value, rel=1e-12, abs=0), key
        else:
            assert chunked[key] == value, key
    assert chunked["outlier_fraction"] > 0
    assert chunked["incoherence"] == pytest.approx(stats.incoherence(W), rel=1e-12)
    assert chunked["rtn_error"] == pytest.approx(stats.rtn_error(W), rel=1e-12)
    assert chunked["excess_kurtosis"] == pytest.approx(stats.excess_kurtosis(W), rel=1e-12)
