"""Data flows one way: the stage packages never import the CLI or the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the stage packages may take from sardfq_export: the small dependency-free shared modules.
SHARED = {"sardfq_export.errors", "sardfq_export.calibset"}
ALLOWED = {
    "calibrators": SHARED,
    "validation": SHARED,
    "exporters": SHARED | {"calibrators"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_stage_packages_import_only_upstream():
    ours = ("sardfq_export", "calibrators", "exporters", "validation")
    for pkg, allowed in ALLOWED.items():
        for f in (ROOT / pkg).rglob("*.py"):
            for name in _imports(f):
                if not name.startswith(ours) or name.split(".")[0] == pkg:
                    continue
                ok = any(name == a or name.startswith(a + ".") for a in allowed)
                assert ok, f"{f.relative_to(ROOT)} imports {name}: stages only import upstream/shared modules"
