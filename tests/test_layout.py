"""The code's layout: imports only go downward (cp <- models <- trainer <- scripts), with no circles.

    every .py under cp/ models/ trainer/ scripts/ ──ast (module-level AND function-level imports)──> module graph
        1. a layer imports only the layers below it (tests/ import anything, nothing imports tests/, except
           scripts/family_sweep.py, which is the command line of tests/family_sweep.py)
        2. the graph has no cycle (a lazy import that closes a circle counts: it only hides the circle)
        3. no file imports a module by the old path it had before the job folders (models/, trainer/
           __init__'s MOVED_MODULES); each old path still imports the module it moved to, with a warning
"""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("cp", "models", "trainer", "scripts")  # each may import only those before it (and itself)
SCRIPT_MAY_IMPORT_TESTS = {"scripts.family_sweep"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))
            if ".venv" not in p.parts}


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """Every absolute import in the file as (module, name): `import a.b` -> (a.b, None), `from a import b` -> (a, b)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def _imported_names(path: Path) -> set[str]:
    """The module names a file's imports mention (for `from a import b`: a and a.b)."""
    return {n for module, name in _imports(path) for n in (module, f"{module}.{name}" if name else module)}


def _as_project_module(name: str, modules: dict[str, Path], importer: str) -> str | None:
    """The project module an imported name refers to (None: third-party). scripts/ puts scripts/ on sys.path,
    so its `bench.x` is scripts.bench.x."""
    candidates = [name]
    if importer.startswith("scripts."):
        candidates.append(f"scripts.{name}")
    for candidate in candidates:
        while candidate:
            if candidate in modules:
                return candidate
            candidate = candidate.rpartition(".")[0]
    return None


def _target(module: str, name: str | None, modules: dict[str, Path], importer: str) -> str | None:
    """The project module an import depends on: for `from a import b` the submodule a.b where there is one, else a.
    (A package's __init__ runs before any of its submodules: that implicit step is not an edge.)"""
    if name is not None:
        submodule = _as_project_module(f"{module}.{name}", modules, importer)
        if submodule is not None and submodule.endswith(f".{name}"):
            return submodule
    return _as_project_module(module, modules, importer)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        targets = {_target(m, n, modules, module) for m, n in _imports(path)}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def _layer(module: str) -> str:
    return module.split(".")[0]


def test_imports_only_go_downward():
    wrong = []
    for module, targets in _graph().items():
        allowed = LAYERS[:LAYERS.index(_layer(module)) + 1]
        wrong += [f"{module} imports {t}" for t in sorted(targets) if _layer(t) not in allowed]
    for path in sorted(ROOT.glob("scripts/**/*.py")):
        module = _module_name(path)
        if module not in SCRIPT_MAY_IMPORT_TESTS:
            wrong += [f"{module} imports {n}" for n in sorted(_imported_names(path)) if n.split(".")[0] == "tests"]
    assert not wrong, "imports that go upward (cp <- models <- trainer <- scripts):\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (lazy imports included):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _moved_modules() -> dict[str, str]:
    import models
    import trainer
    return {**models.MOVED_MODULES, **trainer.MOVED_MODULES}


def test_no_file_imports_an_old_path():
    moved = _moved_modules()
    files = [p for layer in (*LAYERS, "tests") for p in sorted((ROOT / layer).rglob("*.py"))]
    stale = [f"{p.relative_to(ROOT)}: {n}" for p in files for n in sorted(_imported_names(p)) if n in moved]
    assert not stale, "imports of moved modules by their old path:\n" + "\n".join(stale)


@pytest.mark.parametrize("old", sorted(_moved_modules()))
def test_an_old_path_imports_the_moved_module(old):
    new = _moved_modules()[old]
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new), f"{old} is not {new}"
    assert any(new in str(w.message) and issubclass(w.category, FutureWarning) for w in caught), \
        f"importing {old} warned {[str(w.message) for w in caught]}, expected the new place {new}"
