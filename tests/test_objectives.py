"""Tests for orthoopt.objectives: FourthPower, HessianWeighted, Kurtosis, DFRotLoss and composition.

Numerics are checked in float64. Expected values are derived in the comments, never read off a run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orthoopt.core.grid import QuantSpec, quantize_tokens
from orthoopt.objectives import (
    DFRotLoss,
    FourthPower,
    HessianWeighted,
    Kurtosis,
    Objective,
    Sum,
    WeightBlock,
    peak_share_tokens,
    row_kurtosis,
)

F64 = torch.float64


def orthogonal(n: int, seed: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, Rr = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (Q * torch.sign(torch.diagonal(Rr))).to(dtype)


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def mixed_blocks(n: int = 6, d: int = 3, seed: int = 0) -> list[WeightBlock]:
    """Blocks on two rotations, both sides, different shapes and scales."""
    return [
        WeightBlock(randn(4, n, seed=seed), "R1", "in", "up"),
        WeightBlock(10.0 * randn(n, 5, seed=seed + 1), "R1", "out", "o_proj"),
        WeightBlock(randn(7, n, seed=seed + 2), "R1", "in", "embed"),
        WeightBlock(randn(d, 5, seed=seed + 3), "R2", "out", "v"),
        WeightBlock(randn(5, d, seed=seed + 4), "R2", "in", "o"),
    ]


def rotations_for(dims: dict[str, int], seed: int = 100, dtype=F64) -> dict[str, torch.Tensor]:
    return {k: orthogonal(n, seed + i, dtype) for i, (k, n) in enumerate(sorted(dims.items()))}


def directional_fd(obj: Objective, rots: dict[str, torch.Tensor], seed: int = 7, eps: float = 1e-6):
    """(central finite difference of the loss along a random direction D, <value_and_grad's gradient, D>)."""
    dirs = {k: randn(*R.shape, seed=seed + i) for i, (k, R) in enumerate(sorted(rots.items()))}
    plus = obj.loss({k: R + eps * dirs[k] for k, R in rots.items()})
    minus = obj.loss({k: R - eps * dirs[k] for k, R in rots.items()})
    _, grads = obj.value_and_grad(rots)
    return float(plus - minus) / (2 * eps), float(sum((grads[k] * dirs[k]).sum() for k in grads))


def autograd_value_and_grad(obj: Objective, rots):
    """The base class's autograd path, bypassing any closed-form override."""
    return Objective.value_and_grad(obj, rots)


# ----------------------------------------------------------------------------------------- FourthPower


def test_fourth_power_hand_computed():
    # W = [[1, 2], [3, 4]], R = 45-degree rotation [[c, -s], [s, c]], c = s = 1/sqrt(2).
    # side "in":  W R   = [[3, 1], [7, 1]] / sqrt(2)  -> (81 + 1 + 2401 + 1) / 4 = 621
    # side "out": R.T W = [[4, 6], [2, 2]] / sqrt(2)  -> (256 + 1296 + 16 + 16) / 4 = 396
    # R = I: 1 + 16 + 81 + 256 = 354 for either side.
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    c = 1 / math.sqrt(2)
    R = torch.tensor([[c, -c], [c, c]], dtype=F64)
    f_in = FourthPower([WeightBlock(W, "R1", "in")])
    f_out = FourthPower([WeightBlock(W, "R1", "out")])
    both = FourthPower([WeightBlock(W, "R1", "in"), WeightBlock(W, "R1", "out")])
    assert float(f_in.loss({"R1": R})) == pytest.approx(621.0, rel=1e-14)
    assert float(f_out.loss({"R1": R})) == pytest.approx(396.0, rel=1e-14)
    assert float(both.loss({"R1": R})) == pytest.approx(1017.0, rel=1e-14)
    assert float(f_in.loss({"R1": torch.eye(2, dtype=F64)})) == pytest.approx(354.0, rel=1e-14)
    assert f_in.dims == {"R1": 2}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 7), normalize=st.booleans())
