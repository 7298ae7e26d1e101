"""The package's structure, read from its own imports (function-level ones included): arrows
point one way, the report layer is a leaf, the trainer knows neither Optuna nor MLflow, and
every hyperparameter has one owner."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from search import params as registry

PACKAGE = Path(__file__).resolve().parents[1] / "search"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of `search` it imports, anywhere in the file."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                # `from search.report import figures` imports the submodule, not the package's
                # names (Python runs the package's __init__ either way, as for any submodule).
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_a_planted_cycle_would_be_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_report_imports_the_report():
    for module, targets in import_graph().items():
        if not module.startswith("search.report"):
            assert not [t for t in targets if t.startswith("search.report")], module


def third_party(path: Path) -> set[str]:
    """The top-level packages a file imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("name", ["trainer", "models", "data", "augment", "records", "params"])
def test_the_core_knows_neither_optuna_nor_mlflow(name):
    imported = third_party(PACKAGE / f"{name}.py")
    assert not imported & {"optuna", "mlflow"}, name
    if name in ("params", "records"):
        assert "torch" not in imported, name  # plain data, readable without PyTorch


def test_only_tracking_imports_mlflow():
    assert [p.name for p in PACKAGE.rglob("*.py") if "mlflow" in third_party(p)] == ["tracking.py"]


def test_no_benchmark_inside_the_package():
    assert not [p.name for p in PACKAGE.rglob("*bench*")]


def test_every_parameter_read_by_the_code_has_one_owner():
    """Each name the trainer, an optimizer or a model reads is a registry entry with a valid
    default, and each registry entry is read by someone."""
    read = {**registry.TRAINER}
    for table in (*registry.OPTIMIZERS.values(), *registry.MODELS.values()):
        read.update(table)
    assert set(read) == set(registry.PARAMS)
    for table in (registry.TRAINER, *registry.OPTIMIZERS.values(), *registry.MODELS.values()):
        for name, default in table.items():
            assert default is None or registry.PARAMS[name].problem(default) is None, name
    assert tuple(registry.OPTIMIZERS) == registry.PARAMS["optimizer"].choices


def test_model_activations_match_the_registry():
    from search.models import ACTIVATIONS

    assert tuple(ACTIVATIONS) == registry.ACTIVATIONS
