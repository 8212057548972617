"""Every random draw of a synthesis run, made up front from per-image generators.

Image ``i`` draws its start image, label, MSR regions, soft target, APA priors and augmentation
table from generators seeded by (seed, i, stream), so an image's draws never depend on which batch
or process it lands in; only tau (one per batch, from its first image) is per batch. Nothing random
happens inside the optimization loop, which is what makes ``--resume`` bit-exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sardfq_export.synthesis.config import SynthConfig
from sardfq_export.synthesis.priors import (
    STREAM_AUG,
    STREAM_FRAME,
    STREAM_INIT,
    STREAM_LABELS,
    STREAM_PRIORS,
    STREAM_TAU,
    STREAM_WINDOW,
    generator,
    gmm_prior,
)


@dataclass
class Labels:
    """Per-image labels of the whole set (cheap; recomputed on resume)."""

    labels: torch.Tensor  # (N,) int64 image label
    targets: torch.Tensor  # (N, classes) image target (soft, or one-hot without soft labels)
    regions: torch.Tensor  # (N, K, 4) int64 (top, left, bottom, right); zeros where unused
    region_labels: torch.Tensor  # (N, K) int64, -1 = unused slot
    region_targets: torch.Tensor  # (N, K, classes) region targets (zeros where unused)


def half_cells(h: int, w: int) -> list[tuple[int, int, int, int]]:
    """The 2x2 grid of half-size cells, (top, left, bottom, right) [default MSR layout]."""
    h2, w2 = h // 2, w // 2
    return [(0, 0, h2, w2), (0, w2, h2, w), (h2, 0, h, w2), (h2, w2, h, w)]


def _soft_target(
    gen: torch.Generator, classes: int, relevant: torch.Tensor, lo_hi: tuple[float, float]
) -> torch.Tensor:
    z = torch.zeros(classes)
    draws = lo_hi[0] + (lo_hi[1] - lo_hi[0]) * torch.rand(len(relevant), generator=gen)
    z[relevant] = draws  # a class named twice keeps one logit
    return z.softmax(-1)


def draw_labels(cfg: SynthConfig, classes: int, hw: tuple[int, int], msr: bool, soft: bool) -> Labels:
    """Labels, targets and MSR regions of every image [paper: SL and MSR; layout default]."""
    n, k = cfg.num_images, cfg.msr_regions
    cells = torch.tensor(half_cells(*hw))
    labels = torch.empty(n, dtype=torch.long)
    targets = torch.zeros(n, classes)
    regions = torch.zeros(n, k, 4, dtype=torch.long)
    region_labels = torch.full((n, k), -1, dtype=torch.long)
    region_targets = torch.zeros(n, k, classes)
    for i in range(n):
        g = generator(cfg.seed, i, STREAM_LABELS)
        labels[i] = torch.randint(classes, (1,), generator=g)[0]
        m = int(torch.randint(1, k + 1, (1,), generator=g)[0]) if msr else 0
        pick = torch.randperm(len(cells), generator=g)[:m]
        rl = torch.randint(classes, (m,), generator=g)
        regions[i, :m] = cells[pick]
        region_labels[i, :m] = rl
        relevant = torch.cat([labels[i : i + 1], rl])
        if soft:
            targets[i] = _soft_target(g, classes, relevant, cfg.soft_logit)
            for j in range(m):
                region_targets[i, j] = _soft_target(g, classes, rl[j : j + 1], cfg.soft_logit)
        else:
            targets[i, labels[i]] = 1.0
            region_targets[i, torch.arange(m), rl] = 1.0
    return Labels(labels, targets, regions, region_labels, region_targets)


def initial_images(cfg: SynthConfig, indices: range, shape: tuple[int, int, int]) -> torch.Tensor:
    """N(0, 1) start images in normalized space, one generator per image [paper]."""
    return torch.stack([torch.randn(shape, generator=generator(cfg.seed, i, STREAM_INIT)) for i in indices])


def frame_greys(cfg: SynthConfig, indices: range) -> torch.Tensor:
    """(B,) the flat band's grey of each image, uniform in [0, 1] pixel space [default]."""
    return torch.stack([torch.rand((), generator=generator(cfg.seed, i, STREAM_FRAME)) for i in indices])


