"""The vitad modules a script imports, transitively, read from the source (nothing is imported).

Counted: every ``import vitad...`` / ``from vitad... import ...`` anywhere in a module, also
inside functions (lazy imports run too), except under ``if TYPE_CHECKING:`` (never at run time).
Importing ``vitad.a.b`` runs ``vitad/__init__.py`` and ``vitad/a/__init__.py`` as well, and
``from vitad.a import b`` imports the submodule ``vitad/a/b.py`` when there is one.
"""

from __future__ import annotations

import ast
from pathlib import Path


def _module_file(root: Path, dotted: str) -> Path | None:
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    return skipped


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    modules = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names if alias.name.split(".")[0] == "vitad")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vitad" and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def import_closure(script: Path, root: Path) -> set[str]:
    """Repository-relative paths (``vitad/x.py``) of every vitad module ``script`` runs."""
    seen: set[Path] = set()
    pending = [script]
    while pending:
        path = pending.pop()
        for dotted in _imported_modules(path):
            parts = dotted.split(".")
            for depth in range(1, len(parts) + 1):  # parent packages run their __init__ first
                module = _module_file(root, ".".join(parts[:depth]))
                if module is not None and module not in seen:
                    seen.add(module)
                    pending.append(module)
    return {module.relative_to(root).as_posix() for module in seen}
