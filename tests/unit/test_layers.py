"""The layers of src/opensandbox_platform (docs/architecture.md): which package may import which.

A new import across packages that is not allowed here is a design change: change this table and
the one in docs/architecture.md together, or put the code where it belongs."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "opensandbox_platform"

ALLOWED: dict[str, set[str]] = {
    "daemon": set(),  # standard library only: execd and the task executor are small bundles
    "api": {"daemon", "kube"},  # kube: only the Resource type, to address our CRDs (api/resources.py)
    "kube": {"daemon"},
    "controller": {"daemon", "api", "kube"},
    "execd": {"daemon", "api"},
    "task_executor": {"daemon", "api"},
    "egress": {"daemon", "api"},
    # execd: the local runtime's jail init runs execd; egress: the local runtime enforces policies itself
    "server": {"daemon", "api", "kube", "execd", "egress"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "opensandbox_platform" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_packages_import_only_their_lower_layers() -> None:
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((SRC / package).rglob("*.py")):
            for target in imported_packages(path) - allowed - {package}:
                wrong.append(f"{path.relative_to(SRC)} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_every_package_has_a_layer() -> None:
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED)
