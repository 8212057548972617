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

Target ``a`` in [0, 1]: GPTQ (a = 0, the paper's) fits the rounded layer's output ``Q X̃`` to
``W X̃``, the float weights on the *quantized* model's inputs, so the error the earlier layers and the
layer's own input quantizer left in ``X̃`` is taken as given. a = 1 fits ``W X``, the float model's
output at that layer (asymmetric calibration, as GPTAQ, Li et al. 2025); in between, the target is
``W X̃ + a W ΔX``. Writing ``ΔX = X − X̃`` and ``H = X̃ X̃ᵀ``, ``‖Q X̃ − W X̃ − a W ΔX‖² = ‖(Q − W′) X̃‖²
+ const`` with the least-squares weights ``W′ = W + a W ΔX X̃ᵀ H⁻¹`` (the residual is orthogonal to
``X̃``), so it is GPTQ run on ``W′`` with the same Hessian: one extra ``in × in`` statistic, and the
export is unchanged. Why a < 1: the full target also fits the activation rounding noise of the 32
calibration images (GPTAQ's own ViT code shrinks the term by 0.25).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from sardfq_export.calibrators.calibrate import iter_batches
from sardfq_export.calibrators.instrument import mark_modified, set_quantizers_enabled
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
    qmodel: nn.Module,
    lin: QuantLinear,
    data,
    batch_size: int,
    weights: torch.Tensor | None = None,
    reference: nn.Module | None = None,
    name: str = "",
) -> tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor] | None]:
    """Σ w x xᵀ over every token of the calibration images at ``lin``'s (quantized) input, float64;
    ``weights``: (images, tokens) per-token weights in the images' order (None: all 1). With a
    ``reference`` (the model with its quantizers off, before rounding), also ``(Σ w Δx xᵀ,
    Σ w Δx Δxᵀ)`` where ``Δx`` is what the reference's module ``name`` multiplies minus ``x`` (both
    after the module's own input shift and smoothing)."""
    device = lin.weight.device
    n = lin.in_features
    h = torch.zeros(n, n, dtype=torch.float64, device=device)
    cross = (torch.zeros_like(h), torch.zeros_like(h)) if reference is not None else None
    count, seen, ref_x = [0], [0], [None]

    def ref_hook(m, args):
        # what the reference's GEMM sees: its copy of the same shift and smoothing, its quantizer off
        # (fc2's centring subtracts z from the quantized model's input: a raw input would make Δx = z)
        x = args[0].detach()
        ref_x[0] = (m.quant_input(x) if isinstance(m, QuantLinear) else x).double()
        raise _Stop

    def hook(m, args):
        x = m.quant_input(args[0].detach()).double()  # what F.linear sees
        dx = ref_x[0] - x if cross is not None else None
        if weights is not None:
            w = weights[seen[0] : seen[0] + x.shape[0]].to(device=device, dtype=torch.float64)
            seen[0] += x.shape[0]
            x = x * w.sqrt().unsqueeze(-1)
            dx = dx * w.sqrt().unsqueeze(-1) if dx is not None else None
        x = x.reshape(-1, m.in_features)
        h.addmm_(x.T, x)
        if cross is not None:
            dx = dx.reshape(-1, m.in_features)
            cross[0].addmm_(dx.T, x)
            cross[1].addmm_(dx.T, dx)
        count[0] += x.shape[0]
        raise _Stop  # nothing after this layer is needed

    handle = lin.register_forward_pre_hook(hook)
    ref_handle = (
        reference.get_submodule(name).register_forward_pre_hook(ref_hook) if reference is not None else None
    )
    try:
        with torch.no_grad():
            for batch in iter_batches(data, batch_size):
                batch = batch.to(device)
                if reference is not None:
                    try:
                        reference(batch)
                    except _Stop:
                        pass
                try:
                    qmodel(batch)
                except _Stop:
                    pass
    finally:
        handle.remove()
        if ref_handle is not None:
            ref_handle.remove()
    return h, count[0], cross


def float_target_weights(
    weight: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, damp: float = DAMP, target: float = 1.0
) -> torch.Tensor:
    """``W′ = W + a W C H⁻¹`` (float64), ``C = Σ Δx x̃ᵀ``, ``a`` = ``target``: the weights whose output
    on the quantized inputs ``x̃`` is closest to ``W (x̃ + a Δx)`` (a = 1: the float weights on the float
    inputs; least squares, ``H`` dampened as GPTQ dampens it; inputs always zero keep their weights)."""
    w = weight.detach().double()
    hd = h.clone()
    dead = torch.diag(hd) == 0
    hd[dead, dead] = 1.0
    hd.diagonal().add_(damp * torch.diag(hd).mean())
    # W C H⁻¹ = (H⁻¹ Cᵀ Wᵀ)ᵀ, H symmetric positive definite once dampened
    delta = torch.cholesky_solve((w @ cross).T, torch.linalg.cholesky(hd)).T
    delta[:, dead] = 0.0
    return w + target * delta


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


