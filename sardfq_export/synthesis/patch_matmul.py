"""The patch embedding as one matmul, for synthesis's backward pass to the pixels.

A ViT's patch embedding is a convolution whose kernel equals its stride: every output token is one
``C·p·p`` patch times the ``(C·p·p) × D`` weight. Synthesis differentiates the teacher with respect
to its input, and on CPU oneDNN's input-gradient kernel for that strided convolution took about
5% of a deit_tiny@224 bf16 step (torch profiler, 2026-12-04), several times what the same FLOPs
cost as a matmul. :class:`PatchMatmul` computes the same products as ``patches @ Wᵀ + b`` (the
same numbers up to float summation order, tested), so forward and backward are plain GEMMs and a
reshape. :func:`patch_matmul` swaps it in for the duration of a context.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


def _is_patchify(conv: object) -> bool:
    """A Conv2d that cuts non-overlapping patches: kernel == stride, no padding, dilation or groups."""
    return (
        type(conv) is nn.Conv2d
        and tuple(conv.kernel_size) == tuple(conv.stride)
        and tuple(conv.padding) == (0, 0)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def autocast_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``x``, ``weight``, ``bias`` cast to the autocast dtype when autocast is on (else as given).

    What autocast does to a Linear's operands, done once by the caller: the frozen teacher's
    weights are skipped by autocast's cast cache, and an input used by several Linears would be
    cast once per use. The same numbers either way."""
    if not torch.is_autocast_enabled(x.device.type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(x.device.type)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


class PatchMatmul(nn.Module):
    """Drop-in for a patchify ``Conv2d``: (B, C, H, W) → (B, D, H/p, W/p), computed as one matmul."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv  # the original module keeps owning the parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        ph, pw = conv.kernel_size
        b, c, h, w = x.shape
        gh, gw = h // ph, w // pw
        x = x[:, :, : gh * ph, : gw * pw]  # a conv with stride p drops a partial last patch
        # Cast before the patch reshuffle, so the copy it needs moves half the bytes.
        x, weight, bias = autocast_operands(x, conv.weight, conv.bias)
        patches = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
        y = F.linear(patches, weight.reshape(weight.shape[0], -1), bias)  # (B, gh·gw, D)
        return y.transpose(1, 2).unflatten(2, (gh, gw))  # the conv's NCHW layout, as a view


@contextmanager
def patch_matmul(model: nn.Module) -> Iterator[int]:
    """Swap every patchify ``Conv2d`` named ``*.proj`` under a ``patch_embed`` for a
    :class:`PatchMatmul` while the context is open; yields how many were swapped. Put back on exit,
    even on error."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, module in model.named_modules():
            if name.split(".")[-1] != "patch_embed":
                continue
            conv = getattr(module, "proj", None)
            if _is_patchify(conv):
                module.proj = PatchMatmul(conv)
                swapped.append((module, "proj", conv))
        yield len(swapped)
    finally:
        for module, attr, conv in swapped:
            setattr(module, attr, conv)
