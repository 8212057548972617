"""Activation ranges chosen for the layer's *output* error (range method ``output``).

Plain ``mse`` picks the clip that minimizes the quantization error of the input values
themselves, every channel alike. What the network sees is the Linear's output ``W·Q(x)``; for
rounding and clipping errors that are uncorrelated across input channels,

    E‖W (x − Q(x))‖² ≈ Σ_j ‖W[:, j]‖² · E[(x_j − Q(x_j))²],

so each input channel's error counts with the squared norm of the weight column it meets. On a
real ViT this matters for the MLP's second Linear: a few post-GELU channels reach 10–100× the
median, and input-MSE clips them although their weights make them carry the output (measured on
the DINOv2 benchmark: docs/dinov2-accuracy.md).

The search runs layer by layer in forward order on the calibration images, each layer's inputs
coming from the model as quantized so far (the earlier layers' new ranges already in place), over
the same candidate clips as ``mse`` (2%..100% of the observed max). Per-tensor, symmetric: the
scales deploy exactly like every other activation scale.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from sardfq_export.calibrators.calibrate import iter_batches
from sardfq_export.calibrators.modules import QuantLinear

CANDIDATES = 100  # clip candidates between 2% and 100% of the max |x| seen
MAX_TOKENS = 8192  # tokens per layer kept for the search (a seeded subsample beyond that)


class _Stop(Exception):
    pass


def _layer_inputs(
    qmodel: nn.Module, lin: QuantLinear, data, batch_size: int, gen: torch.Generator
) -> torch.Tensor:
    """The float inputs of ``lin`` over the calibration images (before its input quantizer)."""
    parts: list[torch.Tensor] = []

    def hook(m, args):
        parts.append(args[0].detach().reshape(-1, m.in_features).float().cpu())
        raise _Stop

    handle = lin.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch in iter_batches(data, batch_size):
                try:
                    qmodel(batch.to(lin.weight.device))
                except _Stop:
                    pass
    finally:
        handle.remove()
    x = torch.cat(parts)
    if x.shape[0] > MAX_TOKENS:
        x = x[torch.randperm(x.shape[0], generator=gen)[:MAX_TOKENS]]
    return x


def best_output_clip(x: torch.Tensor, col_weight: torch.Tensor, qmin: int, qmax: int) -> float:
    """The clip c minimizing Σ_j col_weight_j · Σ_tokens (x_j − Q_c(x_j))², Q_c symmetric per-tensor."""
    amax = float(x.abs().max())
    if amax == 0.0:
        return 0.0
    best, best_err = amax, float("inf")
    for c in torch.linspace(0.02, 1.0, CANDIDATES).tolist():
        clip = c * amax
        s = clip / qmax
        err = (x - torch.clamp(torch.round(x / s), qmin, qmax) * s).pow_(2).sum(0)
        total = float(err @ col_weight)
        if total < best_err:
            best, best_err = clip, total
    return best


@torch.no_grad()
def output_aware_ranges(
    qmodel: nn.Module, data, batch_size: int = 32, seed: int = 0, progress: bool = False
) -> dict:
    """Re-set every enabled input quantizer of a quantized Linear for its output error; returns a summary."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    layers = [
        (n, m) for n, m in qmodel.named_modules()
        if isinstance(m, QuantLinear) and m.input_quantizer.enabled and m.input_quantizer.is_calibrated
    ]  # fmt: skip
    changed = []
    for name, lin in tqdm(
        layers, desc="output-aware ranges", unit="layer", disable=not progress, leave=False
    ):
        q = lin.input_quantizer
        x = _layer_inputs(qmodel, lin, data, batch_size, gen)
        w = lin.weight_quantizer.fake_quant(lin.weight) if lin.weight_quantizer.active else lin.weight
        col = w.detach().float().cpu().pow(2).sum(0)
        before = float(q.scale) * q.qmax
        clip = best_output_clip(x, col, q.qmin, q.qmax)
        q.set_amax(torch.tensor(max(clip, 1e-8)))
        changed.append({"name": name, "clip_before": before, "clip": clip})
    return {
        "layers": len(changed),
        "mean_clip_ratio": sum(c["clip"] / c["clip_before"] for c in changed) / max(len(changed), 1),
    }
