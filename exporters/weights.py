"""Quantized weights as the exporter stores them: integer codes + the calibrators' scales.

The codes come from the quantizer's own forward (``weight_quantizer(weight)`` gives the
fake-quant weight; dividing by the calibrated scale gives integers exactly), so the exported
``DequantizeLinear`` reproduces PyTorch's fake-quant weight bit for bit and no scale is derived
here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn


@dataclass
class WeightPlan:
    """How one quantized Linear's weight goes into the ONNX."""

    module: str  # qualified module name, e.g. "blocks.0.attn.qkv"
    fq_weight: np.ndarray  # (out, in[, kh, kw]) float32: the fake-quant weight PyTorch uses
    codes: np.ndarray  # same shape, int8 integer codes
    scale: np.ndarray  # float32: () per-tensor, (out,) per-channel, (out, in // block) per-block
    bits: int  # 8, or 4 (stored INT4 when blocked weight-only, else in INT8 containers)
    block: int | None  # block size over the input dim, or None
    # 4-bit blocks nested on the channel's INT8 step (scheme.PerBlock nested): their size; the plan
    # itself is INT8 per channel (codes q·m, scale the step), so ``block`` is None
    nested_block: int | None = None

    @property
    def granularity(self) -> str:
        return "per-block" if self.block else ("per-channel" if self.scale.ndim == 1 else "per-tensor")

    def expanded_scale(self) -> np.ndarray:
        """The scale broadcast to the weight's (out, in) shape."""
        if self.block:
            return np.repeat(self.scale, self.block, axis=1)
        if self.scale.ndim == 1:
            return self.scale.reshape(-1, *([1] * (self.codes.ndim - 1)))
        return self.scale


def quantized_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every Linear-like module with an enabled, calibrated weight quantizer."""
    for name, mod in model.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if wq is None or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        if getattr(wq, "enabled", True) and getattr(wq, "is_calibrated", True):
            yield name, mod


@torch.no_grad()
def plan_weight(name: str, mod: nn.Module) -> WeightPlan:
    """The integer codes and scale of ``mod``'s weight, read from its quantizer (exactly)."""
    wq = mod.weight_quantizer
    weight = mod.weight.detach().float()
    fq = wq(weight).detach().float()
    scale = wq.scale.detach().float().cpu()
    if scale.numel() == 1:
        scale = scale.reshape(())
    out_f, in_f = weight.shape[0], weight.shape[1]
    block = None
    if weight.dim() != 2 and scale.ndim == 2:
        raise RuntimeError(
            f"{name}: block scales on a {weight.dim()}-D weight (only Linear weights are blocked)"
        )
    if scale.ndim == 2:
        if in_f % scale.shape[1] or scale.shape[0] != out_f:
            raise RuntimeError(
                f"{name}: block scale {tuple(scale.shape)} does not tile weight {(out_f, in_f)}"
            )
        block = in_f // scale.shape[1]
        full = scale.repeat_interleave(block, dim=1)
    elif scale.ndim == 1:
        if scale.shape[0] != out_f:
            raise RuntimeError(
                f"{name}: per-channel scale {tuple(scale.shape)} is not over the {out_f} outputs"
            )
        full = scale.reshape(-1, *([1] * (weight.dim() - 1)))
    else:
        full = scale
    codes = torch.round(fq.cpu() / full)
    bits = int(wq.bits)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if codes.min() < qmin or codes.max() > qmax:
        raise RuntimeError(
            f"{name}: weight codes fall outside the {bits}-bit range; quantizer state is inconsistent"
        )
    # Bit-exactness: DequantizeLinear computes code * scale in float32, as the fake-quant did.
    if not torch.equal(codes * full, fq.cpu()):
        raise RuntimeError(f"{name}: the fake-quant weight is not code × scale; cannot export it exactly")
    nested = getattr(wq.granularity, "nested", False)
    if nested:
        return _nested_plan(name, fq.cpu(), codes, scale, bits, block)
    return WeightPlan(
        name, fq.cpu().numpy(), codes.to(torch.int8).numpy(), scale.numpy().astype(np.float32), bits, block
    )


def _nested_plan(
    name: str, fq: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int, block: int
) -> WeightPlan:
    """A nested-block weight as INT8 per channel: codes q·m on each channel's step (the largest
    block scale / 15), checked to be the same float32 weight bit for bit."""
    from sardfq_export.calibrators.calibrate import NEST_MULTIPLES

    step = scale.amax(1) / NEST_MULTIPLES  # exact: the largest scale is 15 × a 20-bit step
    m = scale / step[:, None]
    if not (torch.equal(m, m.round()) and m.min() >= 1 and m.max() <= NEST_MULTIPLES):
        raise RuntimeError(
            f"{name}: nested block scales are not 1-{NEST_MULTIPLES} multiples of a channel step; cannot export"
        )
    wide = codes * m.repeat_interleave(block, dim=1)
    if not torch.equal(wide * step[:, None], fq):
        raise RuntimeError(
            f"{name}: the nested weight is not INT8 code × channel step; cannot export it exactly"
        )
    return WeightPlan(
        name, fq.numpy(), wide.to(torch.int8).numpy(), step.numpy().astype(np.float32), bits, None, block
    )


@contextlib.contextmanager
def float_weights_for_export(model: nn.Module, plans: list[WeightPlan]) -> Iterator[None]:
    """While exporting, the weights are the fake-quant values and their quantizers are off.

    So the traced graph holds each weight as a plain constant that the exporter then finds by
    value and replaces with integer codes + DequantizeLinear (whatever form the quantizer's
    forward would have traced to: per-block reshapes, 4-bit clamps ...). Restored afterwards.
    """
    mods = dict(model.named_modules())
    saved = []
    try:
        for plan in plans:
            mod = mods[plan.module]
            saved.append((mod, mod.weight.detach().clone(), mod.weight_quantizer.enabled))
            with torch.no_grad():
                mod.weight.copy_(torch.from_numpy(plan.fq_weight).to(mod.weight.dtype))
            mod.weight_quantizer.enabled = False
        yield
    finally:
        for mod, weight, enabled in saved:
            with torch.no_grad():
                mod.weight.copy_(weight)
            mod.weight_quantizer.enabled = enabled