def test_fourth_power_invariant_to_signed_permutations(seed, n, normalize):
    blocks = [WeightBlock(randn(3, n, seed=seed), "R1", "in"), WeightBlock(randn(n, 4, seed=seed + 1), "R1", "out")]
    f = FourthPower(blocks, normalize=normalize)
    R = orthogonal(n, seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    P = torch.eye(n, dtype=F64)[torch.randperm(n, generator=g)]
    D = torch.diag(torch.randint(0, 2, (n,), generator=g).to(F64) * 2 - 1)
    assert float(f.loss({"R1": R @ P @ D})) == pytest.approx(float(f.loss({"R1": R})), rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), log_c=st.floats(-3.0, 3.0))
def test_fourth_power_normalized_is_scale_invariant(seed, log_c):
    c = 10.0**log_c
    W, V = randn(4, 5, seed=seed), randn(5, 3, seed=seed + 1)
    R = orthogonal(5, seed + 2)
    base = [WeightBlock(W, "R1", "in"), WeightBlock(V, "R1", "out")]
    scaled = [WeightBlock(c * W, "R1", "in"), WeightBlock(V, "R1", "out")]
    plain, plain_scaled = FourthPower(base).loss({"R1": R}), FourthPower(scaled).loss({"R1": R})
    assert float(FourthPower(scaled, normalize=True).loss({"R1": R})) == pytest.approx(
        float(FourthPower(base, normalize=True).loss({"R1": R})), rel=1e-10
    )
    # the plain sum is not: W's term scales by c^4 (V's term is unchanged)
    v_term = FourthPower([base[1]]).loss({"R1": R})
    assert float(plain_scaled - v_term) == pytest.approx(c**4 * float(plain - v_term), rel=1e-10)


def test_fourth_power_normalized_term_is_entry_kurtosis():
    # A +-1 matrix has all entries of equal magnitude: E[w^4] / E[w^2]^2 = 1, the minimum.
    signs = torch.tensor([[1.0, -1.0, 1.0, 1.0], [-1.0, -1.0, 1.0, -1.0], [1.0, 1.0, 1.0, -1.0]], dtype=F64)
    f = FourthPower([WeightBlock(signs, "R1", "in")], normalize=True)
    assert float(f.loss({"R1": torch.eye(4, dtype=F64)})) == pytest.approx(1.0, rel=1e-14)
    # any rotation can only concentrate it: >= 1 (power-mean inequality)
    assert float(f.loss({"R1": orthogonal(4, 3)})) >= 1.0


@pytest.mark.parametrize("normalize", [False, True])
def test_fourth_power_closed_form_gradient_matches_autograd_and_fd(normalize):
    f = FourthPower(mixed_blocks(), normalize=normalize)
    rots = rotations_for(f.dims)
    value, grads = f.value_and_grad(rots)
    value_ag, grads_ag = autograd_value_and_grad(f, rots)
    assert value.dtype == F64 and not value.requires_grad
    assert float(value) == pytest.approx(float(value_ag), rel=1e-13)
    assert set(grads) == {"R1", "R2"}
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ag[k], rtol=1e-12, atol=1e-12)
    fd, analytic = directional_fd(f, rots)
    assert fd == pytest.approx(analytic, rel=1e-7)


def test_fourth_power_float32_rotation_accumulates_in_float64():
    f = FourthPower(mixed_blocks())
    rots64 = rotations_for(f.dims)
    rots32 = {k: R.float() for k, R in rots64.items()}
    v32, g32 = f.value_and_grad(rots32)
    v64, g64 = f.value_and_grad(rots64)
    assert v32.dtype == F64 and g32["R1"].dtype == torch.float32
    assert float(v32) == pytest.approx(float(v64), rel=1e-5)
    for k in g64:
        torch.testing.assert_close(g32[k].double(), g64[k], rtol=1e-4, atol=1e-3)


def test_fourth_power_bad_inputs():
    W = randn(3, 4, seed=0)
    W_nan = W.clone()
    W_nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj"):
        FourthPower([WeightBlock(W_nan, "R1", "in", "layers.1.mlp.up_proj")])
    with pytest.raises(ValueError, match="at least one"):
        FourthPower([])
    with pytest.raises(ValueError, match="size"):  # two blocks disagree on R1's size
        FourthPower([WeightBlock(W, "R1", "in"), WeightBlock(W, "R1", "out")])
    with pytest.raises(ValueError, match="all zeros"):
        FourthPower([WeightBlock(torch.zeros(2, 4, dtype=F64), "R1", "in", "dead")], normalize=True)
    f = FourthPower([WeightBlock(W, "R1", "in")])
    with pytest.raises(ValueError, match="missing"):
        f.loss({"R2": torch.eye(4, dtype=F64)})
    with pytest.raises(ValueError, match=r"\[4, 4\]"):
        f.value_and_grad({"R1": torch.eye(3, dtype=F64)})


