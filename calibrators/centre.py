"""Centring a quantized Linear's input per channel (Outlier Suppression+'s shift, Wei et al. 2023).

TensorRT's INT8 activations are symmetric per tensor, so an input whose channels are not centred on
zero wastes levels: the post-GELU input of ``mlp.fc2`` lies in [-0.17, max], half of the symmetric
range is never used. Subtracting each channel's centre z_j = (max_j + min_j) / 2 (over every token
of the calibration images) halves the widest channel's range, and adding ``W z`` to the Linear's
bias keeps the float function: W (x − z) + (b + W z) = W x + b.

The shift is ``QuantLinear.input_shift`` (scheme option ``centre_fc2``): an explicit per-channel Sub
before the input quantizer, which TensorRT fuses into the GELU kernel as a pointwise op (one Sub in
ONNX Runtime). Measured on the DINOv2 benchmark model, w8a8 from 32 SARDFQ images, seed 0, first
2,000 test images (bench/dinov2_shift_probe.py, docs/dinov2-shift-probe.jsonl): fake-quant top-1
86.45% → 87.30% (FP32 87.15%), agreement with FP32 94.90% → 96.40%, activation noise floor 96.35%
→ 97.20%. Centring the LayerNorm outputs and V too (folded into β and V's bias, no runtime op) kept
top-1 but lowered the agreement (93.45%), so only fc2 is offered.

Runs before SmoothQuant (whose factors then see the centred input) and before the weight ranges
(the bias moves, the weight does not).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from sardfq_export.calibrators.instrument import iter_quantizers, mark_modified
from sardfq_export.calibrators.modules import QuantLinear

from sardfq_export.core.errors import UserInputError


@torch.no_grad()
def input_channel_ranges(targets: dict[str, nn.Module], run: Callable[[], object]) -> dict:
    """Per-channel (min, max) of each target module's input over every token seen while ``run()``
    feeds the model: {name: (lo, hi)}."""
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in targets.items():

        def hook(m, args, n=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            lo[n] = x.amin(0) if n not in lo else torch.minimum(lo[n], x.amin(0))
            hi[n] = x.amax(0) if n not in hi else torch.maximum(hi[n], x.amax(0))

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {n: (lo[n], hi[n]) for n in targets}


@torch.no_grad()
def centre_inputs(qmodel: nn.Module, data, progress: bool = False) -> int:
    """Set every ``input_shift`` of ``qmodel`` to its input's per-channel centre on ``data`` and fold
    ``W·shift`` into the bias; returns how many Linears were centred."""
    from sardfq_export.calibrators.calibrate import _run_data

    targets = [(n, m) for n, m in qmodel.named_modules()
               if isinstance(m, QuantLinear) and m._buffers.get("input_shift") is not None]  # fmt: skip
    if not targets:
        return 0
    if missing := [n for n, m in targets if m.bias is None]:  # the shift has nowhere to go back
        raise UserInputError(f"centre_fc2 needs a bias on {', '.join(missing)} (folds W·shift into it)")
    state = [(q, q.enabled) for _, q in iter_quantizers(qmodel)]
    try:
        for q, _ in state:  # the float model's inputs, even when re-calibrating a calibrated model
            q.enabled = False
        ranges = input_channel_ranges(dict(targets), lambda: _run_data(qmodel, data, progress, "centre"))
    finally:
        for q, on in state:
            q.enabled = on
    changed = set()
    for name, lin in targets:
        lo, hi = ranges[name]
        z = (lo + hi) / 2
        lin.input_shift.copy_(z)
        lin.bias.add_((lin.weight.detach().double() @ z.double()).to(lin.bias.dtype))
        changed |= {f"{name}.input_shift", f"{name}.bias"}
    mark_modified(qmodel, changed)
    return len(targets)
