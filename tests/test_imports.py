"""The import contract (docs/architecture.md, "Import rules"), checked on the source.

Imports flow one way: cli -> tune -> train -> models / data. The graph is read from the
source with `ast`, function-level (lazy) imports included, because a lazy import that
closes a loop is still a loop a reader has to untangle; imports under `if TYPE_CHECKING:`
are left out, since they never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "rayrec"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imported_names(path: Path) -> set[str]:
    """Every module name an import statement in `path` names (absolute form, submodules resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def internal_edges() -> dict[str, set[str]]:
    """module -> the rayrec modules it imports (only names that are modules of the package)."""
    return {m: {n for n in imported_names(p) if n in MODULES and n != m} for m, p in MODULES.items()}


def external_roots(module: str) -> set[str]:
    return {n.split(".")[0] for n in imported_names(MODULES[module])}


def reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(edges[m])
    return seen


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return found


def test_the_graph_reader_sees_lazy_imports_and_finds_a_cycle():
    # The reader itself must work, or the contract tests below pass on an empty graph.
    edges = internal_edges()
    assert "rayrec.models" in edges["rayrec.tune.sweep"]  # imported inside run_sweep only
    assert len(edges) > 30
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    found = cycles(internal_edges())
    assert found == [], "import cycles (each list is one strongly connected set of modules): " + repr(found)


def test_models_train_and_data_never_import_tune_ray_or_wandb():
    edges = internal_edges()
    bad = []
    for m in MODULES:
        if not m.startswith(("rayrec.models", "rayrec.train", "rayrec.data")):
            continue
        for dep in reachable(m, edges):
            if dep.startswith("rayrec.tune"):
                bad.append(f"{m} reaches {dep}")
            forbidden = external_roots(dep) & {"ray", "wandb"}
            if forbidden:
                bad.append(f"{m} reaches {dep}, which imports {sorted(forbidden)}")
    assert bad == []


def test_ray_is_imported_only_under_tune_and_wandb_only_in_tracking():
    ray_users = sorted(m for m in MODULES if "ray" in external_roots(m))
    wandb_users = sorted(m for m in MODULES if "wandb" in external_roots(m))
    assert [m for m in ray_users if not m.startswith("rayrec.tune") and m != "rayrec.tracking"] == []
    assert wandb_users == ["rayrec.tracking"]


def test_data_does_not_import_config():
    edges = internal_edges()
    assert [m for m in MODULES if m.startswith("rayrec.data") and "rayrec.config" in reachable(m, edges)] == []


def test_models_import_only_torch_and_their_own_package():
    edges = internal_edges()
    for m in MODULES:
        if m.startswith("rayrec.models"):
            outside = {d for d in edges[m] if not d.startswith(("rayrec.models", "rayrec.errors", "rayrec.data"))}
            assert outside == set(), f"{m} imports {sorted(outside)}"


def test_import_rayrec_stays_light():
    code = ("import sys, rayrec, rayrec.config, rayrec.cli, rayrec.data, rayrec.errors; "
            "print(sorted(m for m in ('ray', 'wandb', 'torch', 'pandas', 'pyarrow', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
