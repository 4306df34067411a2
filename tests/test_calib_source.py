"""``--calib hf:NAME[:CONFIG]``: a Hugging Face dataset read from the local datasets cache only.

The tests build a tiny dataset in a temporary cache, laid out as ``datasets.load_dataset`` leaves a
downloaded one (``HF_DATASETS_CACHE/owner___name/CONFIG/0.0.0/HASH/{dataset_info.json, name-SPLIT.arrow}``),
so no network is needed; they are skipped when ``datasets`` is not importable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from orthoopt.testing import save_planted
from orthoopt.cli import main
from orthoopt.quant.calib import calibration_batches
from orthoopt.quant.calib_source import CalibSource, _dataset_text

from helpers import run_error

datasets = pytest.importorskip("datasets", reason="the datasets package is not installed "
                               "(pip install 'orthoopt[datasets]'); --calib hf:NAME needs it")

ROWS = [f" Row {i} talks about rotations , outliers and quantization of weights . " * 4 for i in range(40)]


def cache_dataset(cache: Path, repo: str, config: str, rows: dict[str, list[str]], work: Path) -> None:
    """Build ``repo`` (config ``config``, splits ``rows``) into the datasets cache ``cache``, the
    layout a download leaves, with columns ``text`` and ``n``."""
    from datasets.packaged_modules.json.json import Json

    files = {}
    for split, texts in rows.items():
        f = work / f"{split}.jsonl"
        f.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
        files[split] = str(f)
    name = repo.split("/")[-1]
    builder = Json(cache_dir=str(work / "build"), dataset_name=name, config_name=config, data_files=files)
    builder.download_and_prepare()
    dst = cache / repo.replace("/", "___") / config / "0.0.0" / "0123456789abcdef"
    dst.mkdir(parents=True)
    for f in Path(builder.cache_dir).iterdir():
        if f.suffix in (".arrow", ".json"):
            shutil.copy(f, dst / f.name)
    info = json.loads((dst / "dataset_info.json").read_text())
    info["config_name"] = config
    (dst / "dataset_info.json").write_text(json.dumps(info))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "hf-datasets"
    cache_dataset(root, "tiny/calib", "cfg", {"train": ROWS, "validation": ROWS[:5]}, tmp_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root))
    _dataset_text.cache_clear()
    yield root
    _dataset_text.cache_clear()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_planted(tmp_path_factory.mktemp("m") / "tiny", hidden_size=64, num_layers=1, num_heads=4,
                        intermediate_size=128)


def test_a_cached_dataset_gives_its_column_joined_like_a_file(cache, tmp_path):
    from orthoopt.testing.tiny import byte_tokenizer

    source = CalibSource("hf:tiny/calib:cfg")
    assert source.text() == "\n\n".join(ROWS)
    assert CalibSource("hf:tiny/calib", split="validation").text() == "\n\n".join(ROWS[:5])  # the one config
    f = tmp_path / "same.txt"
    f.write_text("\n\n".join(ROWS), encoding="utf-8")
    tok = byte_tokenizer()
    a = calibration_batches(source, tok, nsamples=4, seq_len=32, seed=1)
    b = calibration_batches(f, tok, nsamples=4, seq_len=32, seed=1)
    assert torch.equal(a, b)
    assert source.describe() == {"dataset": "tiny/calib", "config": "cfg", "split": "train", "column": "text"}


def test_gptq_calibrated_on_a_dataset_equals_the_same_text_in_a_file(cache, capsys, tmp_path, model_dir):
    f = tmp_path / "same.txt"
    f.write_text("\n\n".join(ROWS), encoding="utf-8")
    common = ["--method", "gptq", "--nsamples", "4", "--seq-len", "32", "--format", "orthoopt", "--no-progress"]
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "d"), "--calib", "hf:tiny/calib:cfg",
                 "--calib-split", "train", "--calib-text-column", "text", *common]) == 0
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "f"), "--calib", str(f), *common]) == 0
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "d" / "model.safetensors"), load_file(tmp_path / "f" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "d" / "quant.json").read_text())["calibration"]
    assert record == {"dataset": "tiny/calib", "config": "cfg", "split": "train", "column": "text",
                      "nsamples": 4, "seq_len": 32, "seed": 0}


@pytest.mark.parametrize("argv,message", [
    (["--calib", "hf:nobody/missing"], "is not in the local datasets cache"),
    (["--calib", "hf:tiny/calib:other"], "Couldn't find cache for tiny/calib for config 'other'"),
    (["--calib", "hf:tiny/calib:cfg", "--calib-split", "test"], "Unknown split \"test\""),
    (["--calib", "hf:tiny/calib:cfg", "--calib-text-column", "body"], "has no column 'body'; its columns: text, n"),
    (["--calib", "hf:"], "write a dataset as hf:NAME or hf:NAME:CONFIG"),
    (["--calib", "calib.txt", "--calib-split", "train"], "are for a dataset"),
])
def test_a_dataset_that_cannot_be_read_fails_at_once_naming_what_to_pass(cache, capsys, tmp_path, model_dir,
                                                                        argv, message, monkeypatch):
    import orthoopt.quant.model as qm

    monkeypatch.setattr(qm, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before refusing"))
    err = run_error(capsys, ["quantize", str(model_dir), "--out", str(tmp_path / "o"), "--method", "gptq", *argv,
                             "--no-progress"])
    assert message in err, err
    if argv[1].startswith("hf:") and "hf:NAME or" not in message:
        assert "--calib FILE.txt" in err or "(--calib-text-column)" in err
    assert not (tmp_path / "o").exists()


def test_without_the_datasets_package_it_says_what_to_install(monkeypatch, cache):
    import builtins

    real = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ValueError, match=r"needs the datasets package: pip install \"orthoopt\[datasets\]\".*"
                                         r"--calib FILE.txt"):
        CalibSource("hf:tiny/calib:cfg").check()
