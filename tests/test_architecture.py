"""The import graph of src/loku (every import, function-local ones too; `if TYPE_CHECKING:` blocks left
out): the configuration and the training API sit in no import circle, and only `python -m loku` imports
the command line."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "loku"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(f): f for f in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
                       for n in ast.walk(node)}
        edges = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            edges |= {c for c in candidates if c in files and c != name}
        graph[name] = edges
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_graph_sees_an_import_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert "a" in reachable(graph, "a") and "d" not in reachable(graph, "d")


@pytest.mark.parametrize("module", ["loku.config", "loku.checks", "loku.methods", "loku.strategies", "loku.trainer",
                                   "loku.requests", "loku.requests.sequence", "loku.requests.output",
                                   "loku.requests.delta", "loku.release", "loku.evaluate", "loku.report",
                                   "loku.bench.tdec", "loku.bench.jobs", "loku.bench.base"])
def test_no_import_circle_through(module):
    graph = import_graph()
    circle = sorted(m for m in reachable(graph, module) if module in reachable(graph, m))
    assert module not in reachable(graph, module), f"{module} imports itself back through {circle}"


def test_only_python_m_loku_imports_the_command_line():
    graph = import_graph()
    assert sorted(m for m, edges in graph.items() if "loku.cli" in edges) == ["loku.__main__"]


def test_what_the_configuration_checks_against_does_not_import_the_machinery():
    graph = import_graph()
    # the options' own declarations only; the checks that need another module are that module's (loku.checks)
    assert graph["loku.config"] <= {"loku.errors", "loku.eval_options", "loku.methods", "loku.options",
                                    "loku.reveal_options"}, graph["loku.config"]
    assert reachable(graph, "loku.methods") <= {"loku.registry"}
    for leaf in ("loku.strategies", "loku.checkpoint", "loku.stop", "loku.tracking", "loku.losses"):
        assert not reachable(graph, leaf) & {"loku.config", "loku.requests", "loku.trainer"}, leaf


def test_no_module_imports_itself_back():
    graph = import_graph()
    circles = {m: sorted(n for n in reachable(graph, m) if m in reachable(graph, n)) for m in graph}
    assert {m: c for m, c in circles.items() if c} == {}
