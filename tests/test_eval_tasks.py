"""``orthoopt eval --tasks``: lm-eval-harness when installed (a local task YAML), a clear error when not."""

from __future__ import annotations

import importlib.util
import json

import pytest

from orthoopt.testing import save_planted
from orthoopt.cli import main

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_planted(tmp_path_factory.mktemp("m") / "tiny", hidden_size=64, num_layers=2, num_heads=4,
                        intermediate_size=128)


def test_eval_needs_text_or_tasks(tiny, capsys):
    assert main(["eval", str(tiny), "--no-progress"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


@pytest.mark.skipif(HAS_LM_EVAL, reason="lm-eval is installed here")
def test_tasks_without_lm_eval_name_what_is_missing(tiny, capsys):
    assert main(["eval", str(tiny), "--tasks", "piqa", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lm-eval" in err and 'pip install "orthoopt[eval]"' in err


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval not installed (pip install 'orthoopt[eval]')")
def test_local_task_yaml_runs_and_a_missing_file_is_named(tiny, tmp_path, capsys):
    rows = [{"question": f"Question {i}: pick one.", "choices": [" yes", " no"], "label": i % 2} for i in range(4)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "local_mc.yaml"
    task.write_text(
        "task: orthoopt_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    higher_is_better: true\n"
    )
    capsys.readouterr()
    assert main(["eval", str(tiny), "--tasks", str(task), "--json", "--no-progress"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    acc = record["tasks"]["orthoopt_local_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and acc * 4 == int(acc * 4)  # a fraction of the 4 examples
    assert main(["eval", str(tiny), "--tasks", str(tmp_path / "nope.yaml"), "--no-progress"]) == 2
    assert "task file not found" in capsys.readouterr().err
