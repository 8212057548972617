"""The house's arrows (DESIGN.md): cli → job → api → stages → models → data → core, never back.

Every Python file of the package (the top-level stage folders included, under their installed
names) is parsed, and each import of our own code, at module level or inside a function, must
point to a layer the importing layer may use. Data flows one way: synthesis → calibrators →
exporters → validation, so a stage may import an upstream stage and never a downstream one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "sardfq_export"
# Source folder → installed package name (pyproject's package-dir mapping).
FOLDERS = {"sardfq_export": PKG, "calibrators": f"{PKG}.calibrators", "exporters": f"{PKG}.exporters",
           "validation": f"{PKG}.validation"}  # fmt: skip

CORE = {"core", "_version"}
STAGES = {"synthesis", "calibrators", "exporters", "validation"}
# layer → the layers it may import (besides itself). "" is the package's __init__/__main__.
ALLOWED: dict[str, set[str]] = {
    "_version": set(),
    "core": set(),
    "data": CORE,
    "models": CORE | {"data"},
    "synthesis": CORE | {"data", "models"},
    "calibrators": CORE | {"models"},
    "exporters": CORE | {"models", "calibrators"},
    "validation": CORE | {"data", "models", "calibrators", "exporters"},
    "api": CORE | {"data", "models"} | STAGES,
    "jobcache": CORE,
    "job": CORE | {"data", "models", "api", "jobcache"} | STAGES,
    "cli": CORE | {"data", "models", "api", "jobcache", "job"} | STAGES,
    "": {"_version", "cli"},  # __init__ resolves the API lazily by name (importlib), not by import
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    base = FOLDERS[rel.parts[0]]
    parts = [p for p in rel.with_suffix("").parts[1:] if p != "__init__"]
    return ".".join([base, *parts])


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] not in ("__main__",) else ""


def _our_imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports (``from X import Y`` counts X.Y when Y is a module)."""
    known = {_module_name(f) for folder in FOLDERS for f in (ROOT / folder).rglob("*.py")}
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in known:
                    names.add(sub)
                elif (node.module, a.name) == (PKG, "__version__"):
                    names.add(f"{PKG}._version")  # re-exported by __init__ from there
                else:
                    names.add(node.module)
    return {n for n in names if n == PKG or n.startswith(PKG + ".")}


def _files() -> list[Path]:
    return sorted(f for folder in FOLDERS for f in (ROOT / folder).rglob("*.py"))


def forbidden_imports() -> list[str]:
    bad = []
    for f in _files():
        mine = _layer(_module_name(f))
        for name in _our_imports(f):
            theirs = _layer(name)
            if theirs != mine and theirs not in ALLOWED[mine]:
                bad.append(f"{f.relative_to(ROOT)} ({mine or PKG}) imports {name} ({theirs or PKG})")
    return bad


def test_every_file_belongs_to_a_known_layer():
    unknown = {_layer(_module_name(f)) for f in _files()} - set(ALLOWED)
    assert not unknown, f"layers without rules: {unknown}; add them to ALLOWED"


def test_imports_follow_the_arrows():
    assert forbidden_imports() == []


def test_the_layer_rules_are_acyclic():
    # a cycle between layers would make the arrows meaningless
    seen: dict[str, int] = {}

    def visit(layer: str, stack: tuple[str, ...]) -> None:
        assert layer not in stack, f"layer cycle: {' → '.join((*stack, layer))}"
        for dep in ALLOWED[layer]:
            visit(dep, (*stack, layer))
        seen[layer] = 1

    for layer in ALLOWED:
        visit(layer, ())


@pytest.mark.parametrize(
    ("file", "line"),
    [
        ("sardfq_export/models/loading.py", "from sardfq_export import calibrators"),
        ("sardfq_export/models/reference.py", "from sardfq_export.validation import report"),
        ("calibrators/scheme.py", "from sardfq_export.exporters import lint"),
        ("sardfq_export/synthesis/losses.py", "import sardfq_export.api"),
        ("validation/gates.py", "from sardfq_export.cli import main"),
    ],
)
def test_a_forbidden_import_is_caught(file, line, tmp_path, monkeypatch):
    """The checker itself can fail: the same tree with one bad import added is refused."""
    path = ROOT / file
    original = path.read_text()
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (
        original + "\n" + line + "\n" if self == path else Path.read_bytes(self).decode()))  # fmt: skip
    bad = forbidden_imports()
    assert len(bad) == 1 and bad[0].startswith(file), bad