# ------------------------------------------------------------------------------------- composition


def test_composition_loss_and_value_and_grad():
    blocks = mixed_blocks()
    a = FourthPower(blocks)
    acts = {"R1": randn(9, 6, seed=11), "R2": randn(8, 3, seed=12)}
    b = Kurtosis(acts)
    c = DFRotLoss({"R1": randn(10, 6, seed=13)})
    obj = a + 0.5 * b
    rots = rotations_for(a.dims)
    assert isinstance(obj, Sum)
    assert float(obj.loss(rots)) == pytest.approx(float(a.loss(rots) + 0.5 * b.loss(rots)), rel=1e-13)
    value, grads = obj.value_and_grad(rots)
    va, ga = a.value_and_grad(rots)
    vb, gb = b.value_and_grad(rots)
    assert float(value) == pytest.approx(float(va + 0.5 * vb), rel=1e-13)
    for k in ("R1", "R2"):
        torch.testing.assert_close(grads[k], ga[k] + 0.5 * gb[k], rtol=1e-12, atol=1e-12)
    # nesting flattens; a term without R2 contributes no R2 gradient
    nested = 2.0 * (obj + c)
    vn, gn = nested.value_and_grad(rots)
    vc, gc = c.value_and_grad(rots)
    assert set(gc) == {"R1"}
    assert float(vn) == pytest.approx(2.0 * float(va + 0.5 * vb + vc), rel=1e-13)
    torch.testing.assert_close(gn["R2"], 2.0 * (ga["R2"] + 0.5 * gb["R2"]), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------- Kurtosis


def test_kurtosis_gaussian_and_uniform_reference_values():
    n, T = 4096, 64
    gauss = randn(T, n, seed=1)
    uniform = 2.0 * torch.rand(T, n, generator=torch.Generator().manual_seed(2), dtype=F64) - 1.0
    eye = {"R1": torch.eye(n, dtype=F64)}
    # For x ~ N(0, I_n), x = r u with u uniform on the sphere and E[u_i^4] = 3 / (n (n + 2)), so
    # E[n sum x^4 / (sum x^2)^2] = 3 n / (n + 2). Per-token spread ~ sqrt(24 / n) / sqrt(T) ~ 0.01.
    k_gauss = Kurtosis({"R1": gauss}).kurtosis(eye)["R1"]
    assert float(k_gauss.mean()) == pytest.approx(3 * n / (n + 2), abs=0.05)
    # Uniform on [-1, 1]: E[u^4] / E[u^2]^2 = (1/5) / (1/3)^2 = 1.8 (bias O(1/n)).
    k_unif = Kurtosis({"R1": uniform}).kurtosis(eye)["R1"]
    assert float(k_unif.mean()) == pytest.approx(1.8, abs=0.03)
    # Loss = mean |kappa - target|: near 0 at the uniform target, about 1.2 for Gaussians.
    assert float(Kurtosis({"R1": uniform}, target=1.8).loss(eye)) < 0.05
    assert float(Kurtosis({"R1": gauss}, target=1.8).loss(eye)) == pytest.approx(3 * n / (n + 2) - 1.8, abs=0.05)
    # Centered (Pearson) agrees for zero-mean data.
    k_c = Kurtosis({"R1": gauss}, center=True).kurtosis(eye)["R1"]
    assert float(k_c.mean()) == pytest.approx(float(k_gauss.mean()), abs=0.02)


def test_kurtosis_exact_at_target():
    # +-1 entries: mean(y^4) = mean(y^2) = 1, so the (uncentered) kurtosis is exactly 1.
    signs = torch.randint(0, 2, (5, 16), generator=torch.Generator().manual_seed(0)).to(F64) * 2 - 1
    assert float(Kurtosis({"R1": signs}, target=1.0).loss({"R1": torch.eye(16, dtype=F64)})) == 0.0


def test_hadamard_flattens_one_hot_activations():
    n = 16
    one_hot = torch.eye(n, dtype=F64)  # n tokens, each a single massive channel: kurtosis n
    H = torch.from_numpy(scipy.linalg.hadamard(n)).to(F64) / math.sqrt(n)  # entries +-1/sqrt(n): kurtosis 1
    obj = Kurtosis({"R1": one_hot})
    eye = torch.eye(n, dtype=F64)
    torch.testing.assert_close(obj.kurtosis({"R1": eye})["R1"], torch.full((n,), float(n), dtype=F64))
    torch.testing.assert_close(obj.kurtosis({"R1": H})["R1"], torch.ones(n, dtype=F64))
    assert float(obj.loss({"R1": torch.eye(n, dtype=F64)})) == pytest.approx(n - 1.8, rel=1e-12)
    assert float(obj.loss({"R1": H})) == pytest.approx(0.8, rel=1e-12)
    # Outlier-heavy Gaussian activations (two hot channels), Pearson kurtosis, random-sign Hadamard.
    x = randn(200, n, seed=3)
    x[:, 3] *= 30.0
    x[:, 11] *= 12.0
    signs = torch.diag(torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(4)).to(F64) * 2 - 1)
    centered = Kurtosis({"R1": x}, center=True)
    assert float(centered.loss({"R1": signs @ H})) < 0.5 * float(centered.loss({"R1": torch.eye(n, dtype=F64)}))


