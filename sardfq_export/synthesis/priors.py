"""Random structured attention priors for SARDFQ's APA: Gaussian mixtures over the patch grid.

Per image, block and head [paper]: K ~ U{1..K_APA} components. [default] means uniform over the
grid, isotropic std ~ U(std_lo, std_hi) patches on a 14-side grid (scaled with the grid side),
mixing weights ~ Dirichlet(alpha); the mixture density is evaluated at patch centres and
normalized to sum 1 (the loss rescales it to the attention's mass).
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Random streams, so each kind of draw has its own generator per image.
STREAM_INIT, STREAM_LABELS, STREAM_PRIORS, STREAM_AUG, STREAM_TAU, STREAM_FRAME = 1, 2, 3, 4, 5, 6
STREAM_WINDOW = 7  # frame_jitter's band widths


def generator(seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator seeded from (seed, image index, stream): independent of batch order."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index), int(stream)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def gmm_prior(
    gen: torch.Generator,
    heads: int,
    grid: tuple[int, int],
    k_max: int = 5,
    std_range: tuple[float, float] = (1.0, 4.0),
    dirichlet: float = 1.0,
) -> torch.Tensor:
    """``heads`` random GMM maps over ``grid`` (h, w): (heads, h*w), each summing to 1."""
    h, w = grid
    scale = max(h, w) / 14.0
    k = torch.randint(1, k_max + 1, (heads,), generator=gen)
    mu = torch.rand(heads, k_max, 2, generator=gen) * torch.tensor([h, w]) - 0.5  # patch-centre coordinates
    std = (std_range[0] + (std_range[1] - std_range[0]) * torch.rand(heads, k_max, generator=gen)) * scale
    gamma = torch._standard_gamma(torch.full((heads, k_max), float(dirichlet)), generator=gen)
    gamma = gamma * (torch.arange(k_max)[None] < k[:, None])  # only the first K components live
    weights = gamma / gamma.sum(-1, keepdim=True).clamp_min(1e-30)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    pos = torch.stack([ys.flatten(), xs.flatten()], -1)  # (h*w, 2)
    d2 = ((pos[None, None] - mu[:, :, None]) ** 2).sum(-1)  # (heads, k_max, h*w)
    dens = torch.exp(-0.5 * d2 / std[..., None] ** 2) / (2 * math.pi * std[..., None] ** 2)
    p = (weights[..., None] * dens).sum(1)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-30)
