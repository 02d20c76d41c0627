"""The package's import graph: no cycles, runtime code never imports the benchmarks, the models never import
torch.distributed; and the tests mirror the package, module by module.

The graph is read from the source with `ast`, so it sees every `import` and `from ... import`,
including those inside functions and `if TYPE_CHECKING:` blocks, which an import at run time
would only reach some of the time.
"""

import ast
from collections import deque
from pathlib import Path

import tp_ollama

PACKAGE_DIR = Path(tp_ollama.__file__).parent
BENCH = "tp_ollama.bench"

Graph = dict[str, set[str]]


def module_name(path: Path, root: Path = PACKAGE_DIR) -> str:
    """`tp_ollama/parallel/comm.py` -> `tp_ollama.parallel.comm`; a package's `__init__.py` -> the package."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def _known_prefix(name: str, modules: set[str]) -> str | None:
    """The longest prefix of dotted `name` that is a module of the package (None: outside it)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None


def imports_of(name: str, source: str, modules: set[str], is_package: bool = False) -> set[str]:
    """The package modules that module `name` imports anywhere in `source`.

    Relative imports resolve against the module's package; `from pkg import x` goes to
    `pkg.x` when that is a module, else to `pkg` itself.
    """
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known_prefix(alias.name, modules)
                if target is not None:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                target = _known_prefix(f"{base}.{alias.name}", modules)
                if target is not None:
                    found.add(target)
    found.discard(name)
    return found