def test_kurtosis_from_blocks_uses_rotated_weight_rows():
    W, V = randn(5, 6, seed=0), randn(6, 4, seed=1)
    blocks = [WeightBlock(W, "R1", "in"), WeightBlock(V, "R1", "out")]
    R = {"R1": orthogonal(6, 2)}
    from_blocks = Kurtosis.from_blocks(blocks, target=2.5)
    explicit = Kurtosis({"R1": torch.cat([W, V.T])}, target=2.5, on="weights")
    assert from_blocks.on == "weights" and from_blocks.dims == {"R1": 6}
    assert float(from_blocks.loss(R)) == pytest.approx(float(explicit.loss(R)), rel=1e-13)
    # and the rows are the rotated weights, whichever the side
    rows = torch.cat([blocks[0].rotated(R["R1"]), blocks[1].rotated(R["R1"]).T])
    torch.testing.assert_close(from_blocks.kurtosis(R)["R1"], row_kurtosis(rows))


@pytest.mark.parametrize("center", [False, True])
def test_kurtosis_gradcheck(center):
    obj = Kurtosis({"R1": randn(7, 5, seed=0), "R2": randn(6, 3, seed=1)}, target=2.0, center=center)
    R1, R2 = orthogonal(5, 2).requires_grad_(), orthogonal(3, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: obj.loss({"R1": a, "R2": b}), (R1, R2))


def test_kurtosis_zero_rows_and_bad_inputs():
    x = randn(4, 5, seed=0)
    with_zero = torch.cat([x, torch.zeros(2, 5, dtype=F64)])
    R = {"R1": orthogonal(5, 1)}
    assert float(Kurtosis({"R1": with_zero}).loss(R)) == pytest.approx(float(Kurtosis({"R1": x}).loss(R)), rel=1e-14)
    with pytest.raises(ValueError, match="no nonzero row"):
        Kurtosis({"R1": torch.zeros(3, 5, dtype=F64)})
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="'R1'.*non-finite"):
        Kurtosis({"R1": bad})
    with pytest.raises(ValueError, match="2-D"):
        Kurtosis({"R1": x[0]})
    with pytest.raises(ValueError, match="target"):
        Kurtosis({"R1": x}, target=0.5)
    with pytest.raises(ValueError, match="on must be"):
        Kurtosis({"R1": x}, on="gradients")
    with pytest.raises(ValueError, match="non-empty"):
        Kurtosis({})
    W = randn(3, 5, seed=1)
    W[2, 4] = float("nan")
    with pytest.raises(ValueError, match="block 'lm_head'.*non-finite"):
        Kurtosis.from_blocks([WeightBlock(W, "R1", "in", "lm_head")])


# ------------------------------------------------------------------------------------------- DFRot


