"""Framed calibration images: each image's outer band replaced by one flat grey.

Why: synthetic calibration images are texture from edge to edge, while the photos a classifier
sees mostly hold an object on a plainer background. On DINOv2 ViT-S/14 at 112 px the deep blocks'
activations differ most between the two (their fc2 inputs' 99.9th percentiles and qkv inputs'
maxima in blocks 7-10 are smaller on SARDFQ's images than on real ones), and a flat grey frame of a
quarter of the side moves them toward the real ones' (docs/dinov2-accuracy.md). The grey is drawn
per image, uniform in pixel space, so no dataset's background is assumed.
"""

from __future__ import annotations

import torch

from sardfq_export.core.errors import UserInputError


def frame(images: torch.Tensor, width: float, mean, std, seed: int = 0) -> torch.Tensor:
    """``images`` (N, C, H, W), normalized by ``mean``/``std`` (per channel), with a band of
    ``width`` times the side on each edge set to one grey per image, drawn uniformly in [0, 1]
    pixel space from ``seed``. ``width`` 0: the images themselves (the same object)."""
    if not 0.0 <= width < 0.5:
        raise UserInputError(
            f"the calibration frame is a fraction of the side in [0, 0.5) (0: off), got {width}"
        )
    if width == 0.0:
        return images
    n, c, h, w = images.shape
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    grey = torch.rand(n, generator=torch.Generator().manual_seed(seed)).to(images)
    flat = (grey.reshape(n, 1, 1, 1) - mean) / std  # (N, C, 1, 1): the grey, normalized per channel
    bh, bw = round(h * width), round(w * width)
    inside = torch.zeros(1, 1, h, w, dtype=torch.bool, device=images.device)
    inside[..., bh : h - bh, bw : w - bw] = True
    return torch.where(inside, images, flat.expand(n, c, 1, 1))
