"""The package's import graph, read from the source (ast): no cycle, and no in-function imports of its own modules;
in-function imports of other packages only for the optional or slow ones, each with a reason."""

from __future__ import annotations

import ast
from pathlib import Path

import visionzip_tune

PACKAGE = Path(visionzip_tune.__file__).parent
ROOT = PACKAGE.name
LAZY_ALLOWED = {"deepspeed", "peft", "wandb", "av"}  # optional extras or slow imports that most commands skip


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
    assert "visionzip_tune.build" in graph["visionzip_tune.train"]  # the walk sees real edges
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


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


def test_nothing_imports_train_and_families_stay_below_the_training_half():
    graph = own_graph()
    importers_of_train = [module for module, targets in graph.items() if "visionzip_tune.train" in targets]
    assert importers_of_train == []
    training_half = {f"{ROOT}.{name}" for name in ("train", "build", "metrics", "export_run", "checkpoint", "config")}
    for module, targets in graph.items():
        if module.startswith(f"{ROOT}.families") or module in (f"{ROOT}.compress", f"{ROOT}.encoders"):
            assert not targets & training_half, f"{module} imports {targets & training_half}"
