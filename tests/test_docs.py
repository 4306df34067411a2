"""The docs describe the code as it is (issue 12): every reference to code in README.md, docs/*.md and
the docstrings/comments of examples/*.py resolves.

Checked, each test printing every failure at once:

- a backticked dotted name starting with ``orthoopt.`` imports (longest importable module prefix, then
  ``getattr`` for the rest), and so does every ``from orthoopt... import name`` in a ```python block;
- a backticked repo path (``orthoopt/...``, ``tests/...``, ``benchmarks/...``, ``docs/...``,
  ``examples/...``) exists (and a ``::test_name`` after it is a test of that file), and so does every
  relative markdown link target;
- a backticked ``test_...`` name exists as a test function under tests/ (docs/guarantees.md is checked
  by ``tests/test_safety.py::test_every_test_named_in_the_guarantees_page_exists``);
- each bare main name in docs/architecture.md's package table is an attribute of that row's package
  (or of a module the row names in full);
- every ``--flag`` written after ``orthoopt <subcommand>`` (in a backtick span or a code-block line)
  is an option of that subcommand in ``orthoopt.cli.build_parser()`` (after ``orthoopt.distributed_rotate``:
  of ``orthoopt.distributed_rotate.build_parser()``).

Deliberate references to things that do not exist go in ``ALLOWED`` with the reason.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# reference -> why it is allowed not to resolve
ALLOWED: dict[str, str] = {
    "docs/img/optrot_convergence.png": "drawn by benchmarks/optrot_speed.py --plot when it runs; not committed",
    "benchmarks/.cache/full_settings/": "the cache folder benchmarks/full_settings.py creates when it runs",
    "benchmarks/.cache/model_size/": "the checkpoints benchmarks/model_size.py builds when it runs",
    "benchmarks/.cache/instrument-smollm2-135m/": "the record benchmarks/instrument.py writes when it runs",
    "orthoopt/rotations.safetensors": "the rotations file inside an `orthoopt rotate` output folder, not a repo path",
}

SPAN = re.compile(r"(`+)(.+?)\1", re.S)
DOTTED = re.compile(r"orthoopt(?:\.\w+)+")
REPO_PATH = re.compile(r"(?:orthoopt|tests|benchmarks|docs|examples)/[\w./\-]*")
TEST_NAME = re.compile(r"\btest_\w+")
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
COMMAND = re.compile(r"\borthoopt(\s+(?:rotate|quantize|eval|compare|diagnose|fetch)|\.distributed_rotate)\b([^|;&`\n]*)")


def sources() -> dict[str, str]:
    """``{relative path: text to check}``: markdown whole, examples' docstrings and comments only."""
    out = {"README.md": (ROOT / "README.md").read_text(encoding="utf-8")}
    for p in sorted((ROOT / "docs").glob("*.md")):
        out[f"docs/{p.name}"] = p.read_text(encoding="utf-8")
    for p in sorted((ROOT / "examples").glob("*.py")):
        src = p.read_text(encoding="utf-8")
        parts = [ast.get_docstring(n) or "" for n in ast.walk(ast.parse(src))
                 if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        parts += [t.string for t in tokenize.generate_tokens(io.StringIO(src).readline)
                  if t.type == tokenize.COMMENT]
        out[f"examples/{p.name}"] = "\n".join(parts)
    return out


def spans(text: str) -> list[str]:
    """The contents of backtick spans (single or double) outside fenced code blocks."""
    return [m.group(2).strip() for m in SPAN.finditer(FENCE.sub("", text))]


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name is None or not ".".join(parts[:i]).startswith(e.name):
                raise  # the module exists but one of its own imports is missing: a real error
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def report(failures: list[str]) -> None:
    failures = [f for f in failures if f.split(": ", 1)[1] not in ALLOWED]
    assert not failures, f"{len(failures)} stale reference(s):\n" + "\n".join(failures)


def imported_names(text: str) -> list[str]:
    """``orthoopt.x.name`` for each ``from orthoopt.x import name`` / ``import orthoopt.x`` in ```python
    blocks (a block that is not valid Python, e.g. a signature sketch, is read line by line)."""
    out = []
    for block in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M):
        try:
            trees = [ast.parse(block)]
        except SyntaxError:
            trees = [ast.parse(line.strip()) for line in block.splitlines()
                     if re.match(r"\s*(from|import) orthoopt[\w.]*( import [\w, ]+)?\s*$", line)]
        for node in (n for tree in trees for n in ast.walk(tree)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "orthoopt":
                out += [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                out += [a.name for a in node.names if a.name.split(".")[0] == "orthoopt"]
    return out


def test_every_dotted_orthoopt_name_resolves():
    failures = []
    for doc, text in sources().items():
        names = [m.group(0) for m in map(DOTTED.match, spans(text)) if m] + imported_names(text)
        failures += [f"{doc}: {name}" for name in names if not resolves(name)]
    report(sorted(set(failures)))


def test_every_repo_path_exists():
    defined = defined_tests()
    failures = []
    for doc, text in sources().items():
        for span in spans(text):
            m = REPO_PATH.match(span)
            if not m:
                continue
            path = m.group(0)
            if not (ROOT / path).exists():
                failures.append(f"{doc}: {path}")
            rest = span[m.end():]
            if rest.startswith("::") and (name := rest[2:].split("[")[0].strip()):
                if name not in defined.get(path, set()):
                    failures.append(f"{doc}: {path}::{name}")
        if doc.endswith(".md"):
            base = (ROOT / doc).parent
            for target in LINK.findall(text):
                target = target.split("#")[0]
                if target and "://" not in target and not (base / target).exists():
                    failures.append(f"{doc}: {target}")
    report(sorted(set(failures)))


def defined_tests() -> dict[str, set[str]]:
    """``{tests/test_x.py: {test function names}}``."""
    return {f"tests/{p.name}": set(re.findall(r"^\s*(?:async\s+)?def (test_\w+)", p.read_text(encoding="utf-8"), re.M))
            for p in sorted((ROOT / "tests").rglob("test_*.py"))}


def test_every_named_test_exists():
    everywhere = set().union(*defined_tests().values())
    failures = []
    for doc, text in sources().items():
        if doc == "docs/guarantees.md":  # tests/test_safety.py checks that page
            continue
        for span in spans(text):
            for name in TEST_NAME.findall(span):
                if name not in everywhere and not (ROOT / "tests" / f"{name}.py").exists():
                    failures.append(f"{doc}: {name}")
    report(sorted(set(failures)))


def cli_flags() -> dict[str, set[str]]:
    """``{subcommand: {option strings}}`` from the real parsers (``distributed_rotate``: the torchrun entry)."""
    from orthoopt import distributed_rotate
    from orthoopt.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {**sub.choices, "distributed_rotate": distributed_rotate.build_parser()}
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in parsers.items()}


def commands(text: str) -> list[tuple[str, str]]:
    """``(subcommand, rest of the command)`` for each ``orthoopt <subcommand> ...`` (or ``-m
    orthoopt.distributed_rotate ...``) in a span or code line."""
    lines = [" ".join(s.split()) for s in spans(text)] + [line.split("#")[0] for block in FENCE.findall(text)
                           for line in block.replace("\\\n", " ").splitlines()]
    return [(m.group(1).strip(" ."), m.group(2)) for line in lines for m in COMMAND.finditer(line)]


def test_every_cli_flag_written_exists():
    flags = cli_flags()
    failures = []
    for doc, text in sources().items():
        if doc.startswith("examples/"):
            continue
        for cmd, rest in commands(text):
            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest):
                if flag not in flags[cmd]:
                    failures.append(f"{doc}: orthoopt {cmd} {flag}")
    report(sorted(set(failures)))