def rtn_symmetric(y: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent per-token symmetric RTN as documented: scale = max|y| / (2^(b-1) - 1)."""
    qmax = 2 ** (bits - 1) - 1
    scale = y.abs().amax(dim=1, keepdim=True) / qmax
    return scale * torch.clamp(torch.round(y / scale), -qmax, qmax)


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_grid(symmetric):
    y = randn(30, 12, seed=0) * torch.linspace(0.01, 100, 30, dtype=F64)[:, None]
    y[5] = 0.0
    y[6] = y[6].abs()  # one-signed rows: the asymmetric grid still contains 0
    for bits in range(2, 9):
        q = quantize_tokens(y, QuantSpec(bits=bits, symmetric=symmetric))
        if symmetric:
            scale = y.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
        else:
            span = y.amax(dim=1, keepdim=True).clamp_min(0) - y.amin(dim=1, keepdim=True).clamp_max(0)
            scale = span / (2**bits - 1)
        scale[5] = 1.0
        assert torch.all((q - y).abs() <= scale / 2 * (1 + 1e-12))  # round to nearest, nothing clipped
        codes = q / scale
        if not symmetric:
            codes = codes - codes.amin(dim=1, keepdim=True)  # shift by the (integer) zero point
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-9)  # on the grid
        assert torch.equal(q[5], torch.zeros(12, dtype=F64))


def test_dfrot_uses_the_library_grid():
    import orthoopt.core.grid as grid
    from orthoopt.quant import quantizer  # imported here: loads the quant package

    for name in ("QuantSpec", "find_params", "fake_quantize", "quantize_rows", "quantize_groups"):
        assert getattr(quantizer, name) is getattr(grid, name)  # one grid, re-exported
    x = randn(20, 16, seed=1) * 3.0
    R = {"R1": orthogonal(16, 2)}
    y = x @ R["R1"]
    for bits in (2, 4, 8):
        for symmetric in (True, False):
            obj = DFRotLoss({"R1": x}, bits=bits, symmetric=symmetric)
            want = (y - quantizer.quantize_rows(y, quantizer.QuantSpec(bits=bits, symmetric=symmetric))).square().sum(1)
            torch.testing.assert_close(obj.token_errors(R)["R1"], want, rtol=0, atol=0)


def test_dfrot_loss_matches_documented_formula_and_bits():
    x = randn(50, 256, seed=0)
    R = {"R1": orthogonal(256, 1)}
    y = x @ R["R1"]
    obj4 = DFRotLoss({"R1": x}, bits=4)
    # Gaussian tokens: peak share max|x| / ||x|| ~ sqrt(2 ln(n T) / n) ~ 0.26 < 0.5
    assert not bool(obj4.massive_mask("R1").any())
    expected = (y - rtn_symmetric(y, 4)).square().sum(dim=1).mean()  # equal weights 1/T
    assert float(obj4.loss(R)) == pytest.approx(float(expected), rel=1e-12)
    # error ~ step^2 / 12 with step = max|y| / qmax: 8 bits shrinks it by about (7 / 127)^2 = 0.003
    loss8 = float(DFRotLoss({"R1": x}, bits=8).loss(R))
    assert loss8 < 3 * (7 / 127) ** 2 * float(obj4.loss(R))
    # asymmetric grids have 2^b - 1 steps over [min, max]; still far below 4-bit symmetric
    assert float(DFRotLoss({"R1": x}, bits=8, symmetric=False).loss(R)) < 0.01 * float(obj4.loss(R))


def test_dfrot_massive_tokens_get_weight():
    T, n = 40, 128
    x = randn(T, n, seed=0)
    massive = torch.zeros(T, dtype=torch.bool)
    massive[[3, 17, 29]] = True
    x[massive, 5] = 300.0  # one dominant channel: peak share ~ 0.99 (Gaussian tokens: < 0.4)
    scales = torch.rand(T, generator=torch.Generator().manual_seed(1), dtype=F64) * 10 + 0.1
    assert torch.equal(peak_share_tokens(x), massive)
    assert torch.equal(peak_share_tokens(scales[:, None] * x), massive)  # per-token scale (e.g. RMSNorm) invariant
    obj = DFRotLoss({"R1": x}, massive_weight=50.0)
    w = obj.weights["R1"]
    assert float(w.sum()) == pytest.approx(1.0, rel=1e-14)
    assert float(w[massive][0] / w[~massive][0]) == pytest.approx(50.0, rel=1e-14)
    R = {"R1": orthogonal(n, 2)}
    err = obj.token_errors(R)["R1"]
    manual = (50.0 * err[massive].sum() + err[~massive].sum()) / (50.0 * 3 + (T - 3))
    assert float(obj.loss(R)) == pytest.approx(float(manual), rel=1e-12)
    # explicit token weights replace the rule
    custom = torch.arange(T, dtype=F64)
    obj_c = DFRotLoss({"R1": x}, token_weights={"R1": custom})
    assert float(obj_c.loss(R)) == pytest.approx(float((custom * err).sum() / custom.sum()), rel=1e-12)


def test_dfrot_procrustes_targets_and_alternation():
    # Planted problem: Z has every token on the 4-bit symmetric grid with its max at code 7, so
    # Q(Z) = Z and the loss is 0 at R* = Q0 for X = Z Q0^T. Start near R*.
    T, n = 64, 8
    g = torch.Generator().manual_seed(0)
    Z = torch.randint(-7, 8, (T, n), generator=g).to(F64)
    Z[torch.arange(T), torch.randint(0, n, (T,), generator=g)] = 7.0
    Z *= torch.rand(T, 1, generator=g, dtype=F64) + 0.5
    Q0 = orthogonal(n, 1)
    X = Z @ Q0.T
    obj = DFRotLoss({"R1": X}, bits=4)
    assert float(obj.loss({"R1": Q0})) == pytest.approx(0.0, abs=1e-20)
    skew = 0.05 * randn(n, n, seed=2)
    R = Q0 @ torch.linalg.matrix_exp(skew - skew.T)
    start = float(obj.loss({"R1": R}))
    assert start > 0.1
    losses = [start]
    for _ in range(6):
        (A, B), = obj.procrustes_targets({"R1": R}).values()
        assert A.shape == B.shape == (T, n)
        # at the current R the surrogate ||A R - B||^2 is the loss itself
        assert float((A @ R - B).square().sum()) == pytest.approx(losses[-1], rel=1e-10)
        U, _, Vh = torch.linalg.svd(A.T @ B)
        R_new = U @ Vh
        # Majorize-minimize: the Procrustes step never increases the surrogate (R is feasible for it).
        # The true loss is not guaranteed to fall, since Q's per-token scales move with R_new.
        assert float((A @ R_new - B).square().sum()) <= losses[-1] * (1 + 1e-12)
        R = R_new
        losses.append(float(obj.loss({"R1": R})))
    # Over the alternation the true loss still ends lower (it plateaus at a fixed point, not at 0).
    assert losses[-1] < start


def test_dfrot_gradcheck():
    x = randn(6, 5, seed=0)
    x[2, 1] = 30.0  # one massive token
    obj = DFRotLoss({"R1": x}, bits=3, massive_weight=10.0)
    assert bool(obj.massive_mask("R1")[2])
    R = orthogonal(5, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: obj.loss({"R1": a}), (R,))


def test_dfrot_bad_inputs():
    x = randn(5, 4, seed=0)
    for bits in (1, 9, True, 4.0):
        with pytest.raises(ValueError, match="bits"):
            DFRotLoss({"R1": x}, bits=bits)
    bad = x.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="'R1'.*non-finite"):
        DFRotLoss({"R1": bad})
    with pytest.raises(ValueError, match="2-D"):
        DFRotLoss({"R1": x[0]})
    with pytest.raises(ValueError, match="massive_threshold"):
        DFRotLoss({"R1": x}, massive_threshold=0.0)
    with pytest.raises(ValueError, match="massive_weight"):
        DFRotLoss({"R1": x}, massive_weight=-1.0)
    with pytest.raises(ValueError, match=r"shape \[5\]"):
        DFRotLoss({"R1": x}, token_weights={"R1": torch.ones(4, dtype=F64)})
    with pytest.raises(ValueError, match="nonnegative"):
        DFRotLoss({"R1": x}, token_weights={"R1": -torch.ones(5, dtype=F64)})
    with pytest.raises(ValueError, match="without activations"):
        DFRotLoss({"R1": x}, token_weights={"R2": torch.ones(5, dtype=F64)})
    with pytest.raises(ValueError, match="missing"):
        DFRotLoss({"R1": x}).loss({"R2": torch.eye(4, dtype=F64)})


# ---------------------------------------------------------------------------------- HessianWeighted


def test_hessian_weighted_identity_is_fourth_power():
    blocks = mixed_blocks()
    rots = rotations_for(FourthPower(blocks).dims)
    eye = [torch.eye(b.weight.shape[1], dtype=F64) for b in blocks]
    scaled = [3.7 * H for H in eye]  # normalize_hessian: any multiple of I is OptRot
    ref_v, ref_g = FourthPower(blocks).value_and_grad(rots)
    for hs in (eye, scaled, [None] * len(blocks)):
        v, g = HessianWeighted(blocks, hs).value_and_grad(rots)
        assert float(v) == pytest.approx(float(ref_v), rel=1e-12)
        for k in ref_g:
            torch.testing.assert_close(g[k], ref_g[k], rtol=1e-11, atol=1e-11)


def test_hessian_weighted_matches_documented_formula():
    # Side "in": sum((W R (R^T Hn R)^(1/2))^4); side "out": sum((R^T W Hn^(1/2))^4); None: sum((W R)^4),
    # with Hn = H * k / tr(H) and H = X^T X of the layer's own input rows (unrotated basis).
    n = 5
    W_in, W_out, W_plain = randn(4, n, seed=0), randn(n, 3, seed=1), randn(2, n, seed=2)
    X_in = randn(40, n, seed=3) * torch.tensor([5.0, 1.0, 0.2, 1.0, 3.0], dtype=F64)
    X_out = randn(40, 3, seed=4) @ randn(3, 3, seed=5)
    H_in, H_out = X_in.T @ X_in, X_out.T @ X_out
    blocks = [WeightBlock(W_in, "R1", "in"), WeightBlock(W_out, "R1", "out"), WeightBlock(W_plain, "R1", "in")]
    obj = HessianWeighted(blocks, [H_in, H_out, None])
    R = orthogonal(n, 6)
    Rn = R.numpy()

    def sqrtm(M):
        return np.real(scipy.linalg.sqrtm(M))

    Hn_in, Hn_out = H_in.numpy() * n / np.trace(H_in.numpy()), H_out.numpy() * 3 / np.trace(H_out.numpy())
    expected = (
        np.sum((W_in.numpy() @ Rn @ sqrtm(Rn.T @ Hn_in @ Rn)) ** 4)
        + np.sum((Rn.T @ W_out.numpy() @ sqrtm(Hn_out)) ** 4)
        + np.sum((W_plain.numpy() @ Rn) ** 4)
    )
    assert float(obj.loss({"R1": R})) == pytest.approx(float(expected), rel=1e-9)
    # closed-form gradient through the weighted blocks
    _, g = obj.value_and_grad({"R1": R})
    _, g_ag = autograd_value_and_grad(obj, {"R1": R})
    torch.testing.assert_close(g["R1"], g_ag["R1"], rtol=1e-12, atol=1e-12)
    fd, analytic = directional_fd(obj, {"R1": R})
    assert fd == pytest.approx(analytic, rel=1e-7)


def test_hessian_weighted_raw_hessian_scaling():
    # Without normalization W H^(1/2) scales by sqrt(c) when H -> c H, so the loss scales by c^2.
    W = randn(3, 4, seed=0)
    X = randn(20, 4, seed=1)
    H = X.T @ X
    R = {"R1": orthogonal(4, 2)}
    base = HessianWeighted([WeightBlock(W, "R1", "in")], [H], normalize_hessian=False).loss(R)
    scaled = HessianWeighted([WeightBlock(W, "R1", "in")], [2.5 * H], normalize_hessian=False).loss(R)
    assert float(scaled) == pytest.approx(2.5**2 * float(base), rel=1e-10)


def test_hessian_weighted_bad_inputs():
    W = randn(3, 4, seed=0)
    b = WeightBlock(W, "R1", "in", "q_proj")
    with pytest.raises(ValueError, match="one per block"):
        HessianWeighted([b], [])
    with pytest.raises(ValueError, match=r"q_proj.*\[4, 4\]"):
        HessianWeighted([b], [torch.eye(3, dtype=F64)])
    with pytest.raises(ValueError, match="not symmetric"):
        HessianWeighted([b], [torch.eye(4, dtype=F64) + torch.triu(torch.ones(4, 4, dtype=F64), 1)])
    with pytest.raises(ValueError, match="positive semidefinite"):
        HessianWeighted([b], [torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=F64))])
    H_nan = torch.eye(4, dtype=F64)
    H_nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="q_proj.*non-finite"):
        HessianWeighted([b], [H_nan])
