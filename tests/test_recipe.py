"""``orthoopt quantize MODEL --recipe FILE.yaml``: a recipe gives what the flags give; every bad key is
named; the example recipes are valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orthoopt.testing import save_planted
from orthoopt.cli import main
from orthoopt.jobs.recipe import load_recipe
from orthoopt.jobs.settings import QuantizeSettings
from orthoopt.quant.calib_source import CalibSource

from helpers import run_error, sample_text_file

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_planted(tmp_path_factory.mktemp("m") / "tiny", hidden_size=128, num_layers=1, num_heads=4,
                        intermediate_size=256)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_a_recipe_gives_what_the_flags_give(tmp_path, model_dir):
    text = sample_text_file(tmp_path / "calib.txt", chars=6000)
    recipe = write(tmp_path, """
version: 1
rotate: {method: optrot, solve: {steps: 3, checkpoint_every: 25}, seed: 2}
quantize:
  scheme: W4A16
  method: gptq
  nsamples: 4
  seq_len: 64
  seed: 2
calib: calib.txt        # relative to the recipe's folder
""")
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "r"), "--recipe", str(recipe),
                 "--no-progress"]) == 0
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "f"), "--rotate", "optrot", "--steps", "3",
                 "--seed", "2", "--scheme", "W4A16", "--method", "gptq", "--nsamples", "4", "--seq-len", "64",
                 "--calib", str(text), "--no-progress"]) == 0
    a, b = load_file(tmp_path / "r" / "model.safetensors"), load_file(tmp_path / "f" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "r" / "report.md").is_file()


def test_the_recipe_is_read_into_oneshot_arguments(tmp_path):
    recipe = write(tmp_path, """
rotate: {method: spinquant, solve: {steps: 5}, rotations: [R1], init: rot}
quantize: {scheme: w4a8, group_size: 64}
calib: {source: "hf:org/data:cfg", split: validation, text_column: body}
eval: {text: eval.txt, max_tokens: 4096}
""")
    kw = load_recipe(recipe)
    assert kw["rotate"] == {"method": "spinquant", "solve": {"steps": 5}, "rotations": ["R1"]}
    assert kw["init"] == str(tmp_path / "rot") and kw["eval_text"] == str(tmp_path / "eval.txt")
    assert kw["quantize"] == QuantizeSettings(scheme="w4a8", group_size=64)
    assert kw["calib"] == CalibSource("hf:org/data:cfg", "validation", "body")
    assert (kw["eval_seq_len"], kw["eval_max_tokens"]) == (None, 4096)


@pytest.mark.parametrize("text,message", [
    ("quantise: {scheme: W4A16}", "unknown key 'quantise'; known keys: version, rotate, quantize, calib, eval"),
    ("quantize: {wbit: 4}", "quantize: unknown key 'wbit'; known keys: scheme, method"),
    ("quantize: {wbits: four}", "quantize.wbits must be int or null, got 'four'"),
    ("quantize: {sym: 1}", "quantize.sym must be bool or null, got 1"),
    ("quantize: {scheme: W9A9}", "quantize: unknown scheme 'W9A9'"),
    ("quantize: {method: awq}", "quantize: --method must be one of rtn, gptq"),
    ("rotate: {solve: {steps: 3}}", "rotate needs a method"),
    ("rotate: {method: optrot, step: 3}", "rotate: unknown key 'step'"),
    ("rotate: {method: optrot, solve: {steps: -1}}", "rotate: steps must be an int >= 0"),
    ("rotate: {method: optrot, solve: {step: 3}}", "rotate: solve has unknown fields"),
    ("rotate: {method: optrot, steps: 3}", "rotate: unknown key 'steps'"),
    ("rotate: {method: turbo}", "unknown rotation method 'turbo'"),
    ("calib: {source: a.txt, split: train}", "calib.split and calib.text_column are for a dataset"),
    ("calib: {file: a.txt}", "calib: unknown key 'file'; known keys: source, split, text_column"),
    ("eval: {text: e.txt, windows: 3}", "eval: unknown key 'windows'"),
    ("eval: {text: e.txt, seq_len: '2048'}", "eval.seq_len must be int, got '2048'"),
    ("version: 2", "version must be 1, got 2"),
    ("- rotate", "must be a mapping"),
    ("", "is empty"),
    ("quantize: {scheme: [", "is not valid YAML"),
])
def test_a_bad_recipe_names_the_key(tmp_path, text, message):
    recipe = write(tmp_path, text)
    with pytest.raises(ValueError) as e:
        load_recipe(recipe)
    assert str(e.value).startswith(f"recipe {recipe}") and message in str(e.value), str(e.value)


def test_the_command_refuses_a_bad_recipe_and_settings_flags_next_to_one(capsys, tmp_path, model_dir):
    recipe = write(tmp_path, "quantize: {scheme: W4A16, wbitz: 3}\n")
    out = tmp_path / "o"
    err = run_error(capsys, ["quantize", str(model_dir), "--out", str(out), "--recipe", str(recipe), "--no-progress"])
    assert "unknown key 'wbitz'" in err
    recipe = write(tmp_path, "quantize: {scheme: W4A16}\n")
    err = run_error(capsys, ["quantize", str(model_dir), "--out", str(out), "--recipe", str(recipe),
                             "--steps", "5", "--wbits", "3", "--no-progress"])
    assert "--wbits, --steps given with --recipe: put the setting in the recipe file" in err or \
        "--steps, --wbits given with --recipe" in err, err
    err = run_error(capsys, ["quantize", str(model_dir), "--out", str(out), "--recipe", str(tmp_path / "no.yaml"),
                             "--no-progress"])
    assert "recipe file not found" in err
    assert not out.exists()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_example_recipes_are_valid(path):
    kw = load_recipe(path)
    assert kw["rotate"]["method"] and kw["quantize"].scheme
