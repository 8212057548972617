"""Framed calibration images: a finished set's outer band replaced by one flat grey per image.

Why a frame, and the band itself: :mod:`sardfq_export.core.frame` (synthesis can also frame the
images while it optimizes them, ``SynthConfig.frame``). This frames a set after the fact
(``--calib-frame``): a flat grey band of a quarter of the side moves DINOv2 ViT-S/14's deep-block
activations toward real images' (docs/dinov2-accuracy.md).
"""

from __future__ import annotations

import torch

from sardfq_export.core.errors import UserInputError
from sardfq_export.core.frame import flat_band


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
    grey = torch.rand(images.shape[0], generator=torch.Generator().manual_seed(seed))
    return flat_band(images, width, grey, mean, std)
