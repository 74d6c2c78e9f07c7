"""No import cycle inside the package: every `import` of a mezo_vllm module, including the ones
inside functions (a lazy import is a dependency too: cli ↔ bench was one), read with `ast`."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path


def _targets(name: str, path: Path) -> set[str]:
    """Every dotted name `name` imports (`from .x import y` gives x and x.y: y may be a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)
    return targets


def _graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports. Modules are found by listing packages and
    following imports, so a subpackage installed from another folder (`patches/`) is found too.
    A module's own ancestor packages are left out of its imports: Python imports them first
    anyway, so that dependency can never be removed."""
    files: dict[str, Path] = {}
    packages: dict[str, list[str]] = {}
    todo: list[str] = []

    def add(name: str) -> bool:
        spec = importlib.util.find_spec(name)  # None: an attribute (`from . import check_version`)
        if spec is None:
            return False
        files[name] = Path(spec.origin)
        if spec.submodule_search_locations:
            packages[name] = list(spec.submodule_search_locations)
        todo.append(name)
        return True

    add("mezo_vllm")
    graph: dict[str, set[str]] = {}
    while todo:
        name = todo.pop()
        for info in pkgutil.iter_modules(packages.get(name, []), name + "."):
            if info.name not in files:
                add(info.name)
        imported = {t for t in _targets(name, files[name])
                    if t in files or (t.rpartition(".")[0] in packages and add(t))}
        ancestors = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
        graph[name] = imported - ancestors - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path a → … → a, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_the_package():
    graph = _graph()
    assert {"mezo_vllm.cli", "mezo_vllm.bench", "mezo_vllm.patches.plugin"} <= set(graph)
    assert "mezo_vllm.bench" in graph["mezo_vllm.cli"]  # the walk sees lazy imports
    cycle = _cycle(graph)
    assert cycle is None, " → ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


MAX_MODULE_LINES = 450  # issue 13: a module that outgrows this holds more than one idea


def test_no_module_of_the_package_is_over_450_lines():
    import mezo_vllm

    root = Path(mezo_vllm.__file__).parent
    files = {str(path.relative_to(root)): path for path in root.rglob("*.py")}
    assert "trainer.py" in files and "patches/span_logprobs.py" in files
    long = {name: n for name, path in files.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long
