"""The fast paths of FourthPower: fused segments, chunked rows, views, stochastic row sampling.

Exactness is checked in float64 against the per-block reference (the autograd loss of the blocks). The
sampled gradient is checked for unbiasedness against a bound derived from its exact variance.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orthoopt.objectives import FourthPower, Objective, WeightBlock
from orthoopt.objectives.row_segments import RowPacker, RowSampler, default_chunk_rows

F64 = torch.float64


def randn(*shape, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def orthogonal(n: int, seed: int, dtype=F64) -> torch.Tensor:
    Q, T = torch.linalg.qr(randn(n, n, seed=seed))
    return (Q * torch.sign(torch.diagonal(T))).to(dtype)


def blocks_for(n: int, d: int, seed: int, dtype=F64) -> list[WeightBlock]:
    """Two rotations, both sides, blocks of several shapes and scales (one with a planted outlier column)."""
    W = randn(9, n, seed=seed, dtype=dtype)
    W[:, 1] *= 8.0
    return [
        WeightBlock(W, "R1", "in", "up"),
        WeightBlock(3.0 * randn(n, 5, seed=seed + 1, dtype=dtype), "R1", "out", "o_proj"),
        WeightBlock(randn(4, n, seed=seed + 2, dtype=dtype), "R1", "in", "q"),
        WeightBlock(randn(d, 6, seed=seed + 3, dtype=dtype), "R2", "out", "v"),
        WeightBlock(randn(7, d, seed=seed + 4, dtype=dtype), "R2", "in", "o"),
    ]


def reference(blocks, rots, normalize=False):
    """Per-block autograd loss and gradient (the base class's path on the view-based loss)."""
    f = FourthPower(blocks, normalize=normalize, fused=False)
    return Objective.value_and_grad(f, rots)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 8), normalize=st.booleans(), fused=st.booleans(),
       chunk_rows=st.sampled_from([None, 1, 3, 7, 64]))
def test_fused_and_chunked_equal_reference(seed, n, normalize, fused, chunk_rows):
    blocks = blocks_for(n, 3, seed)
    rots = {"R1": orthogonal(n, seed + 10), "R2": orthogonal(3, seed + 11)}
    ref_v, ref_g = reference(blocks, rots, normalize)
    f = FourthPower(blocks, normalize=normalize, fused=fused, chunk_rows=chunk_rows)
    v, g = f.value_and_grad(rots)
    assert v.dtype == F64 and not v.requires_grad
    assert float(v) == pytest.approx(float(ref_v), rel=1e-12)
    assert float(f.loss(rots)) == pytest.approx(float(ref_v), rel=1e-12)
    assert set(g) == {"R1", "R2"}
    for k in g:
        torch.testing.assert_close(g[k], ref_g[k], rtol=1e-11, atol=1e-11 * float(ref_g[k].abs().max()))


def test_sample_fraction_one_is_exact():
    blocks = blocks_for(5, 3, 0)
    rots = {"R1": orthogonal(5, 1), "R2": orthogonal(3, 2)}
    v, g = FourthPower(blocks).value_and_grad(rots)
    v1, g1 = FourthPower(blocks, sample_fraction=1.0, seed=4).value_and_grad(rots)
    assert float(v1) == float(v)
    for k in g:
        assert torch.equal(g1[k], g[k])


def test_float32_paths_agree_and_keep_dtypes():
    blocks = blocks_for(16, 4, 3, dtype=torch.float32)
    rots = {"R1": orthogonal(16, 5, torch.float32), "R2": orthogonal(4, 6, torch.float32)}
    v64, g64 = reference([WeightBlock(b.weight.double(), b.rotation, b.side) for b in blocks],
                         {k: R.double() for k, R in rots.items()})
    for fused in (True, False):
        v, g = FourthPower(blocks, fused=fused, chunk_rows=5).value_and_grad(rots)
        assert v.dtype == F64 and g["R1"].dtype == torch.float32
        # float32 products: relative error of a few units of 6e-8 per term, summed in float64
        assert float(v) == pytest.approx(float(v64), rel=1e-5)
        for k in g:
            torch.testing.assert_close(g[k].double(), g64[k], rtol=1e-4, atol=1e-4 * float(g64[k].abs().max()))


def test_fused_copy_size_and_views():
    blocks = blocks_for(6, 3, 7, dtype=torch.float32)
    fused, views = FourthPower(blocks), FourthPower(blocks, fused=False)
    assert fused.packed_bytes == 4 * sum(b.weight.numel() for b in blocks)
    assert views.packed_bytes == 0
    # views follow in-place changes of the weights; the fused copy was taken at construction
    rots = {"R1": orthogonal(6, 8, torch.float32), "R2": orthogonal(3, 9, torch.float32)}
    before = float(fused.value_and_grad(rots)[0])
    blocks[0].weight.mul_(2.0)
    assert float(fused.value_and_grad(rots)[0]) == before
    assert float(views.value_and_grad(rots)[0]) > before


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), chunk=st.integers(1, 9), cuts=st.lists(st.integers(0, 30), max_size=4))
def test_packer_segments_do_not_depend_on_piece_boundaries(seed, chunk, cuts):
    rows = randn(30, 4, seed=seed, dtype=torch.float32)
    packer = RowPacker(4, chunk, torch.float32, "cpu", reuse=False)
    edges = sorted({0, 30, *cuts})
    segs = [s for a, b in itertools.pairwise(edges) for s in packer.add(rows[a:b])] + list(packer.flush())
    reference_segs = list(rows.split(chunk))
    assert [s.shape[0] for s in segs] == [s.shape[0] for s in reference_segs]
    for s, r in zip(segs, reference_segs):
        assert torch.equal(s, r)
    # a reused buffer yields the same values, segment by segment
    reused = RowPacker(4, chunk, torch.float32, "cpu", reuse=True)
    got = []
    for a, b in itertools.pairwise(edges):
        got += [s.clone() for s in reused.add(rows[a:b])]
    got += [s.clone() for s in reused.flush()]
    assert all(torch.equal(s, r) for s, r in zip(got, reference_segs)) and len(got) == len(reference_segs)


