"""Low-passed calibration images: each resampled to a fraction of its size and back.

Why: synthetic calibration images are textures. On DINOv2 ViT-S/14 at 112 px, SARDFQ's and
PSAQ-ViT's sets put 28% and 25% of their pixel energy above 1/8 cycle per pixel, where real
(Fashion-MNIST, 28 px upscaled) images put 0.3% (docs/dinov2-accuracy.md). GPTQ fits its
rounding to the calibration tokens' correlations, so fine detail that no real image has may teach
it the wrong ones (measured on DINOv2 w4a16: no gain beyond the noise of GPTQ itself, so it is no
model's default). Resampling to half size and back removes most of that detail
and keeps the content. Natural photos also hold little energy there (their spectra fall as 1/f),
but how much low-pass suits them is not measured: only Fashion-MNIST is, whose images are
upscaled and so smoother than photos.
"""

from __future__ import annotations

import torch

from sardfq_export.core.errors import UserInputError


def lowpass(images: torch.Tensor, fraction: float) -> torch.Tensor:
    """``images`` (N, C, H, W) resized to ``fraction`` of H and W (bilinear, antialiased) and back.
    ``fraction`` 1: the images themselves (the same object)."""
    from torchvision.transforms.v2 import functional as TF

    if not 0.0 < fraction <= 1.0:
        raise UserInputError(
            f"the calibration low-pass is a fraction of the image size in (0, 1], got {fraction}"
        )
    if fraction == 1.0:
        return images
    size = list(images.shape[-2:])
    small = TF.resize(images, [max(1, round(s * fraction)) for s in size], antialias=True)
    return TF.resize(small, size, antialias=True)
