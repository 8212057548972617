"""A flat grey band around an image: the layout of an object photographed on a plain background.

Used twice: synthesis can optimize only the inside of the band (``SynthConfig.frame``), so the
model's loss shapes an object that sits on a flat surround, and ``calibrators.frame`` frames a
finished set after the fact. Why: synthetic images are texture from edge to edge, photos mostly an
object on a plainer background, and on DINOv2 ViT-S/14 the deep blocks' activations differ most
between the two (docs/dinov2-accuracy.md). The grey is one pixel value per image, drawn uniformly
in [0, 1] by the caller, so no dataset's background is assumed. In core because both the synthesis
and the calibrators stage use it, and stages never import each other backwards.
"""

from __future__ import annotations

import torch


def band_inside(h: int, w: int, width: float, device=None) -> torch.Tensor:
    """(1, 1, h, w) bool: True inside a band of ``width`` times the side on each edge."""
    bh, bw = round(h * width), round(w * width)
    return windows_inside(h, w, torch.tensor([[bh, bh, bw, bw]], device=device))


def windows_inside(h: int, w: int, bands: torch.Tensor) -> torch.Tensor:
    """(N, 1, h, w) bool: True inside each image's window, ``bands`` (N, 4) its band widths in
    pixels on the top, bottom, left and right edges."""
    rows = torch.arange(h, device=bands.device).reshape(1, h, 1)
    cols = torch.arange(w, device=bands.device).reshape(1, 1, w)
    top, bottom, left, right = (bands[:, k].reshape(-1, 1, 1) for k in range(4))
    inside = (rows >= top) & (rows < h - bottom) & (cols >= left) & (cols < w - right)
    return inside.unsqueeze(1)


def flat_outside(images: torch.Tensor, inside: torch.Tensor, greys: torch.Tensor, mean, std) -> torch.Tensor:
    """``images`` (N, C, H, W), normalized by ``mean``/``std`` (per channel), with every pixel
    outside ``inside`` ((1 or N, 1, H, W) bool) set to ``greys`` (N,) pixel values in [0, 1], each
    through every channel's mean/std. Differentiable in the inside pixels."""
    n, c = images.shape[:2]
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    flat = (greys.to(images).reshape(n, 1, 1, 1) - mean) / std  # (N, C, 1, 1)
    return torch.where(inside.to(images.device), images, flat.expand(n, c, 1, 1))


def flat_band(images: torch.Tensor, width: float, greys: torch.Tensor, mean, std) -> torch.Tensor:
    """``images`` with the band of ``width`` times the side on each edge set to ``greys``
    (:func:`flat_outside`); ``width`` 0 returns ``images``."""
    if width == 0.0:
        return images
    h, w = images.shape[-2:]
    return flat_outside(images, band_inside(h, w, width, images.device), greys, mean, std)
