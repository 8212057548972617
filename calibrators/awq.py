"""Activation-aware weight scaling for 4-bit weights (AWQ, Lin et al. 2024), folded like SmoothQuant.

A few input channels of a ViT Linear carry most of its output (DINOv2's LayerNorm outputs have
channels hundreds of times larger than the rest). Rounding their weights to 4 bits costs the output
far more than rounding the others, and a block scale set by all 64/128 weights cannot spare them.
AWQ scales input channel j of the weight up by s_j = mean|x_j|^α (normalised), so its weights land
on a finer relative grid, and divides s_j out of the input; the float function is unchanged. α is
searched per Linear on the calibration images for the least output error
``‖(x/s)·Q(W·s)ᵀ − x·Wᵀ‖²`` (α = 0 is plain rounding, so the search never picks worse than it on
those images).

Why this and not only GPTQ on synthetic images: GPTQ fits a layer's whole input covariance, which
synthetic images describe poorly (DINOv2 w4a16: 11.2 points lost from 32 SARDFQ images, 0.75 from
32 real ones, docs/dinov2-accuracy.md); AWQ takes one number per channel (its mean magnitude, set by
the model's own outlier channels) and one α per layer, which the AWQ paper found robust to the
calibration set's distribution. The two compose: AWQ's scales first, then GPTQ's rounding.

Where the factors go (:func:`calibrators.smooth.fold_factors`, no new runtime op for the first
three): LayerNorm → qkv / fc1 into γ and β, V → proj into V's rows of qkv, and fc2 through the
explicit per-channel Mul before it (TensorRT fuses it into the GELU; AWQ's own "ScaledActivation").
The weights stay plain INT4 blocks with the same export.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from sardfq_export.calibrators.calibrate import calibrate_weight
from sardfq_export.calibrators.smooth import fold_factors, observe_inputs, scalable

GRID = 20  # [paper] α ∈ {0, 0.05, …, 0.95}
MAX_TOKENS = 2048  # input rows kept per Linear for the search (a seeded sample beyond that)
SEARCH_RANGES = "minmax"


def _search(lin, x: torch.Tensor, grid: int, weight_method: str) -> tuple[float, torch.Tensor, float, float]:
    """(α, factors, output error at α, at α = 0) for one Linear and its float inputs ``x``."""
    w = lin.weight.detach().float()
    q = lin.weight_quantizer
    y = x @ w.T
    mean = x.abs().mean(0).clamp(min=1e-8)
    power = x.pow(2).mean(0)
    best = (0.0, torch.ones_like(mean), float("inf"))
    plain = float("inf")
    for i in range(grid):
        alpha = i / grid
        s = mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # [paper] normalised around 1
        ws = w * s[None, :]
        # Each candidate with plain max-|w| ranges, as the paper's scale search does (an MSE clip
        # search per candidate was about 14x slower in a scratch timing on DINOv2's fc1 shape); the
        # final ranges then take the scheme's method, activation-aware (calibrate_weight's importance).
        calibrate_weight(q, ws, SEARCH_RANGES if weight_method == "mse" else weight_method, power / s.pow(2))
        err = float(((x / s) @ q.fake_quant(ws).T - y).pow(2).mean())
        if i == 0:
            plain = err
        if err < best[2]:
            best = (alpha, s, err)
    q.reset()
    return best[0], best[1], best[2], plain


@torch.no_grad()
def awq_scale(
    qmodel: nn.Module,
    data,
    weight_method: str = "mse",
    grid: int = GRID,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Search and fold AWQ factors into every scalable quantized Linear of ``qmodel`` (4-bit
    weights, before their ranges are set). Returns a summary: α and the output-error ratio to
    plain rounding per Linear, and ``importance``: ``{id(Linear): its new input's mean square per
    channel}`` for the activation-aware weight ranges that follow (calibrate_weight)."""
    from sardfq_export.core.progress import progress_bar

    sites = [(n, m) for n, m in scalable(qmodel) if m.weight_quantizer.enabled]
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n, _ in sites}
    gen = torch.Generator().manual_seed(seed)

    def keep(n: str, rows: torch.Tensor) -> None:
        rows = rows.float()
        if len(rows) > MAX_TOKENS:  # bounded memory per batch; the search samples again below
            rows = rows[torch.randperm(len(rows), generator=gen)[:MAX_TOKENS].to(rows.device)]
        inputs[n].append(rows)

    observe_inputs(qmodel, sites, data, keep, progress, "awq (inputs)")
    layers = []
    factors, importance = {}, {}
    for name, lin in progress_bar(sites, desc="awq", unit="layer", disable=not progress, leave=False):
        x = torch.cat(inputs.pop(name))
        if len(x) > MAX_TOKENS:
            x = x[torch.randperm(len(x), generator=gen)[:MAX_TOKENS].to(x.device)]
        alpha, s, err, plain = _search(lin, x, grid, weight_method)
        factors[name] = s.to(lin.weight.dtype)
        importance[id(lin)] = x.pow(2).mean(0) / s.pow(2)
        layers.append({"name": name, "alpha": alpha, "error_vs_nearest": err / plain if plain > 0 else 1.0})
    fold_factors(qmodel, factors)
    ratios = [r["error_vs_nearest"] for r in layers]
    return {
        "layers": layers,
        "scaled": len(layers),
        "grid": grid,
        "mean_error_vs_nearest": sum(ratios) / len(ratios) if ratios else None,
        "importance": importance,
    }
