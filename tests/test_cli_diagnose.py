"""``orthoopt diagnose`` end to end on two tiny saved models: a planted-outlier model and its copy
with fused norms and random-Hadamard rotations (run in-process through ``orthoopt.cli.main``)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import matplotlib.image
import pytest
import torch

from orthoopt.adapters import DecoderAdapter
from orthoopt.models import load_model, load_tokenizer, save_rotated
from orthoopt.testing import save_planted
from orthoopt.cli import main
from orthoopt.diagnostics.plots import DPI, channels, histogram, layer_bars
from orthoopt.hadamard import random_hadamard
from orthoopt.quant.calib import read_text, tokenize_text

TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "outlier_channels": 2,
        "outlier_scale": 30.0}
CALIB_TOKENS = 300
SEQ_LEN = 128
TEXT = " ".join(f"Sentence number {i} talks about rotations, outliers and quantization." for i in range(40))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnose")
    orig = save_planted(root / "planted", **TINY)
    model = load_model(orig)
    adapter = DecoderAdapter(model)
    adapter.fuse_norms()
    rotations = {"R1": random_hadamard(64, seed=1)}
    rotations.update({f"R2.{i}": random_hadamard(16, seed=10 + i) for i in range(2)})
    adapter.apply_rotations(rotations)
    rot = save_rotated(model, load_tokenizer(orig), root / "hadamard", rotations, {"init": "hadamard"})
    text = root / "calib.txt"
    text.write_text(TEXT)
    return root, orig, rot, text


@pytest.fixture(scope="module")
def diagnosed(models):
    """Run ``orthoopt diagnose`` once on both models with calibration; ``(rc, stdout, out folder)``."""
    root, orig, rot, text = models
    out = root / "out"
    out.mkdir()  # a previous diagnose output: replaced as a whole
    (out / "summary.json").write_text("{}")
    (out / "stale.png").write_bytes(b"old")
    argv = ["diagnose", str(orig), str(rot), "--out", str(out), "--calib", str(text),
            "--calib-tokens", str(CALIB_TOKENS), "--seq-len", str(SEQ_LEN), "--labels", "original,rotated",
            "--json", "--no-progress"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(argv)
    return rc, stdout.getvalue(), out


def test_diagnose_writes_plots_and_summary(models, diagnosed):
    _, orig, rot, _ = models
    rc, stdout, out = diagnosed
    assert rc == 0
    printed = json.loads(stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert printed == summary
    assert [m["label"] for m in summary["models"]] == ["original", "rotated"]

    # plots: every listed file exists; PNGs have the documented pixel size and are not flat
    stems = ["activation_channels", "activation_heatmap", "activation_layers", "weight_channels", "weight_histogram",
             "weight_layers"]
    assert sorted(summary["plots"]) == sorted(f"{s}.{e}" for s in stems for e in ("png", "svg"))
    sizes = {"weight_layers": layer_bars.SIZE, "activation_layers": layer_bars.SIZE,
             "weight_histogram": histogram.SIZE, "activation_channels": channels.SIZE,
             "activation_heatmap": channels.SIZE, "weight_channels": channels.SIZE}
    for stem, (w, h) in sizes.items():
        img = matplotlib.image.imread(out / f"{stem}.png")
        assert img.shape[:2] == (round(h * DPI), round(w * DPI)), stem
        assert img[..., :3].std() > 0.01, stem
        assert "</svg>" in (out / f"{stem}.svg").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(summary["plots"] + ["summary.json"])  # no stale.png

    # weight numbers match a direct float64 recomputation from the stored weights
    for record, path in zip(summary["models"], (orig, rot)):
        weights = dict(load_model(path).named_parameters())
        blocks = {b["name"]: b for b in record["weights"]["blocks"]}
        assert len(blocks) == 1 + 2 * 7 + 1  # embedding, 7 linears per layer, untied lm_head
        for name in ("layers.1.mlp.down_proj", "embed_tokens", "lm_head"):
            key = name if name == "lm_head" else f"model.{name}"
            W = weights[f"{key}.weight"].detach().double()
            assert blocks[name]["max_abs"] == W.abs().max().item()
            mu = W.abs().max().item() * math.sqrt(W.numel()) / torch.linalg.norm(W).item()
            assert blocks[name]["incoherence"] == pytest.approx(mu, rel=1e-12)
            assert blocks[name]["fourth_power_sum"] == pytest.approx(W.pow(4).sum().item(), rel=1e-12)
        assert [r["group"] for r in record["weights"]["layers"]] == ["embed_tokens", "layers.0", "layers.1", "lm_head"]

    # the rotation removes the planted outliers: lower incoherence, kurtosis and RTN error overall
    before, after = (m["overall"] for m in summary["models"])
    assert after["incoherence_mean"] < before["incoherence_mean"] / 2
    assert after["excess_kurtosis_mean"] < before["excess_kurtosis_mean"]
    assert after["rtn_error"] < before["rtn_error"]
    assert summary["block"] == max(summary["models"][0]["weights"]["blocks"], key=lambda b: b["incoherence"])["name"]


def test_diagnose_activation_numbers_match_a_direct_capture(models, diagnosed):
    _, orig, rot, text = models
    rc, _, out = diagnosed
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    module = summary["act_module"]
    assert module.endswith(("q_proj", "gate_proj")) or module == "lm_head"  # a residual-stream reader
    roles = {r["name"]: r["role"] for r in summary["models"][0]["activations"]["inputs"]}
    assert roles["layers.1.self_attn.q_proj"] == "attn_in" and roles["layers.1.mlp.down_proj"] == "mlp_hidden"
    assert roles["layers.0.self_attn.o_proj"] == "attn_out" and roles["lm_head"] == "head_in"
    assert summary["settings"]["calib_tokens"] == CALIB_TOKENS
    for record, path in zip(summary["models"], (orig, rot)):
        model = load_model(path)
        ids = tokenize_text(read_text(text), load_tokenizer(path))[:CALIB_TOKENS]
        captured: list[torch.Tensor] = []

        def keep_input(_module, args, captured=captured):
            captured.append(args[0].reshape(-1, args[0].shape[-1]))

        target = model.get_submodule(module if module == "lm_head" else f"model.{module}")
        handle = target.register_forward_pre_hook(keep_input)
        with torch.no_grad():
            for chunk in ids.split(SEQ_LEN):
                model(input_ids=chunk.reshape(1, -1))
        handle.remove()
        X = torch.cat(captured).double()
        row = next(r for r in record["activations"]["inputs"] if module in r["modules"])
        assert row["role"] in ("attn_in", "mlp_in", "head_in")
        assert row["tokens"] == CALIB_TOKENS
        assert row["max_abs"] == pytest.approx(X.abs().max().item(), rel=1e-6)
        cmax = X.abs().amax(0)
        assert row["top_channels"][0]["channel"] == int(cmax.argmax())
    ratio = [next(r for r in m["activations"]["inputs"] if r["name"] == module)["channel_max_ratio"]
             for m in summary["models"]]
    assert ratio[1] < ratio[0]  # the rotated residual stream has no outlier channels


def test_diagnose_single_model_without_calibration_and_chosen_block(models, capsys):
    root, orig, _, _ = models
    out = root / "single"
    assert main(["diagnose", str(orig), "--out", str(out), "--block", "layers.0.self_attn.o_proj", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "planted" in printed and "wrote 3 plots" in printed  # weights only: layers, histogram, channels
    summary = json.loads((out / "summary.json").read_text())
    assert summary["block"] == "layers.0.self_attn.o_proj" and summary["act_module"] is None
    assert "activations" not in summary["models"][0]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.json"] + [f"{s}.{e}" for s in ("weight_channels", "weight_histogram", "weight_layers") for e in ("png", "svg")])


@pytest.mark.parametrize("extra, message", [
    (["--labels", "a,b,c"], "--labels needs 2"),
    (["--labels", "a,a"], "unique"),
    (["--block", "layers.9.mlp.up_proj"], "not a weight"),
    (["--calib", "missing.txt"], "calibration text not found"),
    (["--calib-tokens", "0", "--calib", "CALIB"], ">= 1"),
    (["--act-module", "lm_head"], "no calibration text"),
    (["--bits", "1"], "argument --bits: must be an integer in [2, 8], got 1"),
    (["--k", "0"], "argument --k: must be a finite number > 0, got 0"),
])
def test_diagnose_bad_arguments(models, capsys, extra, message):
    root, orig, rot, text = models
    extra = [str(text) if e == "CALIB" else e for e in extra]
    assert main(["diagnose", str(orig), str(rot), "--out", str(root / "bad"), "--no-progress", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (root / "bad").exists()


def test_diagnose_refuses_to_replace_inputs_or_foreign_folders(models, capsys):
    root, orig, _, _ = models
    before = sorted(p.name for p in orig.iterdir())
    assert main(["diagnose", str(orig), "--out", str(orig), "--no-progress"]) == 2
    assert "would replace the input" in capsys.readouterr().err
    assert sorted(p.name for p in orig.iterdir()) == before
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["diagnose", str(orig), "--out", str(foreign), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert main(["diagnose", str(root / "nowhere"), "--out", str(root / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "nowhere" in err


def test_diagnose_json_is_strict_with_an_all_zero_block(models, tmp_path, capsys):
    """An all-zero weight has no incoherence or kurtosis: its figures are null with an error, the other
    blocks and the pooled figures stay defined, and the run succeeds."""
    _, orig, _, _ = models
    model = load_model(orig)
    zeroed = "model.layers.1.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(zeroed).weight.zero_()
    folder = save_rotated(model, load_tokenizer(orig), tmp_path / "zeroed", {}, {"init": "identity"})
    out = tmp_path / "diag"
    assert main(["diagnose", str(folder), "--out", str(out), "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)  # strict: json.loads would accept NaN, so check below too
    assert "NaN" not in (out / "summary.json").read_text()
    m = summary["models"][0]
    rows = {r["name"]: r for r in m["weights"]["blocks"]}
    bad = next(r for name, r in rows.items() if name.endswith("layers.1.mlp.down_proj"))
    assert bad["incoherence"] is None and bad["rtn_error"] is None and "all-zero" in bad["error"]
    assert all(r["incoherence"] is not None for r in rows.values() if r is not bad)
    assert m["overall"]["incoherence_mean"] is not None
    assert any(name.endswith("layers.1.mlp.down_proj") for name in m["overall"]["undefined_blocks"])
