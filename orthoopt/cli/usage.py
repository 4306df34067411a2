"""What ``orthoopt ... --help`` says: the user-facing description, examples and documentation pointers.

Module docstrings of the subcommands are for developers (reST markup, internals); the help text is
plain text written for users and passed to argparse through :func:`help_kwargs`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

DOCS_WHERE = "in the orthoopt source tree"


def help_kwargs(description: str, examples: Sequence[str], docs: Sequence[str]) -> dict:
    """Keyword arguments for ``ArgumentParser`` / ``add_parser`` that give a command its user help.

    Parameters
    ----------
    description : str
        Plain text shown above the options, already wrapped (it is printed as written).
    examples : sequence of str
        Example command lines, one per entry; an entry may end with ``"  # comment"``.
    docs : sequence of str
        Documentation files (``docs/quantization.md``, ``README.md``) that describe the command.

    Returns
    -------
    dict
        ``description``, ``epilog`` (an "Examples:" section and a "Documentation:" line) and
        ``formatter_class`` (``RawDescriptionHelpFormatter``, so that both keep their line breaks).
    """
    lines = ["Examples:", *(f"  {e}" for e in examples), "", f"Documentation ({DOCS_WHERE}): {', '.join(docs)}."]
    return {
        "description": description.strip("\n"),
        "epilog": "\n".join(lines),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def package_version() -> str:
    """The installed orthoopt version (package metadata), else ``orthoopt.__version__``.

    Returns
    -------
    str
        ``importlib.metadata.version("orthoopt")``; ``orthoopt.__version__`` when the package is run
        from a source tree that was never installed.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("orthoopt")
    except PackageNotFoundError:
        import orthoopt

        return orthoopt.__version__
