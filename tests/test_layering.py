"""The house plan's import rules, read from the source: directions between the packages, no cycles.

Every `import` statement counts, also those inside functions (a lazy import is still a
dependency), and so does `importlib.import_module("<a literal name>")`; only
`if TYPE_CHECKING:` blocks are left out. A module importing its own parent
package is not counted: Python runs a package's __init__ first anyway.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fm3d", "pretrain", "downstream", "ehr")
# Who may not import whom (ARCHITECTURE.md, "Folders and who may import whom").
FORBIDDEN = {
    "fm3d": ("pretrain", "downstream", "ehr"),
    "pretrain": ("downstream",),
    "downstream": ("pretrain",),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of the project modules `tree` imports."""
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func).endswith("import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(str(node.args[0].value))
        stack.extend(ast.iter_child_nodes(node))
    return {n for n in names if n.split(".")[0] in PACKAGES}


@pytest.fixture(scope="module")
def import_graph() -> nx.DiGraph:
    files = {_module_name(p): p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        for name in _imported(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            # `from pkg import name` names a module when pkg/name.py exists, else an attribute of pkg.
            target = name if name in files else name.rsplit(".", 1)[0]
            if target in files and target != module and not module.startswith(f"{target}."):
                graph.add_edge(module, target)
    return graph


def test_the_packages_import_only_in_the_allowed_directions(import_graph: nx.DiGraph) -> None:
    wrong = [
        f"{a} imports {b}"
        for a, b in import_graph.edges
        if b.split(".")[0] in FORBIDDEN.get(a.split(".")[0], ())
    ]
    assert not wrong, wrong


def test_no_module_imports_itself_round_a_cycle(import_graph: nx.DiGraph) -> None:
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph) if len(c) > 1]
    assert not cycles, cycles