def import_graph(root: Path = PACKAGE_DIR) -> Graph:
    modules = package_modules(root)
    names = set(modules)
    return {
        name: imports_of(name, path.read_text(), names, path.name == "__init__.py") for name, path in modules.items()
    }


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        # Iterative depth-first search: each frame is a node and the iterator over its edges.
        frames = [(node, iter(sorted(graph.get(node, ()))))]
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        while frames:
            current, edges = frames[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    frames.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[current] = min(low[current], index[nxt])
                continue
            frames.pop()
            if frames:
                parent = frames[-1][0]
                low[parent] = min(low[parent], low[current])
            if low[current] == index[current]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == current:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def shortest_cycle(graph: Graph, start: str) -> list[str]:
    """A shortest path of imports from `start` back to itself (breadth first), `start` at both ends."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [start, *reversed(path[:-1]), start] if node != start else [start, start]
            if nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    return []


def describe_cycles(graph: Graph) -> list[str]:
    return [
        f"{len(component)} modules {component}, e.g. {' -> '.join(shortest_cycle(graph, component[0]))}"
        for component in strongly_connected(graph)
    ]


def test_cycle_finder_finds_a_planted_cycle():
    graph = {
        "a": {"b"},
        "b": {"c", "d"},
        "c": {"a"},
        "d": {"e"},
        "e": {"d"},
        "f": {"a"},
    }
    assert strongly_connected(graph) == [["a", "b", "c"], ["d", "e"]]
    assert shortest_cycle(graph, "a") == ["a", "b", "c", "a"]
    assert shortest_cycle(graph, "d") == ["d", "e", "d"]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_imports_resolve_relative_and_from_package_names():
    modules = {"p", "p.sub", "p.sub.x", "p.sub.y", "p.z"}
    source = (
        "import os\n"
        "import p.z\n"
        "from . import y\n"
        "from .. import z\n"
        "from p.sub import helper\n"
        "def f():\n"
        "    from p.sub.y import thing\n"
    )
    assert imports_of("p.sub.x", source, modules) == {"p.z", "p.sub.y", "p.sub"}
    assert imports_of("p.sub", "from . import x\nfrom .y import g\n", modules, is_package=True) == {
        "p.sub.x",
        "p.sub.y",
    }


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "tp_ollama.parallel.fastcomm_shm" in graph["tp_ollama.parallel.fastcomm"]  # at the top
    assert "tp_ollama.checkpoints.quantize" in graph["tp_ollama.checkpoints.loader"]  # inside a function
    assert graph["tp_ollama.bench.cli"], "the benchmarks' CLI imports other modules of the package"


def test_no_import_cycles():
    cycles = describe_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# The command line assembles every command, `tp-ollama bench` among them: it registers the benchmarks'
# command group and nothing else of theirs. No module that serves, loads or computes imports them.
BENCH_REGISTRAR = {"tp_ollama.cli": ["tp_ollama.bench.cli"]}


def test_runtime_code_does_not_import_the_benchmarks():
    graph = import_graph()
    offenders = {
        name: sorted(target for target in targets if target == BENCH or target.startswith(BENCH + "."))
        for name, targets in graph.items()
        if not (name == BENCH or name.startswith(BENCH + "."))
    }
    for name, allowed in BENCH_REGISTRAR.items():
        assert offenders.pop(name, []) in ([], allowed), f"{name} imports more of {BENCH} than its command group"
    offenders = {name: bench for name, bench in offenders.items() if bench}
    assert not offenders, f"modules outside {BENCH} that import it: {offenders}"


# The Code map in README.md: each top-level part of the package, bottom to top. A part may import
# only parts listed before it (and itself); `tp_ollama` is the package's own __init__ (its version).
LAYERS = [
    "tp_ollama", "errors", "logs", "launch", "cli_support", "config", "kernels", "models", "checkpoints", "store",
    "text", "parallel", "engine", "membership", "completion", "client", "server", "oneshot_ranks", "oneshot", "bench",
    "cli", "__main__",
]  # fmt: skip


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_the_parts_of_the_package_form_the_layers_of_the_code_map():
    graph = import_graph()
    assert {part_of(m) for m in graph} == set(LAYERS), "a part of the package is missing from LAYERS"
    upward = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        for t in targets
        if LAYERS.index(part_of(t)) > LAYERS.index(part_of(m))
    )
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_models_do_not_import_torch_distributed():
    root = PACKAGE_DIR / "models"
    offenders = [p.name for p in root.glob("*.py") if "torch.distributed" in p.read_text()]
    assert offenders == []


TESTS_DIR = Path(__file__).parent

# Modules with no logic of their own, so no test file of their own: what they define is exercised by the
# tests of the modules that use it.
NO_LOGIC = {
    "tp_ollama.checkpoints.base": "the Checkpoint protocol and a one-line range check",
    "tp_ollama.errors": "the exception classes",
    "tp_ollama.models": "the registry of families (a dict) and its two lookups (refusal: parallel/test_shapes.py)",
    "tp_ollama.parallel.facts": "one dict of a rank's host, process and memory figures",
    "tp_ollama.server.engine_api": "the Engine protocol and the dataclasses it passes",
}
# Engine modules whose tests still live in other files (test_direct.py, test_batch.py, the parity tests).
NOT_YET_MIRRORED = {
    "tp_ollama.engine.kv_cache": "the contiguous KV cache, used by every model test",
}


def mirrored_test_file(path: Path, root: Path = PACKAGE_DIR, tests: Path = TESTS_DIR) -> Path:
    """`tp_ollama/<pkg>/<mod>.py` -> `tests/<pkg>/test_<mod>.py`; a package's `__init__.py` counts as a
    module named after the package (`tp_ollama/kernels/native/__init__.py` -> `tests/kernels/test_native.py`)."""
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return tests.joinpath(*parts[:-1], f"test_{parts[-1]}.py")


def defines_something(source: str) -> bool:
    """Whether a module defines a function or a class (package markers and `__main__` do not)."""
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) for node in ast.parse(source).body
    )


def test_the_mirror_of_a_module_and_of_a_package():
    root, tests = Path("/src/tp_ollama"), Path("/src/tests")
    assert mirrored_test_file(root / "launch.py", root, tests) == tests / "test_launch.py"
    assert mirrored_test_file(root / "server" / "app.py", root, tests) == tests / "server" / "test_app.py"
    assert (
        mirrored_test_file(root / "kernels" / "native" / "__init__.py", root, tests)
        == tests / "kernels" / "test_native.py"
    )
    assert not defines_something('"""docs"""\nfrom x import y\nNAME = 1\n')
    assert defines_something("class A:\n    pass\n") and defines_something("async def f():\n    pass\n")


def test_every_module_with_logic_has_its_mirrored_test_file():
    allowed = NO_LOGIC | NOT_YET_MIRRORED
    missing, stale = [], []
    for name, path in package_modules().items():
        if name == PACKAGE_DIR.name or not defines_something(path.read_text()):
            continue
        mirror = mirrored_test_file(path)
        if name in allowed:
            if mirror.exists():
                stale.append(f"{name} has {mirror.relative_to(TESTS_DIR.parent)}: take it off the allowlist")
        elif not mirror.exists():
            missing.append(f"{name}: {mirror.relative_to(TESTS_DIR.parent)}")
    gone = sorted(set(allowed) - set(package_modules()))
    assert not missing, "modules without their mirrored test file:\n" + "\n".join(missing)
    assert not stale and not gone, f"allowlist out of date: {stale + gone}"