def _output_error(
    weight: torch.Tensor,
    qweight: torch.Tensor,
    h: torch.Tensor,
    cross: tuple[torch.Tensor, torch.Tensor] | None = None,
    target: float = 1.0,
) -> float:
    """tr((W−Q) H (W−Q)ᵀ) = Σ over the calibration tokens of ‖(W−Q) x‖²; with ``cross`` (the float
    target's ``(Σ Δx xᵀ, Σ Δx Δxᵀ)``) and ``target`` a: Σ ‖Q x − W (x + a Δx)‖²."""
    w = weight.double()
    d = qweight.double() - w
    err = torch.einsum("oi,ij,oj->", d, h, d)
    if cross is not None:
        c, dd = cross  # ‖D x − W Δx‖² = xᵀDᵀDx − 2 ΔxᵀWᵀDx + ΔxᵀWᵀWΔx
        a = target
        err = err - 2 * a * torch.einsum("oi,ji,oj->", d, c, w) + a * a * torch.einsum("oi,ij,oj->", w, dd, w)
    return float(err)


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
    target: float = 0.0,
    reference: nn.Module | None = None,
    progress: bool = True,
) -> dict:
    """Re-round every enabled, calibrated weight quantizer's Linear in ``qmodel`` with GPTQ.

    ``data``: the calibration images (tensor, CalibSet-like or iterable of batches); ``views`` > 1
    adds label-preserving variants of them to the Hessian (:func:`hessian_views`). ``tokens``:
    "uniform" (every token's term counts 1, the paper's) or "rollout" (each token weighted by how
    much it reaches the prediction in ``float_model``, :mod:`calibrators.rollout`). ``target``:
    0 fits each layer's float output on its quantized inputs (the paper's), 1 the float model's
    output there, in between a mix (the module docstring; the reference is ``qmodel`` itself with its
    quantizers off, taken before any rounding, so folds that rescale a layer keep its units; a caller
    that holds one already, as bias correction does, passes it as ``reference``).
    Returns the summary: layers re-rounded and the mean relative output-error reduction on the
    calibration inputs (the target's error of GPTQ over round-to-nearest's).
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
    if isinstance(target, bool) or not 0.0 <= target <= 1.0:
        raise UserInputError(f"GPTQ's target is a weight in [0, 1] (0: the paper's), got {target!r}")
    if views > 1:
        data = hessian_views(torch.cat(list(iter_batches(data, batch_size))), views, seed)
    importance: dict[str, torch.Tensor] = {}
    if tokens == "rollout":
        if float_model is None:
            raise UserInputError("rollout token weights are read from the float model: pass float_model")
        data = torch.cat(list(iter_batches(data, batch_size)))
        importance = rollout_token_weights(float_model, data, batch_size)
    if target == 0:
        reference = None
    elif reference is None:
        reference = copy.deepcopy(qmodel).eval()
        set_quantizers_enabled(reference, False)
    was_training = qmodel.training
    qmodel.eval()
    ratios, seen = [], 0
    for name, lin in progress_bar(layers, desc="gptq", unit="layer", disable=not progress, leave=False):
        # outside the blocks (a quantized head, say) every token counts 1
        h, seen, cross = _input_hessian(qmodel, lin, data, batch_size, importance.get(name), reference, name)
        if seen == 0:
            raise UserInputError("GPTQ rounding saw no calibration images")
        wq = lin.weight_quantizer
        nearest = wq.fake_quant(lin.weight).double()
        goal = lin.weight if cross is None else float_target_weights(lin.weight, h, cross[0], damp, target)
        rounded = gptq_round(goal, h, wq, damp, act_order)
        before = _output_error(lin.weight, nearest, h, cross, target)
        after = _output_error(lin.weight, rounded, h, cross, target)
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
        "target": target,
        "mean_output_error_ratio": sum(ratios) / len(ratios),
    }
    info = getattr(qmodel, "sardfq_quant", None)
    if info is not None:
        info["calibration"]["gptq"] = summary
    return summary
