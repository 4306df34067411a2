"""The command-line options made from RotateConfig's fields (orthoopt.config_options): one flag, type,
default and help per field, shared by ``orthoopt rotate``, ``orthoopt quantize --rotate`` and
``python -m orthoopt.distributed_rotate``."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from orthoopt.cli import build_parser as cli_parser
from orthoopt.cli.rotate_cmd import config_from_args
from orthoopt.config import GROUPS, RotateConfig, help_text
from orthoopt.config_options import FIELD_PATHS, FLAG_FIELDS, add_config_options, dest, flag_default
from orthoopt.distributed_rotate import STREAMED_FIELDS, build_parser as distributed_parser
from orthoopt.errors import InvalidInputError


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in cli_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def _same(a: argparse.Action, b: argparse.Action) -> tuple:
    return (a.dest, a.default, a.help, a.choices, a.type, type(a).__name__), \
           (b.dest, b.default, b.help, b.choices, b.type, type(b).__name__)


def _get(config: RotateConfig, path: str):
    group, _, name = path.rpartition(".")
    return getattr(getattr(config, group) if group else config, name)


def test_every_field_is_documented_and_every_flag_field_is_an_option_of_rotate():
    for cls in (RotateConfig, *GROUPS.values()):
        for f in fields(cls):
            assert f.metadata["help"], f.name
            assert f"\n{f.name} : " in cls.__doc__, f"{f.name} missing from the {cls.__name__} docstring"
    assert set(GROUPS) <= {f.name for f in fields(RotateConfig)}
    rotate = _options(_subparser("rotate"))
    for name in FLAG_FIELDS:
        f = FIELD_PATHS[name]
        action = rotate[f.metadata["flag"]]
        assert action.dest == dest(name) and action.default == flag_default(f)
        assert help_text(f).split("(")[0].strip() in action.help


def test_distributed_and_quantize_share_rotates_flags_exactly():
    rotate, dist, quant = (_options(p) for p in (_subparser("rotate"), distributed_parser(), _subparser("quantize")))
    for name in STREAMED_FIELDS:
        flag = FIELD_PATHS[name].metadata["flag"]
        a, b = _same(rotate[flag], dist[flag])
        if name == "compute.device":  # the distributed entry point says what a device means for its ranks
            a, b = a[:2] + a[3:], b[:2] + b[3:]
        assert a == b, name
    # quantize has its own --dtype, --device and --seed (shared with its quantize step); the rest is rotate's
    for name in FLAG_FIELDS:
        flag = FIELD_PATHS[name].metadata["flag"]
        if name not in ("checkpoint.dtype", "compute.device", "seed"):
            a, b = _same(rotate[flag], quant[flag])
            assert a == b, name


@pytest.mark.parametrize("argv, field, want", [
    (["--rotations", "R2"], "rotations", ("R2",)),
    (["--solver", "cayley-sgd"], "solve.solver", "cayley-sgd"),
    (["--steps", "7"], "solve.steps", 7),
    (["--lr", "0.25"], "solve.lr", 0.25),
    (["--seed", "5"], "seed", 5),
    (["--rotation-dtype", "float64"], "compute.dtype", "float64"),
    (["--dtype", "bfloat16"], "checkpoint.dtype", "bfloat16"),
    (["--include-embeddings"], "include_embeddings", True),
    (["--sample-fraction", "0.5"], "compute.sample_fraction", 0.5),
    (["--chunk-rows", "64"], "compute.chunk_rows", 64),
    (["--calib-tokens", "512"], "calib.tokens", 512),
    (["--calib-seq-len", "64"], "calib.seq_len", 64),
    (["--checkpoint-every", "3"], "solve.checkpoint_every", 3),
    (["--layers-per-shard", "2"], "checkpoint.layers_per_shard", 2),
    (["--method", "spinquant", "--batch-size", "2"], "spinquant.batch_size", 2),
    (["--method", "spinquant", "--micro-batch-size", "1"], "spinquant.micro_batch_size", 1),
])
def test_each_option_sets_its_field(argv, field, want):
    args = _subparser("rotate").parse_args(["--out", "x", *argv])
    config = config_from_args(args)
    assert _get(config, field) == want
    assert _get(config_from_args(_subparser("rotate").parse_args(["--out", "x"])), field) != want


def test_command_line_defaults_are_the_fields_but_where_stated():
    config = config_from_args(_subparser("rotate").parse_args(["--out", "x"]))
    differ = {p for p in FIELD_PATHS if _get(config, p) != _get(RotateConfig(), p)}
    assert differ == {"solve.checkpoint_every"}  # --checkpoint-every 25; --dtype auto resolves per checkpoint


def test_spinquant_options_with_another_method_are_refused_naming_the_flag():
    for flag in ("--batch-size", "--micro-batch-size"):
        args = _subparser("rotate").parse_args(["--out", "x", "--method", "optrot", flag, "2"])
        with pytest.raises(InvalidInputError, match=flag):
            config_from_args(args)


def test_a_field_without_an_option_is_refused_by_name():
    with pytest.raises(KeyError, match="stop"):
        add_config_options(argparse.ArgumentParser(), ["solve.steps", "solve.stop"])
