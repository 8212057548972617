"""PSAQ-ViT's label-free image prior, for methods that optimize images against something else.

PSAQ-ViT V2 (ALGORITHMS.md §1.4) updates images to *maximize* the float-vs-quantized discrepancy,
"regularized by the patch-similarity prior", with no class labels. The quantized student lives in
``calibrators`` (downstream of synthesis), so the alternating loop lives there
(:mod:`sardfq_export.calibrators.adaptive`) and takes the teacher side from here as one callable:
:class:`PatchSimilarityTeacher` runs the float model on a batch, with the explicit attention that
records softmax·V, and returns its logits and the prior's terms (patch-similarity entropy and
|TV − τ|, PSAQ-ViT's weights and settings from :class:`SynthConfig`). No cross-entropy: V2 has no
labels. Start images, the pixel range and τ come from the same per-image draws as every synthesis
method (:mod:`plan`), so image ``i`` starts from the same N(0, 1) draw as PSAQ-ViT's image ``i``.
"""

from __future__ import annotations

import contextlib

import torch

from sardfq_export.core.errors import UserInputError
from sardfq_export.models.families import get_family
from sardfq_export.synthesis import losses
from sardfq_export.synthesis.attention import recording, tokens_for_similarity
from sardfq_export.synthesis.config import SynthConfig
from sardfq_export.synthesis.patch_matmul import patch_matmul
from sardfq_export.synthesis.plan import initial_images, tv_target
from sardfq_export.synthesis.runner import model_input_size, pixel_range

PRIOR_TERMS = ("pse", "tv")


class PatchSimilarityTeacher:
    """The float teacher with PSAQ-ViT's label-free prior: ``teacher(x, first_index)`` →
    ``(logits, {"pse": ..., "tv": ...}, prior_loss)``; use it inside ``with teacher:``.

    ``prior_loss = pse_weight · (−Σ_blocks entropy) + tv_weight · |TV(x) − τ|``, τ drawn per batch
    from its first image's index exactly as PSAQ-ViT does. ``config`` is resolved for the model's
    family (its ``method`` is set to ``psaq`` so that the PSE weight defaults to PSAQ-ViT's 1.0).
    """

    def __init__(self, loaded, config: SynthConfig | None = None, device: torch.device | None = None):
        from dataclasses import replace

        cfg = replace(config or SynthConfig(), method="psaq")
        self.cfg = cfg.resolve(loaded.family)
        if self.cfg.image_scale != 1.0:
            raise UserInputError("PSAQ-ViT V2 optimizes full-resolution pixels: leave image_scale at 1.0")
        if self.cfg.grey:
            raise UserInputError("PSAQ-ViT V2 optimizes one value per channel: leave grey off")
        if self.cfg.frame:
            raise UserInputError("PSAQ-ViT V2 optimizes every pixel of its images: leave frame at 0")
        self.loaded, self.family = loaded, loaded.family
        self.device = device or next(loaded.model.parameters()).device
        self.model = loaded.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.input_size = model_input_size(loaded)
        self.num_prefix = get_family(self.family).prefix_tokens(self.model)
        self.lo, self.hi = pixel_range(loaded.data_config, self.device)
        self._stack: contextlib.ExitStack | None = None
        self.rec = None

    def settings(self) -> dict:
        """The prior's settings as run (recorded with the images)."""
        keys = ("pse_weight", "kde_bandwidth", "kde_points", "kde_eps", "tv_weight", "tv_tau", "tv_tau_ref",
                "clip", "bf16")  # fmt: skip
        return {k: getattr(self.cfg, k) for k in keys}

    def start_images(self, indices: range) -> torch.Tensor:
        """N(0, 1) start images of ``indices`` (one generator per image), clipped to the pixel range."""
        x = initial_images(self.cfg, indices, self.input_size).to(self.device)
        return self.clip(x) if self.cfg.clip else x

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """Each channel clamped to the range that maps to pixel values [0, 1]."""
        return torch.maximum(torch.minimum(x, self.hi), self.lo)

    def __enter__(self) -> PatchSimilarityTeacher:
        self._stack = contextlib.ExitStack()
        want_out = range(len(get_family(self.family).blocks(self.model))) if self.cfg.pse_weight else ()
        self.rec = self._stack.enter_context(
            recording(self.model, self.family, want_out=want_out, fused=self.device.type == "cuda")
        )
        self._stack.enter_context(patch_matmul(self.model))
        return self

    def __exit__(self, *exc) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack, self.rec = None, None

    def __call__(self, x: torch.Tensor, first_index: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
        if self.rec is None:
            raise RuntimeError("PatchSimilarityTeacher is used inside 'with teacher:'")
        cfg = self.cfg
        self.rec.clear()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = self.model(x)
        logits = logits.float()
        zero = logits.new_zeros(())
        pse = zero
        if cfg.pse_weight:
            for i in sorted(self.rec.want_out):
                tok = tokens_for_similarity(self.rec, i, self.family, x.shape[0], self.num_prefix)
                pse = pse - losses.patch_similarity_entropy(
                    tok, cfg.kde_bandwidth, cfg.kde_points, cfg.kde_eps
                )
        tv = zero
        if cfg.tv_weight:
            tau = tv_target(cfg, first_index, x[0].numel() * x.shape[0])
            tv = (losses.total_variation(x) - tau).abs()
        self.rec.clear()  # the recorded tensors hold the graph: drop them once the terms are built
        return logits, {"pse": pse, "tv": tv}, cfg.pse_weight * pse + cfg.tv_weight * tv
