"""SmoothQuant-style smoothing folded into weights (scheme option ``smoothquant_alpha``).

For every quantized Linear fed directly by a LayerNorm (``qkv`` after ``norm1``, ``fc1`` after
``norm2``; Swin alike) a per-channel factor s_j = max|X_j|^α / max|W_j|^(1−α) moves activation
outliers into the weights: LayerNorm γ, β ← γ/s, β/s and W[:, j] ← W[:, j]·s_j. The float function
is unchanged; the graph keeps one per-tensor activation quantizer. Needs a re-iterable data source.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from sardfq_export.calibrators.instrument import block_names, mark_modified
from sardfq_export.calibrators.modules import QuantLinear


def _pairs(qmodel: nn.Module) -> list[tuple[str, nn.LayerNorm, str, QuantLinear]]:
    out = []
    for name in block_names(qmodel):
        blk = qmodel.get_submodule(name)
        for ln_name, lin_name in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")):
            try:
                ln, lin = blk.get_submodule(ln_name), blk.get_submodule(lin_name)
            except AttributeError:
                continue
            if isinstance(ln, nn.LayerNorm) and ln.elementwise_affine and isinstance(lin, QuantLinear):
                out.append((f"{name}.{ln_name}", ln, f"{name}.{lin_name}", lin))
    return out


@torch.no_grad()
def smooth_quant(qmodel: nn.Module, data, alpha: float = 0.5, progress: bool = False) -> int:
    """Fold SmoothQuant factors into LayerNorm/Linear pairs; returns how many pairs were smoothed."""
    from sardfq_export.calibrators.calibrate import _run_data

    pairs = _pairs(qmodel)
    explicit = [(n, m) for n, m in qmodel.named_modules()
                if isinstance(m, QuantLinear) and m._buffers.get("input_smooth") is not None]  # fmt: skip
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for lin_name, lin in [(p[2], p[3]) for p in pairs] + explicit:

        def hook(m, args, n=lin_name):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            amax[n] = x if n not in amax else torch.maximum(amax[n], x)

        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        _run_data(qmodel, data, progress, "smoothquant")
    finally:
        for h in hooks:
            h.remove()
    changed = set()
    for ln_name, ln, lin_name, lin in pairs:
        a = amax[lin_name].clamp(min=1e-5)
        w = lin.weight.abs().amax(0).clamp(min=1e-5)
        s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
        ln.weight.div_(s)
        if ln.bias is not None:
            ln.bias.div_(s)
        lin.weight.mul_(s[None, :])
        changed |= {f"{ln_name}.weight", f"{lin_name}.weight"} | (
            {f"{ln_name}.bias"} if ln.bias is not None else set()
        )
    for lin_name, lin in explicit:  # no op to fold into: the factor stays as an explicit Mul
        a = amax[lin_name].clamp(min=1e-5)
        w = lin.weight.abs().amax(0).clamp(min=1e-5)
        s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
        lin.input_smooth.copy_(1.0 / s)
        lin.weight.mul_(s[None, :])
        changed |= {f"{lin_name}.weight", f"{lin_name}.input_smooth"}
    mark_modified(qmodel, changed)
    return len(pairs) + len(explicit)
