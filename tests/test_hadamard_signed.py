"""The random Hadamard R1 applied as an operator (orthoopt.hadamard.signed) and the write-backs that use it."""

import pytest
import torch

from orthoopt.adapters.arch_table import ARCHS
from orthoopt.adapters.writeback import rotate_layer
from orthoopt.hadamard import SignedHadamard, fast_rotation, random_hadamard

F64 = torch.float64


@pytest.mark.parametrize("n", [1, 4, 12, 64, 172, 576, 1536])
def test_recognized_and_equal_to_the_dense_products(n):
    R = random_hadamard(n, seed=n)
    op = SignedHadamard.recognize(R)
    assert op is not None and op.shape == (n, n)
    # dense(): every entry is one ±1 divided by sqrt(n), as random_hadamard computes it: the same bits
    assert torch.equal(op.dense(), R)
    gen = torch.Generator().manual_seed(0)
    x, y, e = torch.randn(5, n, dtype=F64, generator=gen), torch.randn(n, 3, dtype=F64, generator=gen), \
        torch.randn(2, 4, n, dtype=F64, generator=gen)
    torch.testing.assert_close(op.right(x), x @ R, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.left_t(y), R.T @ y, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.right(e), e @ R, rtol=0, atol=1e-12)  # expert stacks [experts, out, in]
    assert fast_rotation(R) is not R and isinstance(fast_rotation(R), SignedHadamard)


@pytest.mark.parametrize("chunk", [1, 100, 5 * 96, 5 * 96 + 1])
def test_the_blocks_of_rows_and_columns_cover_every_entry(monkeypatch, chunk):
    """right / left_t transform in blocks of CHUNK elements: one row or column per block, a block that
    does not divide the rows, exactly five, five and a bit; the input is left as it was."""
    import orthoopt.hadamard.signed as signed

    monkeypatch.setattr(signed, "CHUNK", chunk)
    n = 96
    R = random_hadamard(n, seed=5)
    op = SignedHadamard.recognize(R)
    gen = torch.Generator().manual_seed(5)
    x, y, e = (torch.randn(13, n, dtype=F64, generator=gen), torch.randn(n, 11, dtype=F64, generator=gen),
               torch.randn(3, n, 7, dtype=F64, generator=gen))
    before = [x.clone(), y.clone(), e.clone()]
    torch.testing.assert_close(op.right(x), x @ R, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.right(y.T), y.T @ R, rtol=0, atol=1e-12)  # a non-contiguous input
    torch.testing.assert_close(op.left_t(y), R.T @ y, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.left_t(e), R.T @ e, rtol=0, atol=1e-12)  # expert stacks [experts, hidden, k]
    assert all(torch.equal(a, b) for a, b in zip((x, y, e), before))
    # dtype: each block cast on the way in, the same values as casting the whole input first
    h = x.bfloat16()
    assert op.right(h, F64).dtype == F64 and torch.equal(op.right(h, F64), op.right(h.double()))
    assert torch.equal(op.left_t(y.bfloat16(), F64), op.left_t(y.bfloat16().double()))
    with pytest.raises(ValueError, match=r"\[\.\.\., 96\]"):
        op.right(y)
    with pytest.raises(ValueError, match="96, k"):
        op.left_t(x)


def test_what_is_not_a_random_hadamard_keeps_the_dense_product():
    n = 12
    R = random_hadamard(n, seed=1)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(1)))
    flipped = random_hadamard(1024, seed=1).clone()
    flipped[700, 5] *= -1  # a single entry off, in the second block of rows compared
    for not_one in (Q, R.float().double(), R.T.contiguous(), flipped, torch.eye(10, dtype=F64),
                    R.clone().requires_grad_(True), R[:, :8]):
        assert SignedHadamard.recognize(not_one) is None
        assert fast_rotation(not_one) is not_one
    assert fast_rotation(None) is None


