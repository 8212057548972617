"""Loss terms of the synthesis methods (ALGORITHMS.md §1), each a plain function of tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def patch_similarity_entropy(
    tokens: torch.Tensor, bandwidth: float = 0.01, points: int = 10, eps: float = 1e-4
) -> torch.Tensor:
    """PSAQ-ViT's differential entropy of patch similarities, averaged over the batch.

    ``tokens`` (B, groups, N, d): head-averaged softmax·V outputs. Cosine similarity of every token
    pair inside a group gives B samples of groups·N² values; their density is a Gaussian KDE on a
    ``points`` grid spanning the batch's min..max (grid detached), and -p·log(p + eps) is
    integrated with the trapezoid rule.
    """
    t = F.normalize(tokens.float(), dim=-1)
    sim = (t @ t.transpose(-2, -1)).reshape(t.shape[0], -1)  # (B, M)
    lo, hi = sim.min().detach(), sim.max().detach()
    grid = lo + (hi - lo) * torch.linspace(0, 1, points, device=sim.device)
    z = (grid[None, :, None] - sim[:, None, :]) / bandwidth  # (B, points, M)
    p = torch.exp(-0.5 * z * z).mean(-1) / (bandwidth * math.sqrt(2 * math.pi))  # (B, points)
    ent = torch.trapezoid(-p * torch.log(p + eps), grid, dim=-1)
    return ent.mean()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-Σ_c T_c log softmax(logits)_c per row, shape (rows,)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Sum of the L2 norms (not squared) of the right, down and two diagonal differences."""
    d1 = x[..., :, 1:] - x[..., :, :-1]
    d2 = x[..., 1:, :] - x[..., :-1, :]
    d3 = x[..., 1:, 1:] - x[..., :-1, :-1]
    d4 = x[..., 1:, :-1] - x[..., :-1, 1:]
    return d1.norm() + d2.norm() + d3.norm() + d4.norm()


def attention_prior_mse(attn: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """MSE between attention maps (B, heads, P) and priors (B, heads, P) rescaled to their mass.

    The prior sums to 1; it is rescaled to the (detached) mass of the attention it is compared
    with, so only the *shape* is matched. Returns the per-head MSE averaged over the batch: (heads,).
    """
    a = attn.float()
    target = prior * a.sum(-1, keepdim=True).detach()
    return ((a - target) ** 2).mean(-1).mean(0)
