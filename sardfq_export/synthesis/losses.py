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


# The four neighbour differences of the total variation: (the "plus" slice, the "minus" slice) of
# the last two dimensions, d = x[plus] - x[minus]: right, down and the two diagonals.
_TV_PAIRS = (
    ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
    ((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
    ((slice(1, None), slice(1, None)), (slice(None, -1), slice(None, -1))),
    ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))),
)


class _TotalVariation(torch.autograd.Function):
    """Σ_k ‖x[plus_k] − x[minus_k]‖₂ with its gradient written out.

    Autograd's own backward of the sliced differences materializes a zero-filled image-sized
    gradient per slice (8 per step) and adds them up (``fill_``/``copy_``/``add`` on the
    (32, 3, 224, 224) image in the torch profiler of a deit_tiny bf16 synthesis step). Here the
    gradient is one zero image and eight in-place slice updates: the TV forward + backward alone
    ran 3–4× faster on a 2-core CPU, the whole step about 1% (docs/performance.md). Same value;
    the gradient equals autograd's up to summation order (tested)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        diffs = [x[..., p[0], p[1]] - x[..., m[0], m[1]] for p, m in _TV_PAIRS]
        norms = torch.stack([d.norm() for d in diffs])
        ctx.save_for_backward(*diffs, norms)
        ctx.shape = x.shape
        return norms.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        *diffs, norms = ctx.saved_tensors
        # d‖d‖/dd = d/‖d‖, and 0 where ‖d‖ = 0 (as torch's norm backward).
        scale = torch.where(norms > 0, grad / norms, torch.zeros_like(norms))
        out = torch.zeros(ctx.shape, dtype=diffs[0].dtype, device=diffs[0].device)
        for k, (d, (p, m)) in enumerate(zip(diffs, _TV_PAIRS, strict=True)):
            d = d * scale[k]
            out[..., p[0], p[1]] += d
            out[..., m[0], m[1]] -= d
        return out


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Sum of the L2 norms (not squared) of the right, down and two diagonal differences."""
    return _TotalVariation.apply(x)


def total_variation_autograd(x: torch.Tensor) -> torch.Tensor:
    """:func:`total_variation` through autograd's own backward of the slices: the reference its
    written-out gradient is tested against, and the "before" of ``bench/synthesis_speed.py
    --versus-plain-tv``."""
    return sum(x[..., p[0], p[1]].sub(x[..., m[0], m[1]]).norm() for p, m in _TV_PAIRS)


def attention_prior_mse(attn: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """MSE between attention maps (B, heads, P) and priors (B, heads, P) rescaled to their mass.

    The prior sums to 1; it is rescaled to the (detached) mass of the attention it is compared
    with, so only the *shape* is matched. Returns the per-head MSE averaged over the batch: (heads,).
    """
    a = attn.float()
    target = prior * a.sum(-1, keepdim=True).detach()
    return ((a - target) ** 2).mean(-1).mean(0)
