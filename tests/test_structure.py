"""The package's structure, read from its own imports (function-level ones included): the
subpackages are layers and every arrow points down, the training layer knows neither Optuna nor
MLflow, and every hyperparameter has one owner."""

from __future__ import annotations

import ast
from pathlib import Path

from search.config import params as registry

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
                # `from search.analysis import figures` imports the submodule, not the package's
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


# The layers, bottom first. A module may import its own layer and the layers below it, never one
# above, nor its neighbour on the same floor (training and storage know nothing of each other;
# analysis only reads what the runner and the trainer produced, and never trains).
# The modules directly in search/ are the commands people type (`python -m search.run`) and the
# Python API (`search.api`, the same commands as functions).
LAYERS = (("config",), ("training", "storage"), ("tracking",), ("runner", "analysis"),
          ("commands",))
FLOOR = {name: floor for floor, names in enumerate(LAYERS) for name in names}


def layer(module: str) -> str:
    """`search.storage.recovery` -> `storage`; `search.run` (a command) -> `commands`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FLOOR else "commands"


def against_the_layers(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a higher layer, or of another layer on the same floor."""
    return sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                  if layer(module) != layer(target)
                  and FLOOR[layer(target)] >= FLOOR[layer(module)])


def test_every_import_points_down_the_layers():
    assert against_the_layers(import_graph()) == []


def test_every_module_lives_in_a_layer_or_is_a_command():
    folders = {p.parent.name for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE}
    assert folders == set(FLOOR) - {"commands"}
    commands = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert commands == {"run", "train", "sync", "dashboard", "report", "predict", "api"}


def test_an_upward_or_sideways_import_would_be_found():
    graph = {"search.config.space": {"search.storage.studies"},          # up
             "search.training.loop": {"search.storage.checkpoints"},     # sideways
             "search.runner.objective": {"search.training.loop"},        # down: fine
             "search.run": {"search.runner.process"}}                    # down: fine
    assert against_the_layers(graph) == ["search.config.space -> search.storage.studies",
                                         "search.training.loop -> search.storage.checkpoints"]


def third_party(path: Path) -> set[str]:
    """The top-level packages a file imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_training_layer_knows_neither_optuna_nor_mlflow():
    for path in (PACKAGE / "training").glob("*.py"):
        assert not third_party(path) & {"optuna", "mlflow"}, path.name


def test_the_config_layer_and_plain_records_need_no_pytorch():
    """--help, --cfg and a bad override answer without importing PyTorch (~3 s)."""
    for path in [*(PACKAGE / "config").glob("*.py"), PACKAGE / "training" / "results.py"]:
        assert "torch" not in third_party(path), path.name


def test_only_the_tracking_modules_import_mlflow():
    """The store checks, the study's run, the trial runs, the live observer, and the final
    models with the registry: nothing outside the tracking layer, nor its UI links."""
    assert sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                  if "mlflow" in third_party(p)) == [
        f"tracking/{name}.py" for name in ("live", "model_registry", "stores", "study_run",
                                           "trial_runs")]


def names_used(path: Path) -> set[str]:
    """Every name a file defines, imports or reads (`x`, `obj.x`, `from m import x`, `def x`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.name.split(".")[-1])
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def test_final_models_have_one_owner():
    """`search.report retrain=topN`, `search.train full=true` and `search.retrain()` train, save,
    log and register final models through one service: no other module trains them, builds their
    MLflow hook or registers one."""
    owned = {"final_evaluation", "FinalModels", "register_best"}
    assert sorted(_module(p) for p in PACKAGE.rglob("*.py") if names_used(p) & owned) == [
        "search.runner.final_models", "search.tracking.model_registry"]
    graph = import_graph()
    assert all("search.runner.final_models" in graph[command]
               for command in ("search.report", "search.train", "search.api"))


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


def test_every_activation_of_the_registry_is_a_torch_module():
    from torch import nn

    from search.training.models import ACTIVATIONS

    assert registry.PARAMS["activation"].choices == tuple(ACTIVATIONS)
    assert all(issubclass(module, nn.Module) for module in ACTIVATIONS.values())


def bare_attribute_keys(path: Path) -> list[str]:
    """Trial/study user attributes named by a string literal instead of `TrialAttr`/`StudyAttr`:
    `user_attrs.get("x")`, `user_attrs["x"]`, `"x" in t.user_attrs`, `set_user_attr("x", ...)`,
    `user_attrs={"x": ...}`."""
    found = []

    def literal(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and isinstance(node.value, str)

    def is_user_attrs(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "user_attrs"

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("set_user_attr", "set_trial_user_attr") and node.args:
                key = node.args[0] if node.func.attr == "set_user_attr" else node.args[1:2] and node.args[1]
                if key and literal(key):
                    found.append(f"{path.name}:{node.lineno}")
            if node.func.attr == "get" and is_user_attrs(node.func.value) and node.args \
                    and literal(node.args[0]):
                found.append(f"{path.name}:{node.lineno}")
            for keyword in node.keywords:
                if keyword.arg == "user_attrs" and isinstance(keyword.value, ast.Dict) \
                        and any(k is not None and literal(k) for k in keyword.value.keys):
                    found.append(f"{path.name}:{node.lineno}")
        elif isinstance(node, ast.Subscript) and is_user_attrs(node.value) and literal(node.slice):
            found.append(f"{path.name}:{node.lineno}")
        elif isinstance(node, ast.Compare) and literal(node.left) \
                and any(is_user_attrs(c) for c in node.comparators):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_every_attribute_key_comes_from_the_one_module():
    assert [hit for path in PACKAGE.rglob("*.py") for hit in bare_attribute_keys(path)] == []


def test_a_bare_attribute_key_would_be_found(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('trial.set_user_attr("seed", 1)\nx = t.user_attrs.get("owner")\n'
                       'y = "fail_reason" in t.user_attrs\nz = t.user_attrs["baseline"]\n'
                       'study.enqueue_trial({}, user_attrs={"baseline": 0})\n'
                       'ok = t.user_attrs.get(TrialAttr.SEED)\n')
    assert bare_attribute_keys(planted) == [f"planted.py:{n}" for n in (1, 2, 3, 4, 5)]


def test_every_attribute_has_a_writer_and_a_meaning():
    from search.storage.trials import StudyAttr, TrialAttr

    for attr in (*TrialAttr, *StudyAttr):
        assert attr.writer and attr.meaning and attr == attr.value, attr.name
        assert {"owner": 1}.get(TrialAttr.OWNER) == 1  # a plain string key to Optuna
