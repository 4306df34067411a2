"""benchmarks/instrument.py: the variance split on data whose parts are known, the draws rule, and a
smoke run (tiny planted model) that writes only the given page and resumes from its record."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import instrument  # noqa: E402

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"


def simulated(k: int, n: int, draw_sd: float, window_sd: float, residual_sd: float, seed: int):
    rng = np.random.default_rng(seed)
    diff = (0.01 + draw_sd * rng.standard_normal((k, 1)) + window_sd * rng.standard_normal((1, n))
            + residual_sd * rng.standard_normal((k, n)))
    ref = rng.standard_normal((k, n)) + 3.0
    return ref, ref + diff


def test_decompose_recovers_known_variance_parts():
    # many draws and windows: the ANOVA estimates are within a few percent of the planted variances
    ref, other = simulated(400, 400, draw_sd=0.02, window_sd=0.05, residual_sd=0.03, seed=1)
    parts = instrument.decompose(ref, other)
    assert parts["draw_var"] == pytest.approx(0.02 ** 2, rel=0.2)
    assert parts["window_var"] == pytest.approx(0.05 ** 2, rel=0.2)
    assert parts["residual_var"] == pytest.approx(0.03 ** 2, rel=0.05)
    assert parts["mean"] == pytest.approx(0.01, abs=0.01)


def test_decompose_one_draw_has_no_draw_variance():
    ref, other = simulated(1, 50, draw_sd=0.02, window_sd=0.05, residual_sd=0.0, seed=2)
    parts = instrument.decompose(ref, other)
    assert math.isnan(parts["draw_var"]) and parts["window_var"] > 0
    assert instrument.draws_needed(parts, 50) is None


def test_draws_needed_follows_the_half_width_formula():
    parts = {"draw_var": 0.01 ** 2, "window_var": 0.0, "residual_var": 0.0}
    k = instrument.draws_needed(parts, 100)
    # 1.96 * 0.01 / sqrt(K) <= log(1.02)  <=>  K >= (1.96 * 0.01 / log 1.02)^2 = 0.981
    assert k == math.ceil((1.96 * 0.01 / math.log(1.02)) ** 2)
    parts["draw_var"] = 0.05 ** 2
    assert instrument.draws_needed(parts, 100) == math.ceil((1.96 * 0.05 / math.log(1.02)) ** 2)
    # a window part wider than the target alone: no number of draws is enough
    assert instrument.draws_needed({"draw_var": 0.0, "window_var": 0.2 ** 2, "residual_var": 0.0}, 100) is None


def test_parse_calib_refuses_malformed_items():
    assert instrument.parse_calib("16x256,8x2048") == ((16, 256), (8, 2048))
    with pytest.raises(ValueError, match="WINDOWSxTOKENS"):
        instrument.parse_calib("16-256")
    with pytest.raises(ValueError, match="windows must be"):
        instrument.parse_calib("0x256")


@pytest.mark.skipif(not TEXT.is_file(), reason="needs ../shared/data/wikitext2-test.txt")
def test_quick_run_writes_page_and_resumes_from_record(tmp_path, capsys):
    record, page = tmp_path / "record", tmp_path / "page.md"
    argv = ["--quick", "--no-progress", "--text", str(TEXT), "--record", str(record), "--results", str(page)]
    assert instrument.main(argv) == 0
    units = sorted(p.name for p in record.glob("*-seed*.json"))
    assert len(units) == 2 * 2 * 2  # methods x draws x calibration settings
    text = page.read_text()
    for heading in ("## Perplexity over draws, by calibration", "## OptRot / Hadamard, by calibration",
                    "## Calibration against calibration, per method", "## By evaluation size"):
        assert heading in text
    # one row per method for the one pair of calibration settings, with its interval and verdict
    pairs = [line for line in text.splitlines() if line.startswith(("| optrot | 4x32 | 8x64 |", "| hadamard | 4x32 | 8x64 |"))]
    assert len(pairs) == 2 and all(line.rstrip(" |").endswith(("lower", "higher", "not separated")) for line in pairs)
    # the first calibration setting is scored on more windows than the others
    first = json.loads((record / "optrot-seed0-4x32.json").read_text())
    other = json.loads((record / "optrot-seed0-8x64.json").read_text())
    assert len(first["window_nll"]) > len(other["window_nll"]) == 20
    # a rerun finds every unit recorded and computes nothing: the files are untouched
    stamps = {p: p.stat().st_mtime_ns for p in record.glob("*.json")}
    capsys.readouterr()
    assert instrument.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in record.glob("*.json")} == stamps
    assert "ppl" not in capsys.readouterr().err  # no unit ran
    # a page rendered later shows the run that made the record, not the render
    header = json.loads((record / "header.json").read_text())
    assert "--render" not in header["command"] and header["wall"] != "(rendered only)"
    assert instrument.main([*argv, "--render"]) == 0
    assert page.read_text().startswith(instrument.render(instrument.resolve(instrument.parse_args(argv)),
                                                         instrument.read_record(record), header))
    # a record made with other settings is refused, not mixed in
    with pytest.raises(ValueError, match="other settings"):
        instrument.main([*argv, "--seed", "5"])
