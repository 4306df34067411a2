"""benchmarks/peer_table.py: pairing models of `orthoopt compare --json` records against several references."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peer_table  # noqa: E402

from orthoopt.eval import paired_bootstrap  # noqa: E402


def record(ref_nll, models: dict[str, np.ndarray], ref="float") -> dict:
    def entry(name, nll):
        return {"model": f"runs/x/{name}", "ppl": math.exp(float(np.mean(nll))), "window_nll": list(map(float, nll))}
    return {"windows": len(ref_nll), "seq_len": 256, "reference": entry(ref, ref_nll),
            "models": [entry(k, v) for k, v in models.items()]}


@pytest.fixture
def windows():
    rng = np.random.default_rng(0)
    base = 3.5 + 0.3 * rng.standard_normal(64)
    noise = lambda: 0.01 * rng.standard_normal(64)  # noqa: E731
    return {"float": base, "oo-none-rtn": base + 0.30 + noise(), "oo-optrot-rtn": base + 0.10 + noise(),
            "peer-x-rtn": base + 0.10 + noise(), "oo-none-gptq": base + 0.20 + noise(),
            "oo-optrot-gptq": base + 0.05 + noise(), "peer-x-gptq": base + 0.15 + noise()}


def test_pairs_models_across_records_with_the_compare_bootstrap(windows):
    rec1 = record(windows["float"], {k: v for k, v in windows.items() if k.startswith("oo-")})
    rec2 = record(windows["float"], {k: v for k, v in windows.items() if k.startswith("peer-")})
    nll, ppl = peer_table.load_windows([rec1, rec2])
    rows = {r["model"]: r for r in peer_table.pair_table(nll, ppl, ["oo-none", "oo-optrot"])}
    assert set(rows) == {"oo-none-rtn", "oo-optrot-rtn", "peer-x-rtn", "oo-none-gptq", "oo-optrot-gptq", "peer-x-gptq"}
    # GPTQ rows are paired with GPTQ references only, with exactly orthoopt compare's interval
    want = paired_bootstrap(windows["oo-optrot-gptq"], windows["peer-x-gptq"], 10_000, 0)
    got = rows["peer-x-gptq"]["vs"]["oo-optrot"]
    assert got["ratio"] == want.ratio and got["ci95"] == list(want.ci95)
    assert got["verdict"] == "higher"  # +0.10 nats per token with 0.014 nats of window noise
    assert rows["peer-x-rtn"]["vs"]["oo-none"]["verdict"] == "lower"
    assert rows["peer-x-rtn"]["vs"]["oo-optrot"]["verdict"] == "not separated"  # same planted mean
    assert "oo-optrot" not in rows["oo-optrot-rtn"]["vs"]  # not compared with itself
    text = peer_table.render(list(rows.values()), ["oo-none", "oo-optrot"], ("float", ppl["float"]))
    assert "not separated" in text and text.count("\n") == 2 + 1 + 6


def test_refuses_records_scored_on_other_windows(windows):
    rec1 = record(windows["float"], {"oo-none-rtn": windows["oo-none-rtn"]})
    rec2 = record(windows["float"] + 1e-3, {"peer-x-rtn": windows["peer-x-rtn"]})
    with pytest.raises(ValueError, match="not the same evaluation"):
        peer_table.load_windows([rec1, rec2])


def test_cli_exit_2_on_mismatch(tmp_path, windows, capsys):
    import json
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(record(windows["float"], {"oo-none-rtn": windows["oo-none-rtn"]})))
    b.write_text(json.dumps(record(windows["float"][:32], {"peer-x-rtn": windows["peer-x-rtn"][:32]})))
    assert peer_table.main([str(a), str(b)]) == 2
    assert "not the same evaluation" in capsys.readouterr().err
    assert peer_table.main([str(a), "--refs", "oo-none"]) == 0


def test_peer_llmcompressor_cells_form_a_record_the_table_pairs(windows):
    import peer_llmcompressor

    def cell(key, rtn, gptq):
        return {"key": key, "rtn": math.exp(float(np.mean(windows[rtn]))), "rtn_window_nll": list(windows[rtn]),
                "gptq": math.exp(float(np.mean(windows[gptq]))), "gptq_window_nll": list(windows[gptq])}

    rows = [cell("oo-none", "oo-none-rtn", "oo-none-gptq"), cell("llmc-spinquant", "peer-x-rtn", "peer-x-gptq"),
            {"key": "oo-optrot", "rtn": 1.0, "rtn_window_nll": list(windows["oo-optrot-rtn"])}]  # GPTQ not run yet
    float_eval = {"ppl": math.exp(float(np.mean(windows["float"]))), "window_nll": list(windows["float"])}
    rec = peer_llmcompressor.compare_record(float_eval, rows, 256)
    assert [m["model"] for m in rec["models"]] == ["oo-none-rtn", "oo-none-gptq", "llmc-spinquant-rtn",
                                                   "llmc-spinquant-gptq", "oo-optrot-rtn"]
    assert rec["windows"] == 64 and rec["seq_len"] == 256 and rec["reference"]["model"] == "float"
    nll, ppl = peer_table.load_windows([rec])
    table = {r["model"]: r for r in peer_table.pair_table(nll, ppl, ["oo-none"])}
    want = paired_bootstrap(windows["oo-none-gptq"], windows["peer-x-gptq"], 10_000, 0)
    assert table["llmc-spinquant-gptq"]["vs"]["oo-none"]["ci95"] == list(want.ci95)
