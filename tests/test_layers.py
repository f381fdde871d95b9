"""The import graph of kdpipe is layered, as docs/architecture.md says: no module imports
one above it, there are no circles, and only the store itself reaches inside the store."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

# From the ground floor up. A module may import modules of lower layers, and of its own
# layer as long as that makes no circle.
LAYERS = [
    {"pipeline", "pipeline.errors", "pipeline.config", "pipeline.views"},
    {"pipeline.distributed", "pipeline.host", "pipeline.progress", "pipeline.data", "pipeline.sources",
     "pipeline.models", "pipeline.coco", "pipeline.detectors", "pipeline.losses", "pipeline.probe", "pipeline.store", "pipeline.monitor", "pipeline.optim"},
    {"pipeline.objective", "pipeline.features", "pipeline.replay", "pipeline.rundir", "pipeline.precise_bn", "pipeline.evaluation",
     "pipeline.deploy"},
    {"pipeline.cache", "pipeline.train", "pipeline.detection", "pipeline.audit", "pipeline.order", "pipeline.report"},
    {"pipeline.bench", "pipeline.quickstart"},
    {"cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [REPO / "cli.py", *sorted((REPO / "pipeline").rglob("*.py"))]
    return {module_name(path): path for path in files}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, at the top or inside functions alike."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(module: str) -> int:
    """The layer of a module; a module inside the store package is in the store's layer."""
    while module:
        for level, members in enumerate(LAYERS):
            if module in members:
                return level
        module = module.rpartition(".")[0]
    raise AssertionError("unreachable")


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def test_every_module_has_a_layer():
    unplaced = [name for name in project_modules() if not any(name in layer for layer in LAYERS)
                and not name.startswith("pipeline.store.")]
    assert not unplaced, f"add these modules to a layer in LAYERS and docs/architecture.md: {unplaced}"


def test_no_module_imports_one_above_it():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets if layer_of(b) > layer_of(a)]
    assert not upward, upward


def test_only_the_store_reaches_inside_the_store():
    inside = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
              if b.startswith("pipeline.store.") and not a.startswith("pipeline.store")]
    assert not inside, f"import the store's public names from pipeline.store instead: {inside}"


def test_the_import_graph_has_no_circle():
    edges = graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(edges.get(module, ())):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])


def test_the_checker_sees_circles_and_upward_imports(tmp_path):
    """The checks above can fail: a config that imports losses is both upward and, with
    losses importing config, part of a circle."""
    config = imports_of("pipeline.config", REPO / "pipeline" / "config.py", {"pipeline.losses"})
    assert config == set()  # today: config imports nothing above it
    fake = tmp_path / "config.py"
    fake.write_text("def f():\n    from .losses import kd_loss\n")
    found = imports_of("pipeline.config", fake, {"pipeline.config", "pipeline.losses"})
    assert found == {"pipeline.losses"} and layer_of("pipeline.losses") > layer_of("pipeline.config")


MAX_FUNCTION_LINES = 80  # a function longer than a screen is read in pieces: split it


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long
