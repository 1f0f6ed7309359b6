"""The package's shape: no import circles between its modules (imports inside functions
count), and the modules that moved into subpackages still answer to their old names."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lrmerge_hub"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, anywhere in it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = [p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]
    modules = {module_name(p) for p in paths}
    # a package's __init__ re-exports from its modules: an edge from it is not a circle
    return {
        module_name(p): {m for m in imported_modules(p, modules) if not m.startswith(module_name(p) + ".")}
        for p in paths
    }


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_package_has_no_import_circles():
    graph = import_graph()
    assert len(graph) > 40 and graph["lrmerge_hub.run.pipeline"]  # the walk found the package
    assert circles(graph) == []


def test_a_circle_is_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_lower_modules_import_nothing_above_them():
    graph = import_graph()
    for low in ("lrmerge_hub.errors", "lrmerge_hub.settings", "lrmerge_hub.metadata", "lrmerge_hub.interrupt"):
        assert graph[low] <= {"lrmerge_hub.errors", "lrmerge_hub.settings"}, (low, graph[low])
    for module, imports in graph.items():
        if module.startswith(("lrmerge_hub.merge", "lrmerge_hub.recipe", "lrmerge_hub.hub")):
            above = {
                m
                for m in imports
                if m.startswith(
                    (
                        "lrmerge_hub.run",
                        "lrmerge_hub.card",
                        "lrmerge_hub.serve",
                        "lrmerge_hub.evaluate",
                        "lrmerge_hub.cli",
                    )
                )
            }
            assert not above, (module, above)


@pytest.mark.parametrize(
    "old, new",
    [
        ("lrmerge_hub.gate", "lrmerge_hub.serve.gate"),
        ("lrmerge_hub.pipeline", "lrmerge_hub.run.pipeline"),
        ("lrmerge_hub.hub_stream", "lrmerge_hub.hub.stream"),
        ("lrmerge_hub.card_rules", "lrmerge_hub.metadata"),
    ],
)
def test_a_moved_module_answers_to_its_old_name(old, new):
    import importlib

    assert importlib.import_module(old) is importlib.import_module(new)


def test_the_router_runs_under_its_old_module_name():
    for name in ("lrmerge_hub.gate", "lrmerge_hub.serve.gate"):
        done = subprocess.run(
            [sys.executable, "-m", name, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
        )
        assert done.returncode == 0 and "--route" in done.stdout and not done.stderr, (name, done.stderr)


def test_the_files_the_serving_images_copy_are_enough_for_the_key_check(tmp_path):
    copied = []
    for dockerfile in ROOT.glob("serving/*Dockerfile*"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY lrmerge_hub/"):
                copied += [p for p in line.split()[1:-1] if p.startswith("lrmerge_hub/")]
    assert "lrmerge_hub/serve/gate.py" in copied
    for path in set(copied):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes((ROOT / path).read_bytes())
    # -S: no site-packages, so nothing but the copied files (and the standard library) is importable
    code = "import lrmerge_hub.serve.gate as a, lrmerge_hub.gate as b; assert a is b; print(a.RequireKey.__name__)"
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "RequireKey", done.stderr
