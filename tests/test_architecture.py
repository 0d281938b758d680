"""The package's import graph (read with ``ast``, nothing imported): no cycles, imports point down the layers, no
private names cross modules, function-local imports only for optional dependencies, files stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "segrank"

# Lower layers never import higher ones, and packages of one layer never import each other: cli -> experiments ->
# benchmarks -> deploy -> training -> evaluation -> inference -> runtime/reporting -> checkpoints -> models/data ->
# config -> files -> errors (docs/architecture.md draws the same tree).
LAYERS = {
    "segrank.errors": 0, "segrank.files": 1, "segrank.config": 2,
    "segrank.models": 3, "segrank.data": 3,
    "segrank.checkpoints": 4,
    "segrank.runtime": 5, "segrank.reporting": 5,
    "segrank.inference": 6,
    "segrank.evaluation": 7,
    "segrank.training": 8,
    "segrank.deploy": 9,
    "segrank.benchmarks": 10,
    "segrank.experiments": 11,
    "segrank.cli": 12,
}
# imported where used, so segrank runs without them
OPTIONAL_DEPENDENCIES = {"scipy", "torch.utils.tensorboard", "pyarrow", "mlflow", "wandb"}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int | None:
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


def imported(module: str) -> list[tuple[str, list[str], ast.AST]]:
    """(imported segrank module, names taken from it, node) for every import statement of ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node) for alias in node.names if alias.name.startswith("segrank")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("segrank"):
            names = [alias.name for alias in node.names]
            submodules = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            if submodules:  # ``from segrank import files``: the submodule is what is imported
                out += [(sub, [], node) for sub in submodules]
            else:
                out.append((node.module, names, node))
    return out


GRAPH = {m: sorted({target for target, _, _ in imported(m) if target in MODULES and target != m}) for m in MODULES}


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in GRAPH[module]:
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) is not None))
def test_imports_point_down_the_layers(module):
    for target in GRAPH[module]:
        if target == "segrank" or layer(target) is None:
            continue
        assert layer(target) <= layer(module), f"{module} (layer {layer(module)}) imports {target} " \
                                               f"(layer {layer(target)})"


def test_models_and_data_import_only_the_foundation():
    for module, targets in GRAPH.items():
        if module.startswith(("segrank.models", "segrank.data")):
            bad = [t for t in targets if layer(t) is not None and layer(t) > 3]
            assert not bad, f"{module} imports {bad}"


def test_no_private_names_cross_modules():
    for module in MODULES:
        for target, names, node in imported(module):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{module}:{node.lineno} imports private {private} from {target}"


def test_function_local_imports_only_for_optional_dependencies():
    for module, path in MODULES.items():
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                assert all(n.split(".")[0] in OPTIONAL_DEPENDENCIES or n in OPTIONAL_DEPENDENCIES
                           or any(n.startswith(d) for d in OPTIONAL_DEPENDENCIES) for n in names), \
                    f"{module}:{node.lineno}: function-local import of {names}"


def test_every_module_has_a_layer_and_stays_small():
    for module, path in MODULES.items():
        if module != "segrank":
            assert layer(module) is not None, f"{module}: add it to LAYERS"
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path}: {lines} lines (one concern per file: split it)"


def package(module: str) -> str:
    return next(prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + "."))


def test_packages_of_one_layer_do_not_import_each_other():
    for module, targets in GRAPH.items():
        if layer(module) is None:
            continue
        for target in targets:
            if layer(target) is not None and layer(target) == layer(module):
                assert package(target) == package(module), f"{module} imports {target}, a package of its own layer"
