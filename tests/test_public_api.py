"""The public face of ``import orthoopt`` (issue 22, item 7): a curated ``__all__``, each name defined
once (in the module ``orthoopt.PUBLIC`` names), resolvable, documented in its source and in
``docs/architecture.md``; no re-export through ``noqa``; ``import orthoopt`` stays light."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import orthoopt

ROOT = Path(orthoopt.__file__).resolve().parent
DOCS = ROOT.parent / "docs" / "architecture.md"


def _definitions(name: str) -> list[str]:
    """The modules under orthoopt/ that define ``name`` at module level (def, class or assignment)."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            if name in names:
                found.append(".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"))
    return found


def _data_docstring(module: str, name: str) -> str | None:
    """The string literal right after the module-level assignment of ``name`` in ``module``."""
    path = ROOT.parent / (module.replace(".", "/") + ".py")
    body = ast.parse(path.read_text(encoding="utf-8")).body
    for node, nxt in zip(body, body[1:]):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                return nxt.value.value
    return None


def test_the_public_names_are_the_curated_set():
    assert set(orthoopt.__all__) == set(orthoopt.PUBLIC) | {"__version__"}
    for wanted in ("rotate_model", "rotate_streamed", "RotateConfig", "solve", "Objective", "Solver", "METHODS",
                   "SOLVERS", "OrthooptError"):
        assert wanted in orthoopt.__all__, wanted
    assert set(orthoopt.PUBLIC) <= set(dir(orthoopt))
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        orthoopt.nothing_here  # noqa: B018


@pytest.mark.parametrize("name", sorted(orthoopt.PUBLIC))
def test_every_public_name_resolves_to_its_one_definition_and_is_documented(name):
    module = orthoopt.PUBLIC[name]
    obj = getattr(orthoopt, name)
    assert obj is getattr(sys.modules[module], name)
    assert _definitions(name) == [module], f"{name} is defined in {_definitions(name)}, not only in {module}"
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert obj.__module__ == module
        doc = inspect.getdoc(obj) or ""
    else:
        doc = _data_docstring(module, name) or ""
    assert len(doc.split()) >= 3, f"{name} has no docstring"
    section = DOCS.read_text(encoding="utf-8").split("## The public face", 1)
    assert len(section) == 2, "docs/architecture.md has no 'The public face' section"
    assert re.search(rf"`(orthoopt\.)?{re.escape(name)}`", section[1].split("\n## ", 1)[0]), \
        f"docs/architecture.md's public face does not name {name}"


def test_the_package_root_reexports_nothing_through_noqa():
    assert "noqa" not in (ROOT / "__init__.py").read_text(encoding="utf-8")


def test_import_orthoopt_is_light():
    code = "import sys, orthoopt; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT.parent), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out == ["False", "False"]


def test_public_callables_document_every_parameter_in_numpydoc():
    """Each public function and class taking parameters has a numpydoc ``Parameters`` section that
    names every one of them (``name : type`` lines; ``a, b : ...`` names several)."""
    import inspect
    import re

    missing = []
    for name in orthoopt.PUBLIC:
        obj = getattr(orthoopt, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)) or issubclass_safe(obj, Exception):
            continue
        params = [p for p in inspect.signature(obj).parameters if p not in ("self", "args", "kwargs")]
        if not params:
            continue
        doc = inspect.getdoc(obj) or ""
        section = re.search(r"^Parameters\n-{10}\n(.*?)(?:\n\n[A-Z][a-z]+\n-{3,}\n|\Z)", doc, re.S | re.M)
        if section is None:
            missing.append(f"{name}: no Parameters section")
            continue
        named = {n.strip() for line in section.group(1).splitlines() if not line.startswith(" ") and " : " in line
                 for n in line.split(" : ")[0].split(",")}
        lacking = [p for p in params if p not in named]
        if lacking:
            missing.append(f"{name}: {lacking}")
    assert not missing, missing


def issubclass_safe(obj, base) -> bool:
    return isinstance(obj, type) and issubclass(obj, base)
