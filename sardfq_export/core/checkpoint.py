"""Checkpoints of resumable work: tensors plus a JSON state in one safetensors file.

Synthesis (``synthesis/runner.py``) and PSAQ-ViT V2's adaptive rounds (``calibrators/adaptive.py``)
both save their progress this way so that Ctrl-C, SIGTERM or a crash loses at most one step. The
file is written atomically (never half a checkpoint) and tagged with a format string, so that a
file from another stage, another version or a crash in mid-write is refused with a one-line error
that says what to do, not unpickled into the wrong place.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sardfq_export.core.errors import UserInputError
from sardfq_export.core.io import atomic_path


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], state: dict, fmt: str) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"format": fmt, "state": json.dumps(state, sort_keys=True, default=str)},
        )


def read_safetensors(path: str | Path, what: str, hint: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of any safetensors file; an unreadable one (torn, foreign, not
    safetensors) is one :class:`UserInputError` naming ``what`` and the path, then ``hint``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise UserInputError(f"cannot read {what} {path} ({exc}){hint}") from None
    return tensors, meta


def load_checkpoint(path: str | Path, fmt: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, state)`` of a checkpoint written by :func:`save_checkpoint` with the same ``fmt``;
    ``what`` names it in the error ("synthesis checkpoint")."""
    tensors, meta = read_safetensors(path, what, "; delete it to start over")
    if meta.get("format") != fmt or "state" not in meta:
        raise UserInputError(f"{path} is not a {what}; delete it to start over")
    return tensors, json.loads(meta["state"])


def curve_rows(n: int, points: int) -> list[int]:
    """Indices of at most ``points`` + 1 evenly spaced rows of an ``n``-row loss history, always
    keeping the last row (the final loss is the number people read off a curve)."""
    step = max(1, -(-n // points))
    idx = list(range(0, n, step))
    if n and idx[-1] != n - 1:
        idx.append(n - 1)
    return idx