@pytest.mark.parametrize("arch", ["llama", "phi3", "mixtral"])
def test_rotate_layer_with_the_operator_equals_the_dense_rotation(arch):
    """The write-back's tensor function, fast and dense, over every projection of an architecture
    (separate q/k/v; Phi-3's fused qkv/gate_up; Mixtral's router and [experts, out, in] stacks), with
    biases, float64 before the cast. Only the hidden side of a weight meets R1, so the other is 17."""
    spec, hidden = ARCHS[arch], 48
    gen = torch.Generator().manual_seed(3)
    t = {}
    for pr in spec.projs:
        shape = (17, hidden) if pr.side == "in" else (hidden, 17)
        t[f"l.{pr.path}.{pr.param}"] = torch.randn((3, *shape) if pr.experts else shape, dtype=F64, generator=gen)
        if pr.bias_param:
            t[f"l.{pr.path}.{pr.bias_param}"] = torch.randn(shape[0], dtype=F64, generator=gen)
    R1 = random_hadamard(hidden, seed=2)
    dense = rotate_layer(spec, t, "l", R1, num_heads=4, num_kv_heads=2)
    fast = rotate_layer(spec, t, "l", fast_rotation(R1), num_heads=4, num_kv_heads=2)
    assert dense.keys() == fast.keys() and len(dense) > len(spec.projs)  # weights and the writers' biases
    for k in dense:
        torch.testing.assert_close(fast[k], dense[k], rtol=0, atol=1e-12)
    # cast_back: each tensor in its own dtype as soon as it is rotated, the same bits as casting after
    b16 = {k: v.bfloat16() for k, v in t.items()}
    for R in (R1, fast_rotation(R1)):
        after = rotate_layer(spec, b16, "l", R, num_heads=4, num_kv_heads=2)
        early = rotate_layer(spec, b16, "l", R, num_heads=4, num_kv_heads=2, cast_back=True)
        assert early.keys() == after.keys()
        assert all(early[k].dtype == torch.bfloat16 and torch.equal(early[k], after[k].bfloat16()) for k in after)


def test_apply_rotations_takes_the_fast_path_for_a_hadamard_r1_only(monkeypatch):
    """In memory: a random Hadamard R1 goes through the operator and gives the weights the dense
    products give (float64 model, to float64 rounding); a learned R1 keeps the dense product."""
    import orthoopt.adapters.writeback as writeback
    from orthoopt.adapters.decoder import DecoderAdapter
    from orthoopt.testing import planted_outlier_model

    def rotated(R1):
        model = planted_outlier_model(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, dtype=F64)
        adapter = DecoderAdapter(model)
        adapter.fuse_norms()
        adapter.apply_rotations({"R1": R1})
        return model.state_dict()

    calls = []
    real = SignedHadamard.left_t  # the writers' R1.T @ W (recognize itself only calls right)
    monkeypatch.setattr(SignedHadamard, "left_t", lambda self, x, *a: calls.append(x.shape) or real(self, x, *a))
    H = random_hadamard(64, seed=4)
    fast = rotated(H)
    assert calls, "a random Hadamard R1 was written back with the dense product"
    calls.clear()
    Q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=F64, generator=torch.Generator().manual_seed(5)))
    rotated(Q)
    assert not calls
    monkeypatch.setattr(writeback, "fast_rotation", lambda R: R)  # the dense products, for reference
    dense = rotated(H)
    assert not calls and fast.keys() == dense.keys()
    for k in dense:
        torch.testing.assert_close(fast[k], dense[k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 12, 128, 172, 3072, 4096, 8192, 14336])
def test_factor_orders_are_the_factors_the_transform_applies(monkeypatch, n):
    """factor_orders (what the cost model counts as passes) names exactly the matrices hadamard_transform
    multiplies by (spied on kron_apply): their orders in order, a product of n, the Sylvester ones at
    most 32, and the transform they make is the Hadamard matrix's."""
    import importlib
    import math

    from orthoopt.hadamard import factor_orders, hadamard_matrix, hadamard_plan, hadamard_transform

    fwht = importlib.import_module("orthoopt.hadamard.fwht")  # the package's fwht is the function
    applied = []
    kron_apply = fwht.kron_apply

    def spy(x, factors, dim=-1):
        applied.extend(F.shape[0] for F in factors)
        return kron_apply(x, factors, dim)

    monkeypatch.setattr(fwht, "kron_apply", spy)
    x = torch.randn(3, n, dtype=F64, generator=torch.Generator().manual_seed(n))
    y = hadamard_transform(x, normalize=False)
    assert applied == factor_orders(n)  # n = 1: no factor, no product
    assert math.prod(factor_orders(n)) == n
    base = hadamard_plan(n).base_order
    assert all(f <= 32 for f in factor_orders(n)[base > 1:])
    if n <= 3072:
        torch.testing.assert_close(y, x @ hadamard_matrix(n, dtype=F64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fold_scale_in_blocks_is_the_whole_tensor_product(monkeypatch, dtype):
    """fold_scale forms W * w block by block: every element is the same float64 product rounded once,
    so the result is the whole-tensor product's bit for bit (blocks of one row, of a few rows, all)."""
    import orthoopt.adapters.fusion as fusion
    import orthoopt.core.rowwise as rowwise

    gen = torch.Generator().manual_seed(7)
    W, w = torch.randn(3, 9, 40, generator=gen).to(dtype), torch.rand(40, generator=gen, dtype=F64) + 0.5
    whole = (W.to(F64) * w[None, :]).to(dtype)
    for block in (1, 100, 1 << 16):
        monkeypatch.setattr(rowwise, "ROW_BLOCK", block)
        out = fusion.fold_scale(W, w)
        assert out.dtype == dtype and torch.equal(out, whole)
