"""``orthoopt`` command line: one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` (which registers its arguments and sets
``func``) and ``run(args) -> int``. Progress bars go to stderr; ``--json`` output goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

SUBCOMMANDS = ("rotate", "quantize", "eval", "diagnose", "fetch")


class _Parser(argparse.ArgumentParser):
    """A usage error (a bad flag or value) is one line ``orthoopt CMD: error: ...`` and exit 2, as the
    commands' own errors (docs/guarantees.md); subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orthoopt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"orthoopt.cli.{name}_cmd")
        except ModuleNotFoundError as e:  # a subcommand not built yet
            if e.name != f"orthoopt.cli.{name}_cmd":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, its message already on stderr)
        return e.code if isinstance(e.code, int) else 2
    if getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own bars (loading/saving weights)
    from safetensors import SafetensorError

    from orthoopt.utils.paths import output_lock

    out = getattr(args, "out", None)
    try:
        # one writer per output: a second process writing the same --out exits 2 (docs/guarantees.md)
        with output_lock(out) if out is not None else contextlib.nullcontext():
            return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"orthoopt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as e:  # the file system: a full disk, a quota, an I/O error
        left = f"; --out {out} was left as it was" if out is not None else ""
        print(f"orthoopt {args.command}: error: {e}{left}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # a size no machine holds (e.g. --nsamples 10^15)
        if not isinstance(e, MemoryError) and "can't allocate memory" not in str(e):
            raise
        print(f"orthoopt {args.command}: error: not enough memory ({str(e).strip() or 'MemoryError'}); are the "
              "sizes asked for (windows, tokens, steps) too large?", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
