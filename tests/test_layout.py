"""The package's import graph, read from the source (ast): imports point down the layers only (the README's layout),
no cycle, and no in-function imports of its own modules; in-function imports of other packages only for the
optional or slow ones, each with a reason."""

from __future__ import annotations

import ast
from pathlib import Path

import visionzip_tune

PACKAGE = Path(visionzip_tune.__file__).parent
ROOT = PACKAGE.name
LAZY_ALLOWED = {"deepspeed", "peft", "wandb", "av"}  # optional extras or slow imports that most commands skip

# The layers, bottom up, by the first name under the package: a module may import from its own package and from
# lower layers only. Different packages of one layer never import each other, except the leaves of layer 0.
LAYERS = {
    "errors": 0,
    "files": 0,
    "distributed": 0,
    "docfields": 0,
    # the startup watchdog: every layer names the phases it may wait in (loading weights, reading data, the
    # rendezvous, building ops), so it is a leaf all of them can import
    "watchdog": 0,
    "launcher": 0,
    "algorithm": 1,
    "models": 2,
    "families": 3,
    "data": 3,
    "export": 4,
    "loading": 4,
    "demo": 4,
    "inference": 5,
    "feature_cache": 5,
    "evaluation": 6,
    "training": 7,
    "cli": 8,
    "__main__": 8,
}
TOP_LEVEL_MODULES = {
    "__init__",
    "__main__",
    "errors",
    "files",
    "distributed",
    "docfields",
    "watchdog",
    "launcher",
    "export",
    "loading",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``from X import ...`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(module: str) -> list[tuple[str, ast.stmt, bool]]:
    """``(imported module, statement, inside a function)`` for every import statement of ``module``; a name
    imported from a package counts as its submodule when it is one (``from visionzip_tune import build``)."""
    tree = ast.parse(MODULES[module].read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(module, child)
                for alias in child.names:
                    candidate = f"{base}.{alias.name}"
                    found.append((candidate if candidate in MODULES else base, child, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def own_graph() -> dict[str, set[str]]:
    return {
        module: {target for target, _, _ in imports(module) if target in MODULES and target != module}
        for module in MODULES
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that returns to its start, or None (depth-first search)."""
    state: dict[str, str] = {}  # module -> "open" while on the stack, "done" after

    def walk(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := walk(target, path + [target])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := walk(module, [module])):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_imports_have_no_cycle():
    graph = own_graph()
    assert "visionzip_tune.training.build" in graph["visionzip_tune.training.loop"]  # the walk sees real edges
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def layer_of(module: str) -> tuple[str, int]:
    """``(package under the root, layer)`` of a module; the root ``__init__`` (the public API) is above them all."""
    if module == ROOT:
        return ROOT, len(set(LAYERS.values()))
    top = module.split(".")[1]
    assert top in LAYERS, f"{module} is in no layer: add {top!r} to LAYERS (and to the README's layout)"
    return top, LAYERS[top]


def test_imports_point_down_the_layers_only():
    problems = []
    for module, targets in own_graph().items():
        package, layer = layer_of(module)
        for target in targets:
            target_package, target_layer = layer_of(target)
            if target_package == package:
                continue
            if target_layer > layer or (target_layer == layer and layer > 0):
                problems.append(f"{module} (layer {layer}) imports {target} (layer {target_layer})")
    assert not problems, "\n".join(problems)


def test_the_layer_check_sees_an_upward_edge():
    assert layer_of("visionzip_tune.families.llava")[1] < layer_of("visionzip_tune.cli.train")[1]
    assert layer_of("visionzip_tune.data.source")[1] == layer_of("visionzip_tune.families.base")[1]


def test_the_top_level_holds_only_the_leaves_the_api_and_the_export_and_loading():
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert modules == TOP_LEVEL_MODULES


def test_no_in_function_imports_of_the_package_and_only_allowed_lazy_ones():
    problems = []
    for module in MODULES:
        source = MODULES[module].read_text().splitlines()
        for target, node, in_function in imports(module):
            if not in_function:
                continue
            where = f"{MODULES[module].relative_to(PACKAGE.parent)}:{node.lineno}"
            top = target.split(".")[0]
            if top == ROOT:
                problems.append(f"{where} imports {target} inside a function")
            elif top not in LAZY_ALLOWED:
                problems.append(f"{where} imports {target} lazily; only {sorted(LAZY_ALLOWED)} may be")
            elif "#" not in source[node.lineno - 1]:
                problems.append(f"{where} imports {target} lazily without a comment saying why")
    assert not problems, "\n".join(problems)


def test_nothing_imports_the_command_line():
    importers = [
        module
        for module, targets in own_graph().items()
        if not module.startswith(f"{ROOT}.cli") and module != f"{ROOT}.__main__"
        for target in targets
        if target.startswith(f"{ROOT}.cli")
    ]
    assert importers == []
