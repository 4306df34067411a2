"""``orthoopt --help`` and every subcommand's help are written for users (issue 24, item 6), and
``orthoopt --version`` prints the installed version.

The subcommands are read from the parser, so a new one is covered without editing this file.
"""

from __future__ import annotations

import argparse
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

import orthoopt
from orthoopt.cli import build_parser, main

REST = re.compile(r"``|:(?:class|func|mod|meth|attr|data|exc|obj):`")
INTERNAL = ("one module per subcommand", "add_parser(", "run(args)")


def subcommands() -> list[str]:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return sorted(actions[0].choices)


def help_text(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0  # --help and --version exit 0 (main returns argparse's exit code)
    return capsys.readouterr().out


def test_the_subcommands_are_found():
    assert {"rotate", "quantize", "eval", "diagnose", "fetch"} <= set(subcommands())


@pytest.mark.parametrize("argv", [[]] + [[name] for name in subcommands()], ids=lambda a: " ".join(a) or "orthoopt")
def test_help_is_for_users(capsys, argv):
    text = help_text(capsys, [*argv, "--help"])
    assert text.startswith(f"usage: orthoopt {' '.join(argv)}".rstrip())
    assert not REST.search(text), f"reST markup in help: {REST.search(text).group(0)!r}"
    assert not [s for s in INTERNAL if s in text]
    examples = text.split("\nExamples:\n", 1)
    assert len(examples) == 2, "no 'Examples:' section"
    lines = [line.strip() for line in examples[1].splitlines() if line.startswith("  ")]
    assert lines and all(line.startswith("orthoopt ") for line in lines)
    if argv:  # a subcommand's examples run that subcommand
        assert all(line.split()[1] == argv[0] for line in lines)
    assert re.search(r"Documentation \(.*\): .*\b(docs/\w[\w-]*\.md|README\.md)", text)


def test_help_names_existing_docs(capsys):
    root = Path(__file__).resolve().parents[1]
    for argv in [[]] + [[name] for name in subcommands()]:
        text = help_text(capsys, [*argv, "--help"])
        named = re.findall(r"\b(?:docs/[\w-]+\.md|README\.md)", text.split("\nDocumentation (", 1)[1])
        assert named and all((root / n).is_file() for n in named), (argv, named)


def test_version_is_the_package_metadata(capsys):
    try:
        expected = version("orthoopt")
    except PackageNotFoundError:  # a source tree that was never installed
        expected = orthoopt.__version__
    text = help_text(capsys, ["--version"])
    assert text.strip() == f"orthoopt {expected}"


def test_version_falls_back_to_the_module_attribute(capsys, monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    monkeypatch.setattr(orthoopt, "__version__", "0.0.0+fallback-test")
    assert help_text(capsys, ["--version"]).strip() == "orthoopt 0.0.0+fallback-test"
