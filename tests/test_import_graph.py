"""The `engine` package's import graph, read from source with `ast` (nothing is imported): no
import cycles, and no layer imports one above it.

Every import statement counts, wherever it is written (module level, inside a function), and so
does `importlib.import_module("engine...")` with a literal name.  Imports under `if TYPE_CHECKING:`
never run: they count for the layering rules (they are still a dependency of the design) but not
for cycles.  `from engine.x import y` is an edge to the module `engine.x.y` where one exists,
else to `engine.x`.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ENGINE_DIR = Path(__file__).resolve().parent.parent / "engine"

# (package, names it must never import: a module, a package, or an external library)
LAYERING_RULES = [
    ("engine.scheduler", ("torch", "triton", "engine.worker", "engine.model", "engine.kernels", "engine.api")),
    ("engine.kv", ("torch", "triton", "engine.worker", "engine.model", "engine.kernels", "engine.api")),
    ("engine.model", ("engine.worker", "engine.api", "engine.llm_engine")),
    ("engine.tokenizer", ("engine.model",)),
    ("engine.kernels", ("engine.model", "engine.worker", "engine.api")),
    ("engine.worker", ("engine.api",)),
    ("engine.distributed", ("engine.model", "engine.worker", "engine.api", "engine.scheduler", "engine.replicas")),
    ("engine.replicas", ("engine.worker", "engine.model", "engine.kernels")),  # through the server only
]


@dataclass(frozen=True, slots=True)
class Import:
    target: str  # the absolute dotted name imported: "engine.kv.block_pool", "torch.nn"
    line: int
    is_type_checking: bool  # under `if TYPE_CHECKING:`, so never run
    is_module_level: bool  # runs when the importing module loads (not inside a function)


@cache
def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (packages by __init__)."""
    files = {}
    for path in sorted(ENGINE_DIR.rglob("*.py")):
        parts = path.relative_to(ENGINE_DIR.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


@cache
def imports_of(module: str) -> tuple[Import, ...]:
    path = module_files()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    collector = _ImportCollector(package)
    collector.visit(ast.parse(path.read_text(), str(path)))
    return tuple(collector.found)


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, package: str) -> None:
        self.package = package
        self.found: list[Import] = []
        self.is_type_checking = False
        self.is_module_level = True

    def _add(self, node: ast.stmt | ast.expr, targets: list[str]) -> None:
        self.found += [Import(t, node.lineno, self.is_type_checking, self.is_module_level) for t in targets]

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        saved, self.is_module_level = self.is_module_level, False
        self.generic_visit(node)
        self.is_module_level = saved

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking_test(node.test):
            self.generic_visit(node)
            return
        saved, self.is_type_checking = self.is_type_checking, True
        for statement in node.body:
            self.visit(statement)
        self.is_type_checking = saved
        for statement in node.orelse:
            self.visit(statement)

    def visit_Import(self, node: ast.Import) -> None:
        self._add(node, [alias.name for alias in node.names])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: from this package, up `level - 1` packages
            parts = self.package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in module_files() else base
                   for alias in node.names]
        self._add(node, list(dict.fromkeys(targets)))

    def visit_Call(self, node: ast.Call) -> None:
        """`importlib.import_module("literal")` (or a bare `import_module`) imports that module."""
        func, args = node.func, node.args
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name == "import_module" and args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
            self._add(node, [args[0].value])
        self.generic_visit(node)


def _is_type_checking_test(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _engine_module(target: str) -> str | None:
    """The module of the package that an import of `target` runs (its longest existing prefix)."""
    name = target
    while name:
        if name in module_files():
            return name
        name = name.rpartition(".")[0]
    return None


def _is_within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@cache
def runtime_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}, TYPE_CHECKING imports left out."""
    graph: dict[str, dict[str, int]] = {}
    for module in module_files():
        edges = graph.setdefault(module, {})
        for imp in imports_of(module):
            target = _engine_module(imp.target) if _is_within(imp.target, "engine") else None
            if target is not None and target != module and not imp.is_type_checking:
                edges.setdefault(target, imp.line)
    return graph


def strongly_connected_components(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm; components of one module without a self-edge are left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, {}):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def shortest_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, as [a, b, ..., a]."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in graph[node]:
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if successor in members and successor not in came_from:
                came_from[successor] = node
                queue.append(successor)
    raise AssertionError(f"no cycle through {start}")


def _describe_cycle(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    hops = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "\n    ".join(hops)


def test_the_graph_sees_the_package() -> None:
    """The parser finds the modules and the kinds of import the rules depend on."""
    assert {"engine", "engine.llm_engine", "engine.scheduler.scheduler", "engine.kv.block_pool"} <= set(module_files())
    assert "engine.kv.kv_cache_manager" in runtime_graph()["engine.scheduler.scheduler"]
    bench_cli = {imp.target for imp in imports_of("engine.bench.cli")}
    assert "engine.bench.simulate" in bench_cli  # through importlib.import_module


def test_no_import_cycles() -> None:
    graph = runtime_graph()
    cycles = [shortest_cycle(graph, component) for component in strongly_connected_components(graph)]
    assert not cycles, "import cycles in engine/ (counting imports inside functions):\n  " + "\n  ".join(
        " -> ".join(cycle) + "\n    " + _describe_cycle(graph, cycle) for cycle in cycles)


@pytest.mark.parametrize(("package", "forbidden"), LAYERING_RULES, ids=[package for package, _ in LAYERING_RULES])
def test_layering(package: str, forbidden: tuple[str, ...]) -> None:
    violations = [f"{module}:{imp.line} imports {imp.target}"
                  for module in module_files() if _is_within(module, package)
                  for imp in imports_of(module)
                  if any(_is_within(imp.target, name) for name in forbidden)]
    assert not violations, f"{package} must not import {', '.join(forbidden)}:\n  " + "\n  ".join(violations)


def _load_time_imports(module: str) -> list[tuple[str, int | None]]:
    """(target, line) of what runs when `module` loads: its parent packages first (loading `a.b.c`
    runs `a` and `a.b`; no line), then its module-level imports outside TYPE_CHECKING."""
    parts = module.split(".")
    parents: list[tuple[str, int | None]] = [(".".join(parts[:i]), None) for i in range(1, len(parts))]
    return parents + [(imp.target, imp.line) for imp in imports_of(module)
                      if imp.is_module_level and not imp.is_type_checking]


def _where(module: str, line: int | None) -> str:
    return f"{module}:{line}" if line is not None else f"{module} (loading its parent package)"


@pytest.mark.parametrize("package", ["engine.scheduler", "engine.kv"])
def test_loading_stays_torch_free(package: str) -> None:
    """Loading any module of the package, and everything that loads with it, imports no torch:
    scheduling and KV bookkeeping tests then run without it."""
    for start in (m for m in module_files() if _is_within(m, package)):
        came_from: dict[str, tuple[str, int | None]] = {}
        queue = deque([start])
        while queue:
            module = queue.popleft()
            for target, line in _load_time_imports(module):
                if _is_within(target, "torch") or _is_within(target, "triton"):
                    chain = [f"{_where(module, line)} imports {target}"]
                    while module != start:
                        module, line = came_from[module]
                        chain.append(_where(module, line))
                    pytest.fail(f"loading {start} imports {target}: " + " <- ".join(chain))
                loaded = _engine_module(target) if _is_within(target, "engine") else None
                if loaded is not None and loaded != start and loaded not in came_from:
                    came_from[loaded] = (module, line)
                    queue.append(loaded)