def frame_bands(cfg: SynthConfig, indices: range, hw: tuple[int, int]) -> torch.Tensor:
    """(B, 4) each image's band widths in pixels (top, bottom, left, right): ``cfg.frame`` of the
    side, each drawn in frame·[1 − j, 1 + j] with ``cfg.frame_jitter`` j, from a stream of its own
    so the greys and every other draw stay those of the unjittered set [default]."""
    h, w = hw
    sides = torch.tensor([h, h, w, w], dtype=torch.float64)
    out = []
    for i in indices:
        u = torch.rand(4, generator=generator(cfg.seed, i, STREAM_WINDOW), dtype=torch.float64)
        out.append(torch.round(sides * cfg.frame * (1 + cfg.frame_jitter * (2 * u - 1))))
    return torch.stack(out).long()


def round_bounds(iters: int, rounds: int) -> list[int]:
    """Iteration where each round starts, plus the end."""
    return [round(r * iters / rounds) for r in range(rounds + 1)]


def learning_rate(cfg: SynthConfig, t: int) -> float:
    """Linear warm-up then cosine to 0, restarting every round [paper: PSAQ-ViT / DeepInversion]."""
    bounds = round_bounds(cfg.iters, cfg.rounds)
    r = max(i for i in range(cfg.rounds) if bounds[i] <= t)
    length = bounds[r + 1] - bounds[r]
    e = t - bounds[r]
    warm = max(1, round(cfg.warmup_frac * length))
    if e < warm:
        return cfg.lr * (e + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (e - warm) / max(1, length - warm)))


def augmentation_table(
    cfg: SynthConfig, indices: range, hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and iteration: roll offsets (B, iters, 2) and flips (B, iters) [paper; per image: default]."""
    h, w = hw
    bounds = round_bounds(cfg.iters, cfg.rounds)
    lim = torch.zeros(cfg.iters, 2)
    for r in range(cfg.rounds):
        lim[bounds[r] : bounds[r + 1], 0] = round(cfg.roll_px[r] * h / 224)
        lim[bounds[r] : bounds[r + 1], 1] = round(cfg.roll_px[r] * w / 224)
    offs, flips = [], []
    for i in indices:
        g = generator(cfg.seed, i, STREAM_AUG)
        u = torch.rand(cfg.iters, 2, generator=g)
        if cfg.roll_same_offset:
            u[:, 1] = u[:, 0]
        offs.append((u * (2 * lim + 1)).floor().long() - lim.long())
        flips.append(torch.rand(cfg.iters, generator=g) < cfg.flip_p)
    return torch.stack(offs), torch.stack(flips)


def tv_target(cfg: SynthConfig, first_index: int, batch_elems: int) -> float:
    """tau ~ U(tv_tau) once per batch, scaled by sqrt(B·C·H·W / tv_tau_ref) [paper; scaling default]."""
    g = generator(cfg.seed, first_index, STREAM_TAU)
    tau = cfg.tv_tau[0] + (cfg.tv_tau[1] - cfg.tv_tau[0]) * float(torch.rand(1, generator=g)[0])
    return tau * math.sqrt(batch_elems / cfg.tv_tau_ref)


def draw_priors(
    cfg: SynthConfig, indices: range, heads_grid: dict[int, tuple[int, tuple[int, int]]]
) -> dict[int, torch.Tensor]:
    """APA priors of every image for each block index: {block: (B, heads, P)}, fixed for the run."""
    per_block: dict[int, list[torch.Tensor]] = {b: [] for b in heads_grid}
    for i in indices:
        g = generator(cfg.seed, i, STREAM_PRIORS)
        for b, (heads, grid) in sorted(heads_grid.items()):
            per_block[b].append(gmm_prior(g, heads, grid, cfg.apa_components, cfg.apa_std, cfg.apa_dirichlet))
    return {b: torch.stack(v) for b, v in per_block.items()}
