"""Per-window NLLs, the paired bootstrap and ``orthoopt compare`` (issue 21, items 1 and 2).

Tolerances: float32 figures are compared with ``rtol``/``atol`` (never equality), except where the
arithmetic is identical by construction (the same model scored twice in one process, the same seed).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from orthoopt.testing import save_planted
from orthoopt.cli import main
from orthoopt.eval import MIN_WINDOWS, compare_models, paired_bootstrap, perplexity
from orthoopt.quant import load_checkpoint, read_text, tokenize_text

from helpers import run_error, sample_text_file

WINDOWS = ["--seq-len", "32", "--max-tokens", "1024"]  # 32 windows of 32 byte tokens
FAST = ["--resamples", "2000", "--no-progress"]


def _edit_weights(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """``planted``: the tiny random decoder; ``clean``: the same with lm_head zero (uniform predictions,
    perplexity = vocabulary size); ``noisy``: ``clean`` with Gaussian noise added to lm_head and every
    projection. Noise on the logits that does not depend on the next token raises the expected NLL
    above log(vocab) (Jensen: E logsumexp(z) >= logsumexp(E z)), so ``noisy`` is worse than ``clean``.
    (Noise on the random ``planted`` model itself may help or hurt; it is no test of direction.)"""
    root = tmp_path_factory.mktemp("cmp")
    planted = save_planted(root / "planted", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    clean = _edit_weights(planted, root / "clean", lambda t: t["lm_head.weight"].zero_())
    g = torch.Generator().manual_seed(0)

    def add_noise(t):
        for name, w in t.items():
            if w.ndim == 2 and "embed" not in name:
                scale = 0.05 if name == "lm_head.weight" else 0.5 * float(w.std())
                t[name] = w + scale * torch.randn(w.shape, generator=g)

    return {"planted": planted, "clean": clean, "noisy": _edit_weights(clean, root / "noisy", add_noise)}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    return sample_text_file(tmp_path_factory.mktemp("text") / "text.txt")


def compare(models_: dict, names: list[str], text_file: Path, **kw) -> dict:
    kw = {"seq_len": 32, "max_tokens": 1024, "resamples": 2000, "progress": False, **kw}
    return compare_models(models_[names[0]], [models_[n] for n in names[1:]], read_text(text_file), **kw)


# ------------------------------------------------------------------ 1. per-window losses
def test_window_nll_matches_a_direct_per_window_loop(models, text_file):
    model, tok = load_checkpoint(models["planted"])
    ids = tokenize_text(read_text(text_file), tok)
    got = perplexity(model, ids, seq_len=32, max_tokens=1000, batch_size=3, progress=False)
    direct = []
    with torch.no_grad():
        for w in range(1000 // 32):  # 31 windows; the 8-token tail is dropped
            window = ids[w * 32 : (w + 1) * 32]
            logits = model(window[None]).logits[0].float()
            direct.append(float(F.cross_entropy(logits[:-1], window[1:])))
    assert got["windows"] == 31 and len(got["window_nll"]) == 31
    # float32 logits; batching 3 windows per forward and float64 vs float32 averaging: rounding only
    np.testing.assert_allclose(got["window_nll"], direct, rtol=1e-5, atol=1e-6)
    assert np.ptp(direct) > 0.05  # the windows differ: an order or offset mistake would show


def test_exp_of_mean_window_nll_is_the_perplexity(models, text_file):
    model, tok = load_checkpoint(models["planted"])
    got = perplexity(model, tok, text=read_text(text_file), seq_len=32, max_tokens=1024, batch_size=4, progress=False)
    # ppl sums float32 per-batch totals; window_nll averages in float64: they agree to ~1e-7
    assert math.exp(float(np.mean(got["window_nll"]))) == pytest.approx(got["ppl"], rel=1e-6)
    assert float(np.mean(got["window_nll"])) == pytest.approx(got["nll"], rel=1e-6)


def test_eval_json_has_window_nll(capsys, models, text_file):
    capsys.readouterr()
    assert main(["eval", str(models["planted"]), "--text", str(text_file), *WINDOWS, "--json", "--no-progress"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["window_nll"]) == record["windows"] == 32
    assert math.exp(float(np.mean(record["window_nll"]))) == pytest.approx(record["ppl"], rel=1e-6)


# ------------------------------------------------------------------ 2. the paired bootstrap
def test_bootstrap_interval_covers_the_true_difference_about_95_percent_of_the_time():
    """1,000 simulated comparisons with a known mean difference of 0.02 nats: windows vary a lot (sd
    0.5 nats) but the two models' difference little (sd 0.05), as for a model and its quantization.
    An unpaired bootstrap would be ~10x wider and cover nearly always; a 90% interval would cover ~90%."""
    rng = np.random.default_rng(12345)
    experiments, n, delta = 1000, 50, 0.02
    ref = 3.0 + 0.5 * rng.standard_normal((experiments, n))
    nll = ref + delta + 0.05 * rng.standard_normal((experiments, n))
    covered = 0
    for e in range(experiments):
        interval = paired_bootstrap(ref[e], nll[e], resamples=1000, seed=e)
        covered += interval.low_diff <= delta <= interval.high_diff
    assert 0.92 <= covered / experiments <= 0.98, covered


def test_bootstrap_pairs_windows_and_is_reproducible():
    rng = np.random.default_rng(7)
    ref = 3.0 + 0.5 * rng.standard_normal(100)
    shifted = ref + 0.01 + 0.002 * rng.standard_normal(100)  # tiny shift, huge window spread
    interval = paired_bootstrap(ref, shifted, resamples=10_000, seed=3)
    assert interval.verdict == "higher" and 1 < interval.ci95[0] < interval.ratio < interval.ci95[1]
    assert interval.ratio == pytest.approx(math.exp(np.mean(shifted) - np.mean(ref)), rel=1e-12)
    assert paired_bootstrap(shifted, ref, resamples=10_000, seed=3).verdict == "lower"
    assert paired_bootstrap(ref, shifted, resamples=10_000, seed=3) == interval  # same seed, same draws
    other = paired_bootstrap(ref, shifted, resamples=10_000, seed=4)
    assert other != interval and other.mean_diff == interval.mean_diff
    same = paired_bootstrap(ref, ref, resamples=100, seed=0)
    assert (same.ratio, same.ci95, same.verdict) == (1.0, (1.0, 1.0), "not separated")


def test_bootstrap_refuses_bad_input():
    ok = np.zeros(MIN_WINDOWS)
    with pytest.raises(ValueError, match="at least 20 windows"):
        paired_bootstrap(ok[:-1], ok[:-1])
    with pytest.raises(ValueError, match="same windows"):
        paired_bootstrap(ok, np.zeros(MIN_WINDOWS + 1))
    with pytest.raises(ValueError, match="non-finite.*window 3"):
        paired_bootstrap(ok, np.where(np.arange(MIN_WINDOWS) == 3, np.nan, 0.0))
    for bad in (0, -5, 2.5, float("nan"), True):
        with pytest.raises(ValueError, match="resamples must be a positive integer"):
            paired_bootstrap(ok, ok, resamples=bad)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        paired_bootstrap(ok, ok, seed=-1)


# ------------------------------------------------------------------ 3. compare_models on tiny models
def test_a_model_compared_with_itself_has_ratio_one(models, text_file):
    record = compare(models, ["planted", "planted"], text_file)
    (entry,) = record["models"]
    # the same model scored twice in one process: identical arithmetic, so exactly 1
    assert entry["window_nll"] == record["reference"]["window_nll"]
    assert entry["ratio"] == 1.0 and entry["ci95"][0] <= 1.0 <= entry["ci95"][1]
    assert entry["verdict"] == "not separated" and entry["ppl"] == record["reference"]["ppl"]


def test_noise_on_the_weights_is_separated_from_the_clean_model(models, text_file):
    record = compare(models, ["clean", "noisy", "clean"], text_file)
    noisy, clean = record["models"]
    assert record["reference"]["ppl"] == pytest.approx(259, rel=1e-5)  # lm_head zero: uniform over 259 tokens
    assert noisy["verdict"] == "higher" and 1 < noisy["ci95"][0] <= noisy["ratio"] <= noisy["ci95"][1]
    assert noisy["ratio"] == pytest.approx(noisy["ppl"] / record["reference"]["ppl"], rel=1e-6)
    assert clean["verdict"] == "not separated"
    reverse = compare(models, ["noisy", "clean"], text_file)["models"][0]
    assert reverse["verdict"] == "lower" and reverse["ci95"][1] < 1


def test_quantized_folders_are_scored_with_their_quant_json_hooks(capsys, tmp_path, models, text_file):
    out = tmp_path / "q"
    assert main(["quantize", str(models["planted"]), "--out", str(out), "--wbits", "4", "--abits", "8",
                 "--online-hadamard", "--json", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(text_file), *WINDOWS, "--json", "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    entry = compare_models(models["planted"], [out], read_text(text_file), seq_len=32, max_tokens=1024,
                           resamples=100, progress=False)["models"][0]
    assert entry["quant"]["act"]["online_hadamard"] is True
    assert entry["ppl"] == pytest.approx(evaluated["ppl"], rel=1e-9)


def test_a_model_with_another_tokenization_is_refused(tmp_path, models, text_file):
    other = shutil.copytree(models["planted"], tmp_path / "lowercase")
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}  # the same model; capitals become other tokens
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="tokenizes the text differently"):
        compare_models(models["planted"], [other], read_text(text_file), seq_len=32, max_tokens=1024,
                       resamples=100, progress=False)


# ------------------------------------------------------------------ 4. the command line
def test_cli_text_and_json_outputs(capsys, models, text_file):
    argv = ["compare", str(models["clean"]), str(models["noisy"]), str(models["clean"]), "--text", str(text_file),
            *WINDOWS, *FAST]
    capsys.readouterr()
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"reference {models['clean']}: perplexity 259.0")
    assert lines[0].endswith("on 32 windows of 32 tokens")
    assert lines[1] == "paired bootstrap over windows: 2000 resamples, seed 0"
    assert lines[2].split() == ["model", "ppl", "ratio", "95%", "CI", "of", "ratio", "verdict"]
    assert len(lines) == 5 and lines[3].startswith(str(models["noisy"])) and lines[3].endswith("higher")
    assert lines[4].endswith("not separated") and " 1.0000 " in lines[4]

    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    record = json.loads(out)
    assert list(record)[:2] == ["reference", "text"] and record["text"] == str(text_file)
    assert (record["windows"], record["seq_len"], record["resamples"], record["seed"]) == (32, 32, 2000, 0)
    assert record["reference"]["model"] == str(models["clean"]) and len(record["reference"]["window_nll"]) == 32
    assert [m["model"] for m in record["models"]] == [str(models["noisy"]), str(models["clean"])]
    for m in record["models"]:
        assert {"model", "ppl", "ratio", "ci95", "verdict"} <= set(m) and len(m["ci95"]) == 2
        assert m["ci95"][0] <= m["ratio"] <= m["ci95"][1]


def test_help_texts_render(capsys):
    for argv in (["--help"], ["compare", "--help"]):  # argparse %-formats help strings
        assert main(argv) == 0
    assert "95% intervals" in capsys.readouterr().out


def test_cli_seed_makes_the_interval_reproducible(capsys, models, text_file):
    def interval(seed: str) -> list[float]:
        capsys.readouterr()
        assert main(["compare", str(models["clean"]), str(models["noisy"]), "--text", str(text_file), *WINDOWS,
                     *FAST, "--seed", seed, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["models"][0]["ci95"]

    first = interval("5")
    assert interval("5") == first and interval("6") != first


def test_too_few_windows_is_refused_with_exit_2(capsys, models, text_file):
    base = ["compare", str(models["clean"]), str(models["noisy"]), "--text", str(text_file), "--no-progress"]
    err = run_error(capsys, [*base, "--seq-len", "32", "--max-tokens", str(32 * MIN_WINDOWS - 1)])
    assert f"{MIN_WINDOWS - 1} evaluation window(s) of 32 tokens" in err and f"at least {MIN_WINDOWS}" in err
    capsys.readouterr()
    assert main([*base, "--seq-len", "32", "--max-tokens", str(32 * MIN_WINDOWS), "--resamples", "100"]) == 0


@pytest.mark.parametrize("flag, value, message", [
    ("--resamples", "0", "argument --resamples: must be an integer >= 1"),
    ("--resamples", "-3", "argument --resamples: must be an integer >= 1"),
    ("--seed", "-1", "argument --seed: must be an integer >= 0"),
    ("--seq-len", "1", "argument --seq-len: must be an integer >= 2"),
    ("--max-tokens", "0", "argument --max-tokens: must be an integer >= 1"),
    ("--batch-size", "0", "argument --batch-size: must be an integer >= 1"),
])
def test_bad_flag_values_are_exit_2_naming_the_flag(capsys, models, text_file, flag, value, message):
    err = run_error(capsys, ["compare", str(models["clean"]), str(models["noisy"]), "--text", str(text_file),
                             "--no-progress", flag, value])
    assert message in err


def test_non_numbers_missing_models_and_texts_are_refused(capsys, tmp_path, models, text_file):
    base = ["compare", str(models["clean"]), str(models["noisy"]), "--text", str(text_file), "--no-progress"]
    capsys.readouterr()
    assert main([*base, "--resamples", "nan"]) == 2  # argparse: "argument --resamples: ..."
    assert "argument --resamples" in capsys.readouterr().err
    missing = tmp_path / "no-such-model"
    err = run_error(capsys, ["compare", str(models["clean"]), str(missing), "--text", str(text_file), *WINDOWS])
    assert "no-such-model" in err and "compare: [1/" not in err  # refused before the reference is scored
    assert "text file not found" in run_error(capsys, [*base[:4], str(tmp_path / "none.txt"), "--no-progress"])
