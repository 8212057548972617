"""Data-aware weight rounding (GPTQ, Frantar et al. 2023) on the calibration set, scales kept.

Round-to-nearest picks each weight's grid point alone; GPTQ rounds the columns of a Linear one
after the other and pushes each column's rounding error onto the columns not yet rounded, weighted
by the inverse Hessian ``H = Σ x xᵀ`` of the layer's inputs, so that ``‖W X − Q X‖²`` (the error
the layer's *output* sees on the calibration images) is what is minimized, not ``‖W − Q‖²``.

What makes it deployable as is: the per-channel / per-block scales are the calibrated ones, frozen
before rounding; only the integer grid points change. The rounded weight is written back as its
dequantized values (``q·s``), on which the frozen fake-quantizer (and the exported Q/DQ pair) is the
identity, so the export is plain INT8/INT4 with the same scales. The weights are marked modified
(saved with the scales).

Inputs are what the layer sees in the quantized model (earlier layers already re-rounded, input
quantizer applied), layer by layer in forward order, as GPTQ does sequentially.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from sardfq_export.calibrators.calibrate import iter_batches
from sardfq_export.calibrators.instrument import mark_modified
from sardfq_export.calibrators.modules import QuantLinear
from sardfq_export.calibrators.quantizer import TensorQuantizer
from sardfq_export.calibrators.rollout import rollout_token_weights
from sardfq_export.calibrators.scheme import PerBlock

from sardfq_export.core.errors import UserInputError

DAMP = 0.01  # [paper] dampening: 1% of the mean Hessian diagonal (the rank-deficient case is normal)
TOKEN_WEIGHTS = ("uniform", "rollout")  # how each token's term counts in the Hessian
COLUMN_BLOCK = 128  # [paper] lazy batch updates: columns rounded together before the trailing update


class _Stop(Exception):
    pass


def _column_scales(q: TensorQuantizer, shape: tuple[int, int]) -> torch.Tensor:
    """(out, in) scale of every weight element: per output channel, or per block of input channels."""
    out, fan_in = shape
    if isinstance(q.granularity, PerBlock):
        size = fan_in // q.scale.shape[1]
        return q.scale.repeat_interleave(size, dim=1)
    return q.scale.reshape(out, 1).expand(out, fan_in)


def crop_views(images: torch.Tensor) -> torch.Tensor:
    """One label-preserving variant of each image: a random resized crop (area 50-100%, aspect
    3/4-4/3) scaled back to the image's size, flipped at random. Draws from the global generator
    (torchvision's ``RandomResizedCrop.get_params`` does): seed it inside ``torch.random.fork_rng``."""
    from torchvision.transforms.v2 import RandomResizedCrop
    from torchvision.transforms.v2 import functional as TF

    size = list(images.shape[-2:])
    crops = []
    for img in images:
        top, left, h, w = RandomResizedCrop.get_params(img, scale=[0.5, 1.0], ratio=[3 / 4, 4 / 3])
        crop = TF.resized_crop(img, top, left, h, w, size, antialias=True)
        crops.append(crop.flip(-1) if bool(torch.rand(()) < 0.5) else crop)
    return torch.stack(crops)


def hessian_views(images: torch.Tensor, views: int, seed: int = 0) -> torch.Tensor:
    """``images`` and ``views - 1`` label-preserving variants of each, for the Hessian only.

    Why: 32 calibration images give ~2,000 tokens, barely more than an MLP's 1,536-wide second
    Linear has inputs, so its ``Σ x xᵀ`` is nearly rank-deficient and GPTQ fits those tokens, not
    the input distribution. Variants add tokens without data: view 1 is the horizontal flip;
    further views are :func:`crop_views` of each image (seeded). The scales and ranges are
    calibrated on the original images only.
    """
    if views < 1:
        raise UserInputError(f"GPTQ views must be >= 1, got {views}")
    out = [images]
    if views >= 2:
        out.append(images.flip(-1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # RandomResizedCrop.get_params draws from the global generator
        for _ in range(2, views):
            out.append(crop_views(images))
    return torch.cat(out)


def _input_hessian(
    qmodel: nn.Module, lin: QuantLinear, data, batch_size: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Σ w x xᵀ over every token of the calibration images at ``lin``'s (quantized) input, float64;
    ``weights``: (images, tokens) per-token weights in the images' order (None: all 1)."""
    device = lin.weight.device
    h = torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64, device=device)
    count, seen = [0], [0]

    def hook(m, args):
        x = m.quant_input(args[0].detach()).double()  # what F.linear sees
        if weights is not None:
            w = weights[seen[0] : seen[0] + x.shape[0]].to(device=device, dtype=torch.float64)
            seen[0] += x.shape[0]
            x = x * w.sqrt().unsqueeze(-1)
        x = x.reshape(-1, m.in_features)
        h.addmm_(x.T, x)
        count[0] += x.shape[0]
        raise _Stop  # nothing after this layer is needed

    handle = lin.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch in iter_batches(data, batch_size):
                try:
                    qmodel(batch.to(device))
                except _Stop:
                    pass
    finally:
        handle.remove()
    return h, count[0]


def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    q: TensorQuantizer,
    damp: float = DAMP,
    act_order: bool = True,
) -> torch.Tensor:
    """GPTQ-rounded copy of ``weight`` (out, in) on ``q``'s frozen grid, as dequantized values.

    ``act_order``: round the columns with the largest inputs first (GPTQ's "act-order"), so their
    errors are the ones spread over the most remaining columns. The scales stay per channel/block
    of the original column order (fixed before rounding), so the export does not change.
    """
    w = weight.detach().double().clone()
    out, fan_in = w.shape
    scales = _column_scales(q, (out, fan_in)).double()
    lo, hi = q.qmin, q.qmax
    h = hessian.clone()
    dead = torch.diag(h) == 0  # an input that is always zero: its weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(fan_in)
    w, h, scales = w[:, perm], h[perm][:, perm], scales[:, perm]
    h.diagonal().add_(damp * torch.diag(h).mean())
    # Upper Cholesky factor of H⁻¹: row i holds the update of the columns after i (GPTQ's trick).
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    qw = torch.zeros_like(w)
    for i1 in range(0, fan_in, COLUMN_BLOCK):
        i2 = min(i1 + COLUMN_BLOCK, fan_in)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col, s = w1[:, i], scales[:, i1 + i]
            qcol = torch.clamp(torch.round(col / s), lo, hi) * s
            qw[:, i1 + i] = qcol
            e = (col - qcol) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return qw[:, torch.argsort(perm)].to(weight.dtype)


def _output_error(weight: torch.Tensor, qweight: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W−Q) H (W−Q)ᵀ) = Σ over the calibration tokens of ‖(W−Q) x‖²."""
    d = weight.double() - qweight.double()
    return float(torch.einsum("oi,ij,oj->", d, h, d))


@torch.no_grad()
def gptq_weights(
    qmodel: nn.Module,
    data,
    batch_size: int = 32,
    damp: float = DAMP,
    act_order: bool = True,
    views: int = 1,
    seed: int = 0,
    tokens: str = "uniform",
    float_model: nn.Module | None = None,
    progress: bool = True,
) -> dict:
    """Re-round every enabled, calibrated weight quantizer's Linear in ``qmodel`` with GPTQ.

    ``data``: the calibration images (tensor, CalibSet-like or iterable of batches); ``views`` > 1
    adds label-preserving variants of them to the Hessian (:func:`hessian_views`). ``tokens``:
    "uniform" (every token's term counts 1, the paper's) or "rollout" (each token weighted by how
    much it reaches the prediction in ``float_model``, :mod:`calibrators.rollout`). Returns the
    summary: layers re-rounded and the mean relative output-error reduction on the calibration
    inputs (``tr((W−Q) H (W−Q)ᵀ)`` of GPTQ over round-to-nearest's).
    """
    from sardfq_export.core.progress import progress_bar

    layers = [
        (n, m) for n, m in qmodel.named_modules()
        if isinstance(m, QuantLinear) and m.weight_quantizer.enabled and m.weight_quantizer.is_calibrated
    ]  # fmt: skip
    if not layers:
        raise UserInputError("GPTQ rounding needs calibrated weight quantizers: calibrate the model first")
    if tokens not in TOKEN_WEIGHTS:
        raise UserInputError(
            f"unknown GPTQ token weighting {tokens!r}: use one of {', '.join(TOKEN_WEIGHTS)}"
        )
    if views > 1:
        data = hessian_views(torch.cat(list(iter_batches(data, batch_size))), views, seed)
    importance: dict[str, torch.Tensor] = {}
    if tokens == "rollout":
        if float_model is None:
            raise UserInputError("rollout token weights are read from the float model: pass float_model")
        data = torch.cat(list(iter_batches(data, batch_size)))
        importance = rollout_token_weights(float_model, data, batch_size)
    was_training = qmodel.training
    qmodel.eval()
    ratios, seen = [], 0
    for name, lin in progress_bar(layers, desc="gptq", unit="layer", disable=not progress, leave=False):
        # outside the blocks (a quantized head, say) every token counts 1
        h, seen = _input_hessian(qmodel, lin, data, batch_size, importance.get(name))
        if seen == 0:
            raise UserInputError("GPTQ rounding saw no calibration images")
        wq = lin.weight_quantizer
        nearest = wq.fake_quant(lin.weight).double()
        rounded = gptq_round(lin.weight, h, wq, damp, act_order)
        before, after = _output_error(lin.weight, nearest, h), _output_error(lin.weight, rounded, h)
        if after < before:  # GPTQ is a heuristic; never keep a rounding worse on its own objective
            lin.weight.copy_(rounded)
            mark_modified(qmodel, {f"{name}.weight"})
        ratios.append(min(after, before) / before if before > 0 else 1.0)
    qmodel.train(was_training)
    summary = {
        "layers": len(layers),
        "tokens": seen,
        "damp": damp,
        "act_order": act_order,
        "views": views,
        "token_weights": tokens,
        "mean_output_error_ratio": sum(ratios) / len(ratios),
    }
    info = getattr(qmodel, "sardfq_quant", None)
    if info is not None:
        info["calibration"]["gptq"] = summary
    return summary