def test_the_architecture_tables_main_names_exist():
    """Each row of docs/architecture.md's package table: its bare main names are attributes of the package
    (or of a module the same row names in full)."""
    failures = []
    for line in (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not (line.startswith("| `orthoopt") and len(cells) >= 3):
            continue
        package = cells[0].strip("`")
        homes = [package] + [s for s in spans(cells[-1]) if DOTTED.fullmatch(s)]  # `orthoopt.x.y` (`a`, `b`)
        for span in spans(cells[-1]):
            name = re.match(r"[A-Za-z_]\w*", span)
            if name and not span.startswith("orthoopt") and " " not in span \
                    and not any(resolves(f"{home}.{name.group(0)}") for home in homes):
                failures.append(f"docs/architecture.md: {package}: {name.group(0)}")
    report(failures)


def test_the_checker_catches_stale_references():
    """The checks can fail: a renamed function, a missing file and an unknown flag are each caught."""
    assert resolves("orthoopt.pipeline.run_phases") and resolves("orthoopt.core.grid")
    assert not resolves("orthoopt.objectives.rotation_dims")
    assert not resolves("orthoopt.no_such_module.thing")
    assert imported_names("```python\nfrom orthoopt.objectives import rotation_dims, FourthPower\n```\n") == \
        ["orthoopt.objectives.rotation_dims", "orthoopt.objectives.FourthPower"]
    assert REPO_PATH.match("orthoopt/objectives/fake_quant.py") and not (ROOT / "orthoopt/objectives/fake_quant.py").exists()
    assert commands("run `orthoopt rotate --model m --no-such-flag`") == [("rotate", " --model m --no-such-flag")]
    assert "--no-such-flag" not in cli_flags()["rotate"] and "--streamed" in cli_flags()["rotate"]
    assert commands("```\ntorchrun -m orthoopt.distributed_rotate m --steps 3 # --x\n```\n") == \
        [("distributed_rotate", " m --steps 3 ")]


METHOD_TABLE = ("<!-- method table: generated by orthoopt.methods.method_table_markdown(); do not edit by hand -->\n",
                "<!-- end of the method table -->")


def test_the_method_table_is_generated_from_the_registry():
    """docs/solvers.md holds exactly the table of the method registry (regenerate it with
    ``python -m orthoopt.methods``), so defaults, solvers and streamed support cannot drift."""
    from orthoopt.methods import METHODS, method_table_markdown

    text = (ROOT / "docs" / "solvers.md").read_text(encoding="utf-8")
    start, end = METHOD_TABLE
    assert text.count(start) == 1 and text.count(end) == 1, "docs/solvers.md lost the method table's markers"
    table = text.split(start, 1)[1].split(end, 1)[0]
    assert table == method_table_markdown(), ("docs/solvers.md's method table is stale; replace it with the "
                                              "output of `python -m orthoopt.methods`")
    assert [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[2:]] == list(METHODS)
    # the pipeline's module doc points at the registry instead of repeating the table
    import orthoopt.pipeline

    assert "orthoopt.methods.METHODS" in orthoopt.pipeline.__doc__ and "cayley-lbfgs" not in orthoopt.pipeline.__doc__
