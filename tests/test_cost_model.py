"""benchmarks/cost_model.py (issue 23, item 5): the work it counts is the shapes' own (parameter counts
against the published totals, less the norms), and its phases scale as the formulas say."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import cost_model  # noqa: E402

UNIT = cost_model.Rates(f64=1.0, f32=1.0, bf16=1.0, read=1.0, write=1.0, rtn=1.0, gptq_rc2=1.0, gptq_rc=0.0,
                        gptq_c=0.0, rot_rh2=1.0, rot_rh=0.0, fixed={})


@pytest.mark.parametrize("key, published", [("1b", 1_235_814_400), ("8b", 8_030_261_248)])
def test_the_counted_weights_are_the_published_models_less_their_norms(key, published):
    s = cost_model.SHAPES[key]
    norms = s.hidden_size * (2 * s.num_hidden_layers + 1)
    assert cost_model.counts(s)["total"] + norms == published


def test_the_70b_shape_is_llama_3_70b():
    s = cost_model.PROJECTED["70b"]
    norms = s.hidden_size * (2 * s.num_hidden_layers + 1)
    assert cost_model.counts(s)["total"] + norms == 70_553_706_496  # Meta-Llama-3-70B's safetensors total


def test_phases_are_work_over_rate():
    """With unit rates a phase's seconds are its work: the hadamard write-back is 2 h P float64 FLOPs
    (P with lm_head untied by the final norm's fold, and written besides the embedding), the norm fusion
    one product per reader element and lm_head's, halving a rate doubles only the phases that use it,
    GPTQ's solve is sum r c^2 over the linears."""
    s = cost_model.SHAPES["1b"]  # tied
    n, h = cost_model.counts(s), s.hidden_size
    ph = cost_model.phases(s, "rotate-streamed", UNIT)
    assert ph["R1 products"] == 2 * h * (n["layers"] + 2 * n["embed"])
    assert ph["read"] == 2 * n["total"] and ph["write"] == 2 * (n["total"] + n["embed"])
    assert ph["fuse norms"] == 0.0  # UNIT has no fold rate
    folded = cost_model.phases(s, "rotate-streamed", cost_model.Rates(**{**UNIT.__dict__, "fold": 1.0}))
    d = h // s.num_attention_heads
    readers = h * (h + 2 * s.num_key_value_heads * d + 2 * s.intermediate_size)
    assert folded["fuse norms"] == s.num_hidden_layers * readers + n["embed"]
    slow = cost_model.phases(s, "rotate-streamed", cost_model.Rates(**{**UNIT.__dict__, "rot_rh2": 2.0}))
    assert slow["R1 products"] == 2 * ph["R1 products"] and slow["read"] == ph["read"]
    gptq = cost_model.phases(s, "quantize-gptq-streamed", UNIT)
    assert gptq["GPTQ solve"] == s.num_hidden_layers * sum(r * c * c for _, r, c in cost_model.linears(s))
    with pytest.raises(ValueError, match="no cost model"):
        cost_model.phases(s, "rotate", UNIT)


def test_gptq_factorization_is_c_cubed_at_the_nearest_measured_width_below():
    """Each linear's Hessian factorization costs ``c^3`` times the seconds per ``c^3`` measured at its input
    width ``c``, or at the nearest measured width below it (8B: q/k/v/o/gate/up read 4096 columns, down
    14336); below every measured width, the smallest's."""
    s = cost_model.SHAPES["8b"]
    L, h, i = s.num_hidden_layers, s.hidden_size, s.intermediate_size
    base = cost_model.phases(s, "quantize-gptq-streamed", UNIT)["GPTQ solve"]

    def solve(factor):
        return cost_model.phases(s, "quantize-gptq-streamed", cost_model.Rates(**{**UNIT.__dict__, "gptq_factor": factor}))["GPTQ solve"]

    assert solve({"4096": 1.0}) - base == L * (6 * h ** 3 + i ** 3)
    assert solve({"4096": 1.0, "8192": 2.0}) - base == L * (6 * h ** 3 + 2 * i ** 3)
    assert solve({"14336": 3.0}) - base == L * 3 * (6 * h ** 3 + i ** 3)  # none below 4096: the smallest's


def test_the_fit_is_least_squares_in_relative_error():
    """Consistent samples give their coefficients back, over- or exactly determined; a negative one is 0."""
    rows = [[1.0, 2.0], [3.0, 1.0], [2.0, 5.0]]
    times = [2 * a + 0.5 * b for a, b in rows]
    assert cost_model._fit(rows, times) == pytest.approx([2.0, 0.5], rel=1e-12)
    assert cost_model._fit(rows[:2], times[:2]) == pytest.approx([2.0, 0.5], rel=1e-12)
    assert cost_model._fit([[1.0, 1.0], [1.0, 2.0]], [2.0, 1.0])[1] == 0.0  # solved: [3, -1], clamped


@pytest.mark.parametrize("key", ["1b", "3b", "8b"])
def test_the_hadamard_write_back_is_its_measured_time_per_element(key):
    """With the fast write-back's rate at the shape's hidden size the hadamard R1 products are that many
    seconds per weight element; at another hidden size, or without it, the dense products."""
    s = cost_model.SHAPES[key]
    n = cost_model.counts(s)
    dense = 2 * s.hidden_size * (n["layers"] + 2 * n["embed"])
    fast = cost_model.phases(s, "rotate-streamed", cost_model.Rates(**{**UNIT.__dict__, "rot_fast": {str(s.hidden_size): 3.0}}))
    assert fast["R1 products"] == 3.0 * (n["layers"] + 2 * n["embed"])  # lm_head untied by the final norm
    other = cost_model.Rates(**{**UNIT.__dict__, "rot_fast": {str(s.hidden_size + 1): 3.0}})
    assert cost_model.phases(s, "rotate-streamed", other)["R1 products"] == dense
    assert cost_model.phases(s, "rotate-streamed", UNIT)["R1 products"] == dense


def test_the_assumed_gpu_counts_passes_of_the_transform():
    """The H100's assumed rate: (factors + 2: the cast with the signs, the cast back) passes of 16 bytes per element (2048 = 16 x 16 x 8;
    3072 = 12 x 16 x 16; 4096 = 16 x 16 x 16; 8192 = 32 x 16 x 16)."""
    assert {h: cost_model._hadamard_passes(h) for h in cost_model.FAST_HIDDEN} == {2048: 5, 3072: 5, 4096: 5, 8192: 5}
    assert cost_model.H100.rot_fast["8192"] == 5 * 16 / 1.5e12


def test_optrot_phases_count_the_evaluations_a_run_made():
    """OptRot's objective phases are evaluations x 4 h P (R1: every layer weight; R2: v and o of one
    layer, d wide), from the projection's steps or from a run's report; each R1 evaluation reads the layers."""
    s = cost_model.SHAPES["1b"]
    n, h, L = cost_model.counts(s), s.hidden_size, s.num_hidden_layers
    d = h // s.num_attention_heads
    run = cost_model.phases(s, "rotate-optrot-streamed", UNIT, evaluations={"R1": 3, "R2": 5 * L})
    assert run["R1 objective"] == 3 * 4 * h * n["layers"]
    assert run["R2 objective"] == 5 * L * 4 * d * 2 * h * h
    assert run["read"] == 2 * 2 * n["total"] + 3 * 2 * n["layers"]
    projected = cost_model.phases(s, "optrot", UNIT, steps=3)
    assert projected["R1 objective"] == run["R1 objective"] and projected["R2 objective"] == 3 / 5 * run["R2 objective"]


def test_eval_in_float32_counts_the_float32_rate():
    s = cost_model.SHAPES["1b"]
    slow_bf16 = cost_model.Rates(**{**UNIT.__dict__, "bf16": 0.25})
    bf16 = cost_model.phases(s, "eval-streamed", slow_bf16)
    f32 = cost_model.phases(s, "eval-float32-streamed", slow_bf16)
    assert bf16["layers"] == 4 * f32["layers"] and bf16["lm_head"] == 4 * f32["lm_head"] and bf16["read"] == f32["read"]


def test_projections_from_saved_rates_with_float32_layers(tmp_path):
    """``--rates`` reuses a run's rates (nothing measured); ``--cpu-compute float32`` runs the CPU
    column's layers at the float32 rate, so only the phases with forwards change."""
    import json
    from dataclasses import asdict

    rates = cost_model.Rates(**{**UNIT.__dict__, "bf16": 0.5, "fixed": {"eval-streamed": 1.0}})
    saved = tmp_path / "rates.json"
    saved.write_text(json.dumps({"rates": asdict(rates)}))
    out = {}
    for compute in ("bf16", "float32"):
        assert cost_model.main(["--rates", str(saved), "--cpu-compute", compute, "--json", str(tmp_path / compute)]) == 0
        out[compute] = json.loads((tmp_path / compute).read_text())
    assert out["bf16"]["rates"] == asdict(rates)
    cpu = {c: next(v for k, v in out[c]["projections"].items() if k.startswith("llama-3-8b / this CPU")) for c in out}
    assert cpu["bf16"]["eval"] > cpu["float32"]["eval"] and cpu["bf16"]["GPTQ: solve"] == cpu["float32"]["GPTQ: solve"]
    assert cpu["bf16"]["rotate: R1 objective"] == cpu["float32"]["rotate: R1 objective"]


def test_reads_take_the_uncached_share_at_the_disk_rate():
    """The first read: the cached share at ``read``, the rest at ``disk``; a read again (OptRot's passes)
    is cached when the checkpoint fits the page cache, else at ``disk`` too; no disk rate (an older rates
    file): every read at ``read``."""
    s = cost_model.SHAPES["1b"]
    n = cost_model.counts(s)
    slow_disk = cost_model.Rates(**{**UNIT.__dict__, "disk": 0.25})
    assert cost_model.phases(s, "eval-streamed", slow_disk, cached=1.0)["read"] == 2 * n["total"]
    assert cost_model.phases(s, "eval-streamed", slow_disk, cached=0.0)["read"] == 4 * 2 * n["total"]
    assert cost_model.phases(s, "eval-streamed", slow_disk, cached=0.5)["read"] == 2.5 * 2 * n["total"]
    assert cost_model.phases(s, "eval-streamed", UNIT, cached=0.0)["read"] == 2 * n["total"]
    fits = cost_model.phases(s, "rotate-optrot-streamed", slow_disk, evaluations={"R1": 3, "R2": 0}, cached=0.0)
    again = 2 * n["total"] + 3 * 2 * n["layers"]
    assert fits["read"] == 4 * 2 * n["total"] + again
    small = cost_model.Rates(**{**slow_disk.__dict__, "cache_bytes": 2 * n["total"] - 1})
    assert not cost_model.fits_cache(s, small) and cost_model.fits_cache(s, slow_disk)
    spill = cost_model.phases(s, "rotate-optrot-streamed", small, evaluations={"R1": 3, "R2": 0}, cached=0.0)
    assert spill["read"] == 4 * (2 * n["total"] + again)


def test_a_checkpoint_larger_than_the_page_cache_is_read_from_disk_in_the_projection():
    """70B (141 GB of bf16) does not fit a 20 GiB page cache: the whole pipeline reads at the disk rate;
    8B (16 GB) fits, and is read at the cached rate."""
    rates = cost_model.Rates(**{**UNIT.__dict__, "disk": 0.5, "cache_bytes": 20 * 2 ** 30})
    big, small = cost_model.PROJECTED["70b"], cost_model.PROJECTED["8b"]
    cached = cost_model.Rates(**{**rates.__dict__, "disk": 1.0})
    assert not cost_model.fits_cache(big, rates) and cost_model.fits_cache(small, rates)
    for s, factor in ((big, 2.0), (small, 1.0)):
        ph, ref = cost_model.pipeline(s, rates, 4, 256, 3, 1024), cost_model.pipeline(s, cached, 4, 256, 3, 1024)
        assert ph["GPTQ: read + write"] - ref["GPTQ: read + write"] == pytest.approx(
            (factor - 1) * (cost_model.phases(s, "quantize-gptq-streamed", cached)["read"]
                            + cost_model.phases(s, "quantize-gptq-streamed", cached)["reload embedding"]), rel=1e-12)
