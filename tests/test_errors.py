"""Every exception class defined under ``orthoopt/`` derives from ``orthoopt.OrthooptError``.

The modules are found by walking the package with ``pkgutil`` (a new module, and a new exception in
it, enrols itself) and imported; ``orthoopt.__main__`` runs the command line when imported, so it is
parsed instead, as is a module whose optional third-party dependency is not installed.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pkgutil
from pathlib import Path

import orthoopt
from orthoopt import OrthooptError

KNOWN = {"InvalidInputError", "NonFiniteLossError", "ProcrustesUnsupportedError", "UnsupportedModelError", "ModelFetchError"}


def _source_classes(name: str) -> list[str]:
    """Classes of module ``name`` (parsed, not imported) that do not name OrthooptError among their bases."""
    spec = importlib.util.find_spec(name)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
            if bases & {"Exception", "BaseException", "ValueError", "TypeError", "RuntimeError", "OSError",
                        "KeyError", "LookupError", "ArithmeticError", "Warning"} and "OrthooptError" not in bases:
                out.append(f"{name}.{node.name}")
    return out


def exception_classes() -> tuple[dict[str, type], list[str], list[str]]:
    """(exception classes by qualified name, modules walked, classes found by parsing that lack the base)."""
    found: dict[str, type] = {}
    modules, unparsed_bad = [], []
    for info in pkgutil.walk_packages(orthoopt.__path__, "orthoopt."):
        modules.append(info.name)
        if info.name == "orthoopt.__main__":
            unparsed_bad += _source_classes(info.name)
            continue
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError as e:  # an optional dependency (not orthoopt itself) is missing
            assert e.name and not e.name.startswith("orthoopt"), f"{info.name}: {e}"
            unparsed_bad += _source_classes(info.name)
            continue
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found, modules, unparsed_bad


def test_every_orthoopt_exception_derives_from_orthoopterror():
    found, modules, unparsed_bad = exception_classes()
    assert len(modules) > 80  # the walk saw the package, not an empty path
    assert KNOWN <= {name.rsplit(".", 1)[-1] for name in found}, sorted(found)  # not vacuous
    bad = sorted(name for name, cls in found.items() if not issubclass(cls, OrthooptError)) + unparsed_bad
    assert not bad, f"exception classes that do not derive from orthoopt.OrthooptError: {bad}"


def test_the_named_errors_keep_their_builtin_bases():
    from orthoopt.adapters import UnsupportedModelError
    from orthoopt.models import ModelFetchError
    from orthoopt.solvers import NonFiniteLossError, ProcrustesUnsupportedError

    assert issubclass(NonFiniteLossError, ValueError)
    assert issubclass(ProcrustesUnsupportedError, TypeError) and issubclass(ProcrustesUnsupportedError, ValueError)
    assert issubclass(UnsupportedModelError, ValueError) and issubclass(ModelFetchError, ValueError)
    assert orthoopt.OrthooptError is OrthooptError and issubclass(OrthooptError, Exception)
    assert issubclass(orthoopt.InvalidInputError, OrthooptError) and issubclass(orthoopt.InvalidInputError, ValueError)


def test_the_library_raises_no_bare_valueerror():
    """Every check of orthoopt raises a named error: a ``raise ValueError(...)`` under orthoopt/ would be
    a traceback on the command line (which turns only OrthooptError into exit 2)."""
    bare = []
    for path in sorted(Path(orthoopt.__file__).resolve().parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            made = node.exc if isinstance(node, ast.Raise) else node.value if isinstance(node, ast.Return) else None
            if isinstance(made, ast.Call) and isinstance(made.func, ast.Name) and made.func.id == "ValueError":
                bare.append(f"{path.relative_to(Path(orthoopt.__file__).parent)}:{node.lineno}")
    assert not bare, f"raise a named OrthooptError subclass instead: {bare}"


def _run_raising(monkeypatch, capsys, exc: BaseException) -> int:
    """``orthoopt fetch --list`` with the command's ``run`` replaced by one raising ``exc``."""
    import orthoopt.cli.fetch_cmd as cmd
    from orthoopt.cli import main

    def boom(args):
        raise exc

    monkeypatch.setattr(cmd, "run", boom)
    capsys.readouterr()
    return main(["fetch", "--list"])


def test_the_cli_turns_orthoopt_errors_and_missing_files_into_exit_2(monkeypatch, capsys):
    for exc in (orthoopt.InvalidInputError("bad setting x"), FileNotFoundError("no such file y")):
        assert _run_raising(monkeypatch, capsys, exc) == 2
        err = capsys.readouterr().err
        assert err.startswith("orthoopt fetch: error: ") and str(exc) in err and err.count("\n") == 1, err


def test_the_cli_lets_other_exceptions_show_their_traceback(monkeypatch, capsys):
    """A ValueError that orthoopt did not raise on purpose (here from torch-like code) is a bug: it
    propagates (python prints its traceback) instead of becoming a one-line exit 2."""
    import pytest

    for exc in (ValueError("too many values to unpack"), KeyError("R1"), RuntimeError("shape mismatch")):
        with pytest.raises(type(exc)):
            _run_raising(monkeypatch, capsys, exc)
