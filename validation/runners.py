"""One small interface to run anything (torch, ONNX Runtime, TensorRT): images in, logits out."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class Runner(Protocol):
    """Maps a float (B, C, H, W) batch in the model's normalized space to (B, classes) logits."""

    name: str  # e.g. "torch-fp32", "onnxruntime"
    device: str  # e.g. "cpu", "cuda:0"

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class TorchRunner:
    """A torch module (float or fake-quant) behind the runner interface."""

    def __init__(self, model: nn.Module, name: str = "torch-fp32", device: str | None = None):
        self.device = device or str(next(model.parameters(), torch.empty(0)).device)
        self.model = model.eval().to(self.device)
        self.name = name

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.device)).float().cpu()
