"""``orthoopt`` command line: one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` (which registers its arguments and sets
``func``) and ``run(args) -> int``. Progress bars go to stderr; ``--json`` output goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from orthoopt.cli.usage import help_kwargs, package_version

SUBCOMMANDS = ("rotate", "quantize", "eval", "compare", "diagnose", "fetch")


DESCRIPTION = """\
Learned orthogonal rotations for post-training quantization of LLMs.

Rotating a model (R1 on the residual stream, R2 per attention head) leaves its function unchanged
but spreads outliers, so the weights and activations quantize with less error. One command does
the usual flow: 'orthoopt quantize MODEL --rotate METHOD --scheme W4A16 --out DIR' rotates the
model, quantizes it (RTN or GPTQ), writes a compressed-tensors checkpoint that transformers and vLLM
load (when the scheme allows) and a report.md with perplexities and pictures. 'orthoopt rotate' and
'orthoopt eval' run the steps one at a time. Run 'orthoopt COMMAND --help' for a command's options."""

EXAMPLES = (
    "orthoopt quantize smollm2-135m --rotate optrot --scheme W4A16 --group-size 64 --out runs/optrot-w4 --eval-text wiki.txt",
    "orthoopt fetch smollm2-135m",
    "orthoopt rotate smollm2-135m --out runs/rot --method optrot",
    "orthoopt quantize runs/rot --out runs/rot-w4 --scheme W4A16",
    "orthoopt eval runs/rot-w4 --text wikitext2-test.txt",
    "orthoopt compare smollm2-135m runs/rot-w4 --text wikitext2-test.txt",
)
DOCS = ("README.md", "docs/conventions.md (read first)", "docs/quantization.md", "docs/export.md")


class _Parser(argparse.ArgumentParser):
    """A usage error (a bad flag or value) is one line ``orthoopt CMD: error: ...`` and exit 2, as the
    commands' own errors (docs/guarantees.md); subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orthoopt", **help_kwargs(DESCRIPTION, EXAMPLES, DOCS))
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
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
    """Run ``orthoopt ARGV``; returns the exit status.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after ``orthoopt`` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success; 2 for a usage error, an :class:`orthoopt.OrthooptError` (an input orthoopt's
        checks refused), a missing file, another ``OSError`` (a full disk: the output is left as it
        was) or a size no machine holds, each as one line ``orthoopt CMD: error: ...`` on stderr.
        Any other exception is a bug and propagates with its traceback.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, its message already on stderr)
        return e.code if isinstance(e.code, int) else 2
    from orthoopt.utils.heap import release_large_blocks

    release_large_blocks()  # freed layers go back to the OS (orthoopt.utils.heap)
    if getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own bars (loading/saving weights)
    from safetensors import SafetensorError

    from orthoopt.errors import OrthooptError
    from orthoopt.utils.paths import output_lock

    out = getattr(args, "out", None)
    try:
        # one writer per output: a second process writing the same --out exits 2 (docs/guarantees.md)
        with output_lock(out) if out is not None else contextlib.nullcontext():
            return int(args.func(args) or 0)
    except (OrthooptError, FileNotFoundError) as e:  # orthoopt's own checks refused an input; a missing file
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
