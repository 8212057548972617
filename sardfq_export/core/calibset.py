"""The calibration-set format shared by synthesis (writer) and calibrators (reader).

One ``.safetensors`` file: ``images`` (N, C, H, W) float32 in the model's *normalized* input space,
optional ``targets`` (N, classes) float32 soft-target probabilities, optional ``labels`` (N,)
int64, optional ``regions`` (N, K, 4) int64 ``(top, left, bottom, right)`` in pixels with
``region_labels`` (N, K) int64 (-1 = unused slot). Everything else (method, every
hyper-parameter, seed, loss curve, wall time) is JSON, stored in the file's metadata under
``calib_json`` and mirrored to a ``.json`` file beside it for people.
Dependency-free on purpose: any stage may import it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sardfq_export.core.checkpoint import read_safetensors
from sardfq_export.core.errors import UserInputError
from sardfq_export.core.io import atomic_path, atomic_write_text

TENSOR_KEYS = ("images", "targets", "labels", "regions", "region_labels")


@dataclass
class CalibSet:
    """Calibration images (+ targets) and the metadata that says how they were made."""

    images: torch.Tensor
    targets: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    regions: torch.Tensor | None = None
    region_labels: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, batch_size: int = 32) -> Iterator[torch.Tensor]:
        """Image batches in order (the forward-loop data source of calibration)."""
        for s in range(0, len(self), batch_size):
            yield self.images[s : s + batch_size]

    def split(self, n_first: int) -> tuple[CalibSet, CalibSet]:
        """The first ``n_first`` images and the rest (e.g. calibration vs held-out fidelity)."""

        def part(sl: slice) -> CalibSet:
            pick = {k: (getattr(self, k)[sl] if getattr(self, k) is not None else None) for k in TENSOR_KEYS}
            return CalibSet(**pick, meta=dict(self.meta))

        return part(slice(0, n_first)), part(slice(n_first, None))

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary name, then rename) plus the JSON mirror."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {
            k: getattr(self, k).detach().cpu().contiguous()
            for k in TENSOR_KEYS
            if getattr(self, k) is not None
        }
        text = json.dumps(self.meta, sort_keys=True, default=str)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"calib_json": text, "format": "sardfq-calibset-1"})
        atomic_write_text(
            path.with_suffix(".json"), json.dumps(self.meta, indent=2, sort_keys=True, default=str) + "\n"
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibSet:
        """Read a file written by :meth:`save`; anything else is refused with a clear message."""
        path = Path(path)
        if not path.is_file():
            raise UserInputError(
                f"calibration set {path} does not exist: run 'sardfq-export synthesize' first"
            )
        tensors, meta = read_safetensors(path, "calibration set")
        if "images" not in tensors or "calib_json" not in meta:
            raise UserInputError(f"{path} is not a sardfq-export calibration set (no images/calib_json)")
        return cls(**{k: tensors.get(k) for k in TENSOR_KEYS}, meta=json.loads(meta["calib_json"]))
