"""Label-free fidelity: how closely a deployed model follows PyTorch, on held-out synthetic images.

Element-wise tolerances are the wrong test for quantized engines (tactic noise alone moves logits
by more than 1e-5); top-1 agreement and the cosine similarity of logits are what matter.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from sardfq_export.core.errors import UserInputError

Runner = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def run_batches(runner: Runner, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """All logits of ``runner`` over ``images`` (float32, on the CPU)."""
    outs = [runner(images[s : s + batch_size]).float().cpu() for s in range(0, len(images), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Top-1 agreement and logit cosine (mean and worst image) of two (N, classes) tensors."""
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 2 or a.shape[0] == 0:
        raise UserInputError(
            f"no logits to compare (shape {tuple(a.shape)}): fidelity needs at least one image"
        )
    cos = F.cosine_similarity(a.double(), b.double(), dim=1)
    return {
        "n": int(a.shape[0]),
        "agreement": float((a.argmax(1) == b.argmax(1)).double().mean()),
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs_diff": float((a - b).abs().max()),
    }


NOISE_FLOOR_SIGMA = 1e-6  # far below any image's precision (8-bit pixels: ~1e-2) and a few float32 ulps


def noise_floor(
    runner: Runner,
    images: torch.Tensor,
    logits: torch.Tensor,
    batch_size: int = 64,
    perturb: Callable[[], AbstractContextManager] | None = None,
) -> dict:
    """How much ``runner`` disagrees with *itself* under noise of 1e-6 (seeded).

    A quantized model puts values on rounding boundaries; any other runtime (a different float
    accumulation order) moves some across them. Deployed-vs-fake-quant agreement is read against
    this floor: near it, the difference is rounding-boundary noise; far below it, look at the
    export. With ``perturb`` (a context such as :class:`calibrators.quantizer.perturbed_activations`
    made with ``rel=NOISE_FLOOR_SIGMA``, which moves every activation quantizer's input by that
    relative amount) the noise is inside the model, in every layer, as a runtime's is; without it
    the input image moves by that absolute amount, which misses most of it on a real ViT
    (docs/dinov2-accuracy.md).
    """
    if perturb is not None:
        with perturb():
            noisy_logits = run_batches(runner, images, batch_size)
        where = "activations"
    else:
        gen = torch.Generator().manual_seed(0)
        noisy = images + NOISE_FLOOR_SIGMA * torch.randn(images.shape, generator=gen, dtype=images.dtype)
        noisy_logits = run_batches(runner, noisy, batch_size)
        where = "input"
    cmp = compare_logits(noisy_logits, logits)
    return {"sigma": NOISE_FLOOR_SIGMA, "where": where, "n": cmp["n"], "agreement": cmp["agreement"], "cosine": cmp["cosine"],
            "cosine_min": cmp["cosine_min"]}  # fmt: skip


def fidelity(
    fp32: Runner,
    fakequant: Runner,
    deployed: Runner,
    images: torch.Tensor,
    batch_size: int = 64,
    perturb: Callable[[], AbstractContextManager] | None = None,
) -> dict:
    """The report's ``fidelity`` section: deployed vs FP32 and vs fake-quant on ``images``, and the
    fake-quant model's own noise floor beside them (``perturb``: see :func:`noise_floor`)."""
    if images.ndim == 0 or images.shape[0] == 0:
        raise UserInputError(
            "fidelity needs at least one held-out image, got 0: pass a non-empty image set (or more --num-images)"
        )
    ref = run_batches(fp32, images, batch_size)
    fq = run_batches(fakequant, images, batch_size)
    dep = run_batches(deployed, images, batch_size)
    vs_fp32, vs_fq, fq_vs_fp32 = compare_logits(dep, ref), compare_logits(dep, fq), compare_logits(fq, ref)
    floor = noise_floor(fakequant, images, fq, batch_size, perturb)
    return {
        "n": int(images.shape[0]),
        "agreement_vs_fp32": vs_fp32["agreement"],
        "agreement_vs_fakequant": vs_fq["agreement"],
        "cosine_vs_fakequant": vs_fq["cosine"],
        "cosine_vs_fakequant_min": vs_fq["cosine_min"],
        "cosine_vs_fp32": vs_fp32["cosine"],
        "fakequant_agreement_vs_fp32": fq_vs_fp32["agreement"],
        "fakequant_cosine_vs_fp32": fq_vs_fp32["cosine"],
        "fakequant_noise_floor": floor,
    }
