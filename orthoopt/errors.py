"""The base of every exception orthoopt defines.

``except orthoopt.OrthooptError`` catches any error raised by orthoopt's own checks. Each named error
also keeps its built-in base (``NonFiniteLossError`` is a ``ValueError``, ``ProcrustesUnsupportedError``
a ``TypeError`` and a ``ValueError``, ...), so code that catches those keeps working; the command line
maps exceptions to exit codes by those built-in bases (``docs/architecture.md``). This module imports
nothing, so any layer may import it.
"""


class OrthooptError(Exception):
    """Base class of the exceptions defined by orthoopt (each also keeps its built-in base)."""
