"""Smoke test of benchmarks/rounding_sensitivity.py on a tiny planted model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from orthoopt.testing import save_planted
from orthoopt.manifold import orthogonality_error

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"
sys.path.insert(0, str(BENCH))

import rounding_sensitivity  # noqa: E402


def test_near_identity_is_orthogonal_and_within_eps():
    Q = rounding_sensitivity.near_identity(48, 1e-14, seed=1)
    assert orthogonality_error(Q) < 1e-13
    moved = float((Q - torch.eye(48, dtype=torch.float64)).abs().max())
    assert 0 < moved < 1e-13


@pytest.mark.skipif(not TEXT.is_file(), reason=f"shared WikiText file missing: {TEXT}")
def test_variants_are_the_same_rotation_to_rounding_and_every_cell_is_measured(tmp_path, capsys):
    model = save_planted(tmp_path / "tiny", arch="llama", hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, seed=3)
    out = tmp_path / "rs.json"
    assert rounding_sensitivity.main(["--model", str(model), "--text", str(TEXT), "--draws", "2",
                                      "--eval-tokens", "256", "--seq-len", "32",
                                      "--cells", "W4A16 RTN,W4A4KV4 RTN", "--json", str(out)]) == 0
    table = json.loads(out.read_text())["table"]
    assert list(table) == ["exact", "re-projected", "draw 1", "draw 2"]
    assert table["exact"]["max |R - R_exact|"] == 0
    for name in ("draw 1", "draw 2"):
        assert 0 < table[name]["max |R - R_exact|"] < 1e-12
    for row in table.values():
        assert all(row[c] > 1 for c in ("W4A16 RTN", "W4A4KV4 RTN"))  # perplexities, finite and measured
    printed = capsys.readouterr().out
    assert "| spread (max/min - 1) |" in printed


def test_unknown_cells_are_refused():
    with pytest.raises(SystemExit):
        rounding_sensitivity.main(["--cells", "W3A3 RTN"])


@pytest.mark.skipif(not TEXT.is_file(), reason=f"shared WikiText file missing: {TEXT}")
def test_json_over_an_input_is_refused_before_any_work(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    before = text.read_bytes()
    with pytest.raises(ValueError, match="--json .* is the input --text"):
        rounding_sensitivity.main(["--model", str(tmp_path / "missing"), "--text", str(text), "--json", str(text)])
    assert text.read_bytes() == before
