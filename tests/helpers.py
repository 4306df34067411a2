"""Assertions shared by several test modules (imported as ``helpers``: pytest puts tests/ on sys.path)."""

from pathlib import Path

import torch


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files of ``folder`` (one file or numbered shards), by name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_streamed_r1_blocks_match(reader, layout, adapter) -> None:
    """The streamed reader yields, block by block and in order, exactly the fused adapter's R1 rows."""
    blocks = adapter.weight_blocks("R1")
    assert layout.r1_blocks(reader.untie) == [(b.name, b.side) for b in blocks]
    pieces: dict[str, list[torch.Tensor]] = {}
    for name, rows in reader.r1_pieces():
        pieces.setdefault(name, []).append(rows)
    for b in blocks:
        assert torch.equal(torch.cat(pieces[b.name]), b.as_rows()), b.name


def main_interrupted_at(phase: str, step: int, argv: list[str]) -> None:
    """Run ``orthoopt ARGV`` in-process with a KeyboardInterrupt raised from the pipeline's callback at
    ``(phase, step)`` (a Ctrl-C mid-solve), and check that it propagates."""
    import pytest

    import orthoopt.cli.rotate_cmd as cmd
    from orthoopt.cli import main

    real = cmd.rotate_model

    def interrupted(*a, callback=None, **kw):
        def cb(p, s, loss, rots):
            if p == phase and s == step:
                raise KeyboardInterrupt

        return real(*a, callback=cb, **kw)

    cmd.rotate_model = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            main(argv)
    finally:
        cmd.rotate_model = real


WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"


def sample_text_file(path: Path, chars: int = 8000, lines: int = 150) -> Path:
    """Write the first ``chars`` characters of ``../shared/data/wikitext2-test.txt`` (or, when it is
    absent, ``lines`` synthetic sentences) to ``path``; returns ``path``."""
    text = WIKI.read_text(encoding="utf-8")[:chars] if WIKI.is_file() else "".join(
        f" Sentence {i} is about rotations , outliers and quantization . \n" for i in range(lines))
    path.write_text(text, encoding="utf-8")
    return path


def run_error(capsys, argv: list[str]) -> str:
    """Run ``orthoopt ARGV`` in-process: it must exit 2 with one ``orthoopt CMD: error:`` message on
    stderr, which is returned."""
    from orthoopt.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"orthoopt {argv[0]}: error: "), err
    return err
