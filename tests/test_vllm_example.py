"""examples/vllm_load.py without vLLM: its windows, its transformers reference and its comparison.

vLLM itself is not installed in CI (it pins its own transformers; docs/export.md runs the script in a
separate venv). Here vLLM's scorer is replaced by the transformers one, so the comparison must come
out exact in float32 and at bfloat16 rounding otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed (pip install 'orthoopt[export]')")

from orthoopt.testing import save_planted  # noqa: E402
from orthoopt.cli import main  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"
sys.path.insert(0, str(EXAMPLES))

import vllm_load  # noqa: E402

pytestmark = pytest.mark.skipif(not TEXT.is_file(), reason=f"shared WikiText file missing: {TEXT}")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("v")
    model = save_planted(root / "tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, seed=5)
    out = root / "w4"
    assert main(["quantize", str(model), "--out", str(out), "--group-size", "16", "--format", "compressed-tensors",
                 "--no-progress"]) == 0
    return out


def run(export: Path, monkeypatch, capsys, dtype: str, w4a8: str | None = None) -> dict:
    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", "-")  # records the caller's value, restored after the test
    if w4a8 is None:
        monkeypatch.delenv("VLLM_CPU_INT4_W4A8")
    else:
        monkeypatch.setenv("VLLM_CPU_INT4_W4A8", w4a8)
    monkeypatch.setattr(vllm_load, "vllm_logprobs", lambda d, w, dt: vllm_load.transformers_logprobs(d, w, dt))
    vllm_load.main([str(export), "--text", str(TEXT), "--windows", "2", "--seq-len", "32", "--dtype", dtype, "--json"])
    return json.loads(capsys.readouterr().out)


def test_same_engine_in_float32_agrees_exactly(export, monkeypatch, capsys):
    r = run(export, monkeypatch, capsys, "float32")
    assert r["positions"] == 2 * 31
    assert r["vllm"]["max_abs_logprob_diff"] == 0 and r["vllm"]["top1_agreement"] == 1.0
    assert r["vllm"]["ppl"] == pytest.approx(r["ppl_reference"], rel=1e-12)
    assert "transformers_float32" not in r


def test_bfloat16_differs_by_rounding_and_has_its_yardstick(export, monkeypatch, capsys):
    r = run(export, monkeypatch, capsys, "bfloat16")
    for name in ("vllm", "transformers_bfloat16"):
        assert 0 < r[name]["mean_abs_logprob_diff"] < 0.1
        assert r[name]["ppl"] == pytest.approx(r["ppl_reference"], rel=0.05)
    assert r["VLLM_CPU_INT4_W4A8"] == "0"  # W4A16 as the checkpoint says, unless the caller set it
    assert run(export, monkeypatch, capsys, "bfloat16", w4a8="1")["VLLM_CPU_INT4_W4A8"] == "1"


def test_too_short_text_and_missing_folder_are_named(tmp_path, export):
    short = tmp_path / "t.txt"
    short.write_text("a few words\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="fewer than"):
        vllm_load.main([str(export), "--text", str(short)])
    with pytest.raises(SystemExit, match="no config.json"):
        vllm_load.main([str(tmp_path / "nothing"), "--text", str(short)])
