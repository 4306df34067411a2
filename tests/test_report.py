"""``report.md`` of ``orthoopt quantize``: settings, the perplexities ``orthoopt compare`` measures on the
written folders, time per phase, and the pictures it embeds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import orthoopt
from orthoopt.cli import main
from orthoopt.eval import compare_models
from orthoopt.jobs.report import PICTURES, REPORT_FILE
from orthoopt.quant.calib import read_text

from helpers import run_error, sample_text_file

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tiny_llama) -> Path:
    return tiny_llama


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return sample_text_file(tmp_path_factory.mktemp("t") / "eval.txt", chars=8000)


def embedded(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


def test_the_report_has_the_perplexities_compare_measures_on_the_written_folders(tmp_path, model_dir, text):
    out = tmp_path / "q"
    result = orthoopt.oneshot(str(model_dir), out=out, rotate={"method": "optrot", "solve": {"steps": 3}}, quantize={
        "wbits": 3, "group_size": 32, "format": "orthoopt"}, eval_text=text, eval_seq_len=32, eval_max_tokens=1024,
        progress=False)
    ev = result.evaluation
    assert ev["windows"] == 32 and ev["seq_len"] == 32
    ref = compare_models(model_dir, [out], read_text(text), seq_len=32, max_tokens=1024, progress=False)
    assert ev["float"] == pytest.approx(ref["reference"]["ppl"], rel=1e-6, abs=0)
    entry = ref["models"][0]
    assert ev["quantized"] == pytest.approx(entry["ppl"], rel=1e-6, abs=0)
    assert ev["ratio"] == pytest.approx(entry["ratio"], rel=1e-6, abs=0)
    assert ev["ci95"] == pytest.approx(entry["ci95"], rel=1e-6, abs=0) and ev["verdict"] == entry["verdict"]
    report = (out / REPORT_FILE).read_text()
    assert f"| float (input) | {ev['float']:.6g} |" in report and f"| quantized | {ev['quantized']:.6g} |" in report
    assert f"**{ev['ratio']:.5g}**, 95% interval [{ev['ci95'][0]:.5g}, {ev['ci95'][1]:.5g}]" in report
    assert "| rotation | optrot (R1, R2) |" in report and "| weights | 3-bit symmetric, groups of 32 |" in report
    for phase in ("load", "eval float", "rotate", "quantize", "eval quantized", "write", "report"):
        assert re.search(rf"\| {phase} \| \d+\.\d \|", report), phase
    pictures = embedded(report)
    assert pictures == [*PICTURES, "loss_R1.png", "loss_R2.png"]
    for name in pictures:
        assert (out / name).read_bytes().startswith(PNG), name


def test_without_a_rotation_or_eval_text_the_report_says_so(tmp_path, model_dir):
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--out", str(out), "--scheme", "W4A16_ASYM", "--group-size", "32",
                 "--no-progress"]) == 0
    report = (out / REPORT_FILE).read_text()
    assert "Not measured: pass `--eval-text TEXT_FILE`" in report and "| rotation | none |" in report
    assert "| scheme | W4A16_ASYM |" in report and "| format | compressed-tensors |" in report
    assert embedded(report) == list(PICTURES)  # no solver, no loss curve
    assert not list(out.glob("loss_*"))


def test_too_short_an_eval_text_is_refused_before_the_rotation(capsys, tmp_path, model_dir, text, monkeypatch):
    import orthoopt.pipeline as pipeline

    monkeypatch.setattr(pipeline, "rotate_model", lambda *a, **k: pytest.fail("rotated before refusing"))
    err = run_error(capsys, ["quantize", str(model_dir), "--out", str(tmp_path / "o"), "--rotate", "optrot",
                             "--eval-text", str(text), "--eval-seq-len", "512", "--no-progress"])
    assert "too few for a paired bootstrap interval" in err
    err = run_error(capsys, ["quantize", str(model_dir), "--out", str(tmp_path / "o"), "--eval-text",
                             str(tmp_path / "none.txt"), "--no-progress"])
    assert "--eval-text file not found" in err
    assert not (tmp_path / "o").exists()
