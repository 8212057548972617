"""The straightforward SARDFQ synthesis step, as a baseline for the speed benchmark (not product code).

What a first implementation would do: timm's attention with ``fused_attn = False`` so the maps
exist, forward hooks on ``attn_drop`` to grab every post-softmax N×N map, fp32, and one teacher
forward for the images plus one more per MSR region cell. It optimizes the same objective as
:mod:`sardfq_export.synthesis` (same draws from :mod:`~sardfq_export.synthesis.plan`, same loss
functions), which :func:`first_loss` lets the benchmark check.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from sardfq_export.synthesis import losses
from sardfq_export.synthesis.config import SynthConfig
from sardfq_export.synthesis.methods import apa_blocks, augment
from sardfq_export.synthesis.plan import (
    augmentation_table,
    draw_labels,
    draw_priors,
    initial_images,
    learning_rate,
    tv_target,
)
from sardfq_export.synthesis.runner import pixel_range


class NaiveSARDFQ:
    """One batch of SARDFQ images optimized the straightforward way (ViT/DeiT only)."""

    def __init__(self, loaded, cfg: SynthConfig, batch: int):
        self.cfg = cfg = cfg.resolve(loaded.family)
        self.model = model = loaded.model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        c, h, w = loaded.input_size
        self.idx = range(batch)
        blocks = list(model.blocks)
        self.apa = apa_blocks(len(blocks), cfg.apa_start)
        self.maps: dict[int, torch.Tensor] = {}
        self.recording = True
        for i, blk in enumerate(blocks):
            blk.attn.fused_attn = False
            if i in self.apa:
                blk.attn.attn_drop.register_forward_hook(self._grab(i))
        self.labels = draw_labels(cfg, loaded.num_classes, (h, w), True, True)
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        heads = blocks[0].attn.num_heads
        self.priors = draw_priors(cfg, self.idx, {i: (heads, grid) for i in self.apa})
        self.offsets, self.flips = augmentation_table(cfg, self.idx, (h, w))
        self.tau = tv_target(cfg, 0, batch * c * h * w)
        self.lo, self.hi = pixel_range(loaded.data_config, torch.device("cpu"))
        x = torch.maximum(torch.minimum(initial_images(cfg, self.idx, (c, h, w)), self.hi), self.lo)
        self.x = x.requires_grad_(True)
        self.opt = torch.optim.Adam([self.x], lr=cfg.lr, betas=cfg.betas)
        self.prefix = int(getattr(model, "num_prefix_tokens", 1))

    def _grab(self, i):
        def hook(_m, _args, out):
            if self.recording:
                self.maps[i] = out

        return hook

    def loss(self, t: int) -> torch.Tensor:
        cfg, lab, b = self.cfg, self.labels, len(self.idx)
        x_aug = augment(self.x, self.offsets[:, t], self.flips[:, t])
        self.recording = True
        logits = self.model(x_aug)
        ce = losses.soft_cross_entropy(logits, lab.targets[:b]).sum()
        self.recording = False
        size = x_aug.shape[-2:]
        for img in range(b):  # one more forward per region of every image
            for k in range(lab.regions.shape[1]):
                if lab.region_labels[img, k] < 0:
                    continue
                top, left, bottom, right = lab.regions[img, k].tolist()
                crop = x_aug[img : img + 1, :, top:bottom, left:right]
                crop = F.interpolate(crop, size=size, mode="bilinear", align_corners=False)
                ce = (
                    ce + losses.soft_cross_entropy(self.model(crop), lab.region_targets[img, k : k + 1]).sum()
                )
        ce = ce / b
        apa = logits.new_zeros(())
        depth = len(self.model.blocks)
        for i in self.apa:
            a = self.maps[i][:, :, 0, self.prefix :]
            apa = apa + (i + 1) / depth * losses.attention_prior_mse(a, self.priors[i]).sum()
        tv = (losses.total_variation(self.x) - self.tau).abs()
        return cfg.ce_weight * ce + cfg.apa_weight * apa + cfg.tv_weight * tv

    def step(self, t: int) -> float:
        for g in self.opt.param_groups:
            g["lr"] = learning_rate(self.cfg, t)
        loss = self.loss(t)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            torch.maximum(torch.minimum(self.x, self.hi), self.lo, out=self.x)
        return float(loss)


def time_steps(runner: NaiveSARDFQ, iters: int, warmup: int = 1) -> tuple[float, float]:
    """(seconds per iteration after ``warmup`` iterations, loss of the first iteration)."""
    first = runner.step(0)
    for t in range(1, warmup):
        runner.step(t)
    start = time.perf_counter()
    for t in range(warmup, warmup + iters):
        runner.step(t)
    return (time.perf_counter() - start) / iters, first