def test_default_chunk_rows():
    assert default_chunk_rows(512) == 8192  # 2**22 elements
    assert default_chunk_rows(1 << 20) == 256  # floor of 256 rows
    with pytest.raises(ValueError, match="positive"):
        default_chunk_rows(0)


def test_sampled_gradient_is_unbiased():
    # One block of m = 48 rows, segments of C = 16 rows, k = round(f C) = 4 rows of each segment drawn
    # without replacement and weighted by C / k. Per row i the gradient term is g_i = 4 a_i^T (a_i R)^3.
    # For one segment, Var(G_hat[e]) = (C^2 / k) (1 - k / C) s_e^2 with s_e^2 the sample variance of the
    # segment's g_i[e] (simple random sampling without replacement); segments draw independently, so
    # the variance V_e of one estimate is the sum over segments, and the mean of T estimates (seeds
    # 0 .. T-1) has E ||mean - G||_F^2 = sum_e V_e / T. We require ||mean - G||_F^2 <= 9 sum_e V_e / T
    # (three standard deviations in norm; Markov bounds the failure chance of an unbiased estimator by
    # 1/9 for one fixed seed set, and this one passes). A biased estimator (the weight C / k left
    # out: mean -> f G) misses the bound by a factor of about 70 here, which is checked too.
    n, m, C, f, T = 5, 48, 16, 0.25, 400
    W = randn(m, n, seed=1)
    W[:, 0] *= 5.0
    R = orthogonal(n, 2)
    block = [WeightBlock(W, "R1", "in")]
    G = FourthPower(block).value_and_grad({"R1": R})[1]["R1"]
    loss = float(FourthPower(block).loss({"R1": R}))
    terms = 4.0 * W[:, :, None] * ((W @ R) ** 3)[:, None, :]  # [m, n, n]: g_i
    k = round(f * C)
    V = sum((C**2 / k) * (1 - k / C) * seg.var(dim=0, unbiased=True) for seg in terms.split(C))
    row_losses = ((W @ R) ** 4).sum(dim=1)
    V_loss = sum((C**2 / k) * (1 - k / C) * seg.var(unbiased=True) for seg in row_losses.split(C))
    estimates = [FourthPower(block, sample_fraction=f, seed=s, chunk_rows=C).value_and_grad({"R1": R})
                 for s in range(T)]
    mean_G = torch.stack([e[1]["R1"] for e in estimates]).mean(0)
    mean_loss = sum(float(e[0]) for e in estimates) / T
    bound = 9.0 * float(V.sum()) / T
    assert float(((mean_G - G) ** 2).sum()) <= bound
    assert (mean_loss - loss) ** 2 <= 9.0 * float(V_loss) / T
    assert float(((f * G - G) ** 2).sum()) > 10 * bound  # the test would catch a missing 1/f
    # each estimate differs from G (it is sampled), and loss() stays exact
    assert float((estimates[0][1]["R1"] - G).abs().max()) > 0
    sampled = FourthPower(block, sample_fraction=f, seed=0, chunk_rows=C)
    assert float(sampled.loss({"R1": R})) == pytest.approx(loss, rel=1e-14)


def test_sampler_draws_the_stated_number_of_distinct_rows():
    A = torch.arange(40, dtype=F64)[:, None].repeat(1, 3)
    sampler = RowSampler(0.3, seed=5)
    rows, weight = sampler.sample(A, torch.empty(40, 3, dtype=F64))
    assert rows.shape[0] == 12 and weight == pytest.approx(40 / 12)
    assert len(set(rows[:, 0].tolist())) == 12 and rows[:, 0].tolist() == sorted(rows[:, 0].tolist())


def test_rotations_draw_independently_of_each_other():
    # each rotation has its own generator: R2's draws are the same with or without R1 in the objective
    blocks = blocks_for(6, 3, 11)
    rots = {"R1": orthogonal(6, 1), "R2": orthogonal(3, 2)}
    both = FourthPower(blocks, sample_fraction=0.5, seed=3).value_and_grad(rots)[1]["R2"]
    alone = FourthPower([b for b in blocks if b.rotation == "R2"], sample_fraction=0.5, seed=3).value_and_grad(rots)[1]
    assert torch.equal(both, alone["R2"])


def test_bad_options():
    blocks = blocks_for(4, 2, 0)
    for bad in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="sample_fraction"):
            FourthPower(blocks, sample_fraction=bad)
    with pytest.raises(ValueError, match="chunk_rows"):
        FourthPower(blocks, chunk_rows=0)
    with pytest.raises(ValueError, match=r"\[4, 4\]"):
        FourthPower(blocks).value_and_grad({"R1": torch.eye(3, dtype=F64), "R2": torch.eye(2, dtype=F64)})


def test_explicit_device_and_rotation_dtype_cast():
    blocks = blocks_for(6, 3, 4, dtype=torch.float32)
    rots64 = {"R1": orthogonal(6, 1), "R2": orthogonal(3, 2)}
    f = FourthPower(blocks, device="cpu")
    v, g = f.value_and_grad(rots64)  # float64 rotations on float32 segments: computed in float64
    assert g["R1"].dtype == F64
    v_ref, g_ref = reference([WeightBlock(b.weight.double(), b.rotation, b.side) for b in blocks], rots64)
    assert float(v) == pytest.approx(float(v_ref), rel=1e-12)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-11, atol=1e-11 * float(g_ref[k].abs().max()))
