"""Artifacts and their manifest: sha256 + size of every file, tool versions, the command line.

Every write here is atomic (temporary name, then rename): a half-written file never looks done.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from sardfq_export.core.io import atomic_write_json, sha256_file

TOOLS = (
    "torch",
    "timm",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx-graphsurgeon",
    "polygraphy",
    "numpy",
    "tensorrt",
    "sardfq-export",
)


def artifact_entry(path: str | Path, root: str | Path | None = None) -> dict:
    """``{path, sha256, bytes}`` of one file (path relative to ``root`` when given)."""
    path = Path(path)
    rel = os.path.relpath(path, root) if root is not None else str(path)
    return {"path": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def collect_artifacts(root: str | Path, names: dict[str, str | Path]) -> dict[str, dict]:
    """name → entry for every named file that exists under ``root``; folders are walked."""
    root = Path(root)
    out: dict[str, dict] = {}
    for name, rel in names.items():
        p = root / rel
        if p.is_file():
            out[name] = artifact_entry(p, root)
        elif p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file()):
                out[f"{name}/{f.relative_to(p)}"] = artifact_entry(f, root)
    return out


def tool_versions() -> dict[str, str | None]:
    """Installed versions of the tools an artifact depends on (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name == "sardfq-export":  # run from a checkout (PYTHONPATH, no install): its own version
                from sardfq_export._version import __version__

                out[name] = __version__
            elif name not in ("onnxruntime-gpu", "tensorrt"):
                out[name] = None
    return out


def write_manifest(
    root: str | Path,
    artifacts: dict[str, dict],
    command: list[str] | None = None,
    settings: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``root/manifest.json`` (atomically)."""
    manifest = {
        "format": "sardfq-manifest-1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command if command is not None else sys.argv,
        "versions": tool_versions(),
        "settings": settings or {},
        "artifacts": artifacts,
        **(extra or {}),
    }
    return atomic_write_json(Path(root) / "manifest.json", manifest)
