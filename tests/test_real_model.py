"""Tests on the real SmolLM2-135M-Instruct, when it is in the orthoopt cache (``orthoopt fetch
smollm2-135m``; ``.ci/run`` fetches it first). Skipped otherwise, so the suite stays offline-capable.

Kept cheap (about 20 s on 2 cores): a few tokens, one fixed rotation (random Hadamard, no solve).
"""

from __future__ import annotations

import json

import pytest
import torch

from orthoopt.adapters import logits_relative_error
from orthoopt.models import cached_model, load_model, load_tokenizer
from orthoopt.models.registry import MARKER_FILE, REGISTRY
from orthoopt.cli import main
from orthoopt.manifold import orthogonality_error
from orthoopt.config import RotateConfig
from orthoopt.pipeline import rotate_model

NAME = "smollm2-135m"
PATH = cached_model(NAME)
pytestmark = pytest.mark.skipif(PATH is None, reason=f"{NAME} is not cached (run `orthoopt fetch {NAME}`)")
TEXT = "The quick brown fox jumps over the lazy dog. Rotations keep the function and spread the outliers."


def test_cache_entry_is_a_portable_float_checkpoint():
    config = json.loads((PATH / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert "quantization_config" not in config
    assert json.loads((PATH / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    marker = json.loads((PATH / MARKER_FILE).read_text())
    assert marker["md5"] == REGISTRY[NAME].md5


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    tokenizer = load_tokenizer(NAME)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, :24]
    assert ids.shape[1] >= 16 and int(ids.max()) < 49152
    return ids


def test_hadamard_rotation_keeps_the_logits_float64(ids):
    """R1 + R2 random Hadamard fused into SmolLM2 in float64: the same function (RMSNorm runs in
    float32 inside transformers whatever the model dtype, hence the 1e-6 bound; see docs/adapters.md)."""
    model = load_model(NAME, dtype=torch.float64)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (576, 30)
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    # rotate_model compares the logits on `ids` before and after and raises above verify_tol
    result = rotate_model(
        model, RotateConfig("hadamard", compute={"dtype": torch.float64}), verify_ids=ids, verify_tol=1e-6, progress=False
    )
    assert result.report["invariance_error"] < 1e-6
    assert set(result.rotations) == {"R1", *(f"R2.{i}" for i in range(30))}
    assert all(orthogonality_error(R) < 1e-10 for R in result.rotations.values())
    # the weights did change (norm gains fused, then rotated): not the identity in disguise
    q_after = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert float((q_after - q_before).norm() / q_before.norm()) > 0.1


def test_cli_rotate_by_name_saves_an_equivalent_float32_checkpoint(ids, tmp_path, capsys):
    out = tmp_path / "hadamard"
    assert main(["rotate", NAME, "--out", str(out), "--method", "hadamard", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"].startswith(NAME) and report["invariance_error"] < 1e-4
    original, rotated = load_model(NAME), load_model(out)
    assert logits_relative_error(original, rotated, ids) < 1e-4
    assert load_tokenizer(out)(TEXT).input_ids[:24] == ids[0].tolist()
