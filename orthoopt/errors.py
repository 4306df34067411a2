"""The exceptions orthoopt's own checks raise, and their base.

``except orthoopt.OrthooptError`` catches any error raised by orthoopt's own checks, and the command
line turns exactly those (with missing files and other ``OSError``, e.g. a full disk) into a one-line
message and exit 2; any other exception is a bug and shows its traceback (``docs/architecture.md``,
"Errors"). Each named error also keeps its built-in base (``InvalidInputError`` and
``NonFiniteLossError`` are ``ValueError``, ``ProcrustesUnsupportedError`` a ``TypeError`` and a
``ValueError``, ...), so code that catches those keeps working. This module imports nothing, so any
layer may import it.
"""


class OrthooptError(Exception):
    """Base class of the exceptions defined by orthoopt (each also keeps its built-in base)."""


class InvalidInputError(OrthooptError, ValueError):
    """An input orthoopt refuses, named in the message: a setting, a file, a tensor or a model it cannot use.

    Raised by orthoopt's own checks (before any work where the input is known up front). It is a
    ``ValueError``, so ``except ValueError`` keeps catching it.
    """


__all__ = ["InvalidInputError", "OrthooptError"]
