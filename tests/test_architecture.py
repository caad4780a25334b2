"""The architecture holds: no import cycles among the project's modules, each module imports on its own,
and the CLI's help and listing verbs never import torch (start-up under a second)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"loramerge": ROOT / "loramerge", "loramerge.routers": ROOT / "routers", "loramerge.serving": ROOT / "serving"}
OPTIONAL = ("vllm",)
"""Third-party packages only some installs have: a module needing them may fail to import on its own."""


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of loramerge, routers and serving."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (functions too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_acyclic():
    modules = project_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 50 and graph["loramerge.merging.engine"]  # the scan sees the project
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the check can fail
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_core_never_imports_routers_or_serving():
    modules = project_modules()
    for name, path in modules.items():
        if name.startswith(("loramerge.routers", "loramerge.serving", "loramerge.cli")):
            continue
        bad = {m for m in imports_of(name, path, modules) if m.startswith(("loramerge.routers", "loramerge.serving"))}
        assert not bad, f"{name} imports {sorted(bad)}"


ISOLATION = """
import importlib, json, sys
names, OPTIONAL = json.loads(sys.argv[1]), tuple(json.loads(sys.argv[2]))
failures = {}
for name in names:
    for loaded in [m for m in sys.modules if m == "loramerge" or m.startswith("loramerge.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if getattr(exc, "name", None) and exc.name.split(".")[0] in OPTIONAL:
            continue
        failures[name] = repr(exc)
    except Exception as exc:
        failures[name] = repr(exc)
print(json.dumps(failures))
"""


def test_every_module_imports_on_its_own():
    """Each module imported with no other project module loaded first (third-party ones stay loaded)."""
    names = sorted(n for n in project_modules() if not n.endswith("__main__"))
    out = subprocess.run([sys.executable, "-c", ISOLATION, json.dumps(names), json.dumps(OPTIONAL)], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


STARTUP = """
import json, sys
sys.argv = ["loramerge", *json.loads(sys.argv[1])]
from loramerge.cli.app import main
try:
    main()
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "peft", "transformers", "safetensors", "numpy") if m in sys.modules)
print("HEAVY=" + json.dumps(heavy))
"""


@pytest.mark.parametrize("args", [["--help"], ["methods"], ["version"], ["merge"], ["methods", "tise"],
                                  ["merge", "--rank"], ["serve", "--help"], ["basis", "--help"]],
                         ids=lambda a: " ".join(a))
def test_cli_start_does_not_import_torch(args):
    out = subprocess.run([sys.executable, "-c", STARTUP, json.dumps(args)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    heavy = json.loads(out.stdout.strip().splitlines()[-1].removeprefix("HEAVY="))
    assert heavy == [], f"loramerge {' '.join(args)} imported {heavy}"
    assert "Traceback" not in out.stderr, out.stderr


def test_method_listing_is_one_line_each():
    from loramerge.cli.app import method_details, method_lines
    from loramerge.merging.methods import REGISTRY

    lines = method_lines(80)
    assert len(lines) == len(REGISTRY) and all(len(line) <= 80 for line in lines)
    assert lines[0].split()[0] == "task_arithmetic"
    details = "\n".join(method_details("ties"))
    assert "density = 0.2" in details and "arxiv.org/abs/2306.01708" in details
