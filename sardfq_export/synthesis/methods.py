"""The synthesis methods: a registry of names → which loss terms they optimize.

Adding a method adds an entry to :data:`METHODS` (and its test); the runner has no ``if`` chain on
method names. The per-iteration objective (:class:`Objective`) assembles the terms a method uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sardfq_export.models.families import get_family
from sardfq_export.synthesis import losses
from sardfq_export.synthesis.attention import Recorder, prior_attention, tokens_for_similarity
from sardfq_export.synthesis.config import SynthConfig
from sardfq_export.synthesis.plan import Labels


@dataclass(frozen=True)
class Components:
    """Which loss terms run (the names are the loss-curve columns)."""

    pse: bool = False  # PSAQ-ViT patch-similarity entropy
    apa: bool = False  # SARDFQ attention priors alignment
    msr: bool = False  # SARDFQ multi-semantic regions
    soft: bool = False  # soft-label targets (else one-hot)
    tv: bool = True


@dataclass(frozen=True)
class Method:
    name: str
    optimizes: bool  # False: the start images are the result (noise)
    components: Callable[[SynthConfig], Components]
    summary: str


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


register(
    Method(
        "noise", False, lambda c: Components(tv=False), "N(0,1) images in normalized space, no optimization"
    )
)
register(Method("psaq", True, lambda c: Components(pse=True), "PSAQ-ViT: patch-similarity entropy + CE + TV"))
register(
    Method(
        "sardfq",
        True,
        # + PSAQ-ViT's patch-similarity entropy only when asked (pse_weight > 0; the paper's SARDFQ has
        # none): an experiment on why PSAQ-ViT images calibrate 4-bit GPTQ better (docs/dinov2-accuracy.md)
        lambda c: Components(pse=bool(c.pse_weight), apa=c.apa, msr=c.msr, soft=c.soft_labels),
        "SARDFQ: attention priors alignment + multi-semantic regions + soft labels + TV",
    )
)

TERM_NAMES = ("total", "ce", "pse", "apa", "tv")


def apa_blocks(num_blocks: int, start: float) -> list[int]:
    """0-based indices of the blocks with l >= start·L (l 1-based, inclusive)."""
    return [i for i in range(num_blocks) if i + 1 >= start * num_blocks]


class Objective:
    """The loss of one batch at iteration ``t``: builds the teacher input, runs it, sums the terms."""

    def __init__(
        self,
        model: torch.nn.Module,
        family: str,
        rec: Recorder,
        cfg: SynthConfig,
        comps: Components,
        labels: Labels,
        indices: range,
        priors: dict[int, torch.Tensor],
        tau: float,
        device: torch.device,
    ):
        self.model, self.family, self.rec, self.cfg, self.comps = model, family, rec, cfg, comps
        self.tau, self.priors = tau, {b: p.to(device) for b, p in priors.items()}
        self.num_prefix = get_family(family).prefix_tokens(model)
        sl = slice(indices.start, indices.stop)
        self.targets = labels.targets[sl].to(device)
        self.batch = len(indices)
        self.num_blocks = len(rec.blocks)
        # MSR: for each 2x2 cell, which images of the batch have it, and their region targets.
        self.cells: list[tuple[tuple[int, int, int, int], torch.Tensor, torch.Tensor]] = []
        if comps.msr:
            regions, rl, rt = labels.regions[sl], labels.region_labels[sl], labels.region_targets[sl]
            boxes = sorted(
                {
                    tuple(r.tolist())
                    for r, lab in zip(regions.view(-1, 4), rl.view(-1), strict=True)
                    if lab >= 0
                }
            )
            for box in boxes:
                hit = ((regions == torch.tensor(box)).all(-1)) & (rl >= 0)  # (B, K)
                img, slot = hit.nonzero(as_tuple=True)
                self.cells.append((box, img.to(device), rt[img, slot].to(device)))
        self.device = device

    def teacher_input(self, x_aug: torch.Tensor) -> torch.Tensor:
        """The augmented images, then every MSR region crop resized to the input size (one forward)."""
        parts = [x_aug]
        size = x_aug.shape[-2:]
        for (t, left, b, r), img, _ in self.cells:
            crop = x_aug[img, :, t:b, left:r]
            parts.append(F.interpolate(crop, size=size, mode="bilinear", align_corners=False))
        return torch.cat(parts) if len(parts) > 1 else x_aug

    def __call__(self, x: torch.Tensor, x_aug: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, comps = self.cfg, self.comps
        self.rec.clear()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = self.model(self.teacher_input(x_aug))
        logits = logits.float()
        b = self.batch
        zero = logits.new_zeros(())
        # Image loss per image + each region's loss, averaged over the images of the batch.
        ce = losses.soft_cross_entropy(logits[:b], self.targets).sum()
        s = b
        for _, img, tgt in self.cells:
            ce = ce + losses.soft_cross_entropy(logits[s : s + len(img)], tgt).sum()
            s += len(img)
        ce = ce / b
        pse = zero
        if comps.pse:
            for i in sorted(self.rec.want_out):
                tok = tokens_for_similarity(self.rec, i, self.family, b, self.num_prefix)
                pse = pse - losses.patch_similarity_entropy(
                    tok, cfg.kde_bandwidth, cfg.kde_points, cfg.kde_eps
                )
        apa = zero
        if comps.apa:
            for i, prior in self.priors.items():
                a = prior_attention(self.rec, i, b, self.num_prefix)
                apa = apa + (i + 1) / self.num_blocks * losses.attention_prior_mse(a, prior).sum()
        tv = (losses.total_variation(x) - self.tau).abs() if comps.tv else zero
        total = cfg.ce_weight * ce + cfg.pse_weight * pse + cfg.apa_weight * apa + cfg.tv_weight * tv
        return {
            "total": total,
            "ce": ce.detach(),
            "pse": pse.detach(),
            "apa": apa.detach(),
            "tv": tv.detach(),
        }


def augment(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Per-image circular roll by ``offsets`` (B, 2) then horizontal flip where ``flips`` (B,).

    One gather with a per-image permutation of rows and columns, so gradients flow back exactly.
    """
    bsz, c, h, w = x.shape
    dev = x.device
    rows = (torch.arange(h, device=dev)[None] - offsets[:, :1].to(dev)) % h  # (B, H)
    cols_src = torch.where(
        flips.to(dev)[:, None],
        torch.arange(w - 1, -1, -1, device=dev)[None],
        torch.arange(w, device=dev)[None],
    )
    cols = (cols_src - offsets[:, 1:].to(dev)) % w  # (B, W)
    out = x.gather(2, rows[:, None, :, None].expand(bsz, c, h, w))
    return out.gather(3, cols[:, None, None, :].expand(bsz, c, h, w))
