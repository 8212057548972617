"""SmoothQuant-style smoothing folded into weights (scheme option ``smoothquant_alpha``).

A per-input-channel factor s_j = max|X_j|^α / max|W_j|^(1−α) moves activation outliers of a
quantized Linear's input X into its weight (W[:, j] ← W[:, j]·s_j) and is divided out where X is
made, so the float function is unchanged and the graph keeps one per-tensor activation quantizer:

- ``qkv`` after ``norm1`` and ``fc1`` after ``norm2`` (Swin alike): LayerNorm γ, β ← γ/s, β/s;
- ``attn.proj``, whose input channel j is attention-weighted V channel j (softmax·V mixes tokens,
  never channels): V's rows of ``qkv`` (weight and bias) ← ·1/s_j;
- ``mlp.fc2`` with ``smooth_explicit``: GELU is in between, so 1/s stays as an explicit per-channel
  Mul before the quantizer (``QuantLinear.input_smooth``; TensorRT fuses it).

Needs a re-iterable data source.
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


def _v_proj_pairs(qmodel: nn.Module) -> list[tuple[str, QuantLinear, str, QuantLinear]]:
    """(qkv name, qkv, proj name, proj) of attentions whose proj input is softmax·V, channel for
    channel: fused qkv with V as its last third, no norm or other per-token op before proj."""
    out = []
    for name in block_names(qmodel):
        attn = getattr(qmodel.get_submodule(name), "attn", None)
        qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
        if not (isinstance(qkv, QuantLinear) and isinstance(proj, QuantLinear)):
            continue
        if qkv.out_features != 3 * proj.in_features or not isinstance(getattr(attn, "norm", nn.Identity()),
                                                                       nn.Identity):  # fmt: skip
            continue  # (a norm before proj, e.g. timm's scale_norm, mixes channels per token)
        out.append((f"{name}.attn.qkv", qkv, f"{name}.attn.proj", proj))
    return out


def _factors(amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    a = amax.clamp(min=1e-5)
    w = weight.abs().amax(0).clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def _explicit(qmodel: nn.Module) -> list[tuple[str, QuantLinear]]:
    """Quantized Linears with an explicit per-channel factor before their input (``input_smooth``)."""
    return [(n, m) for n, m in qmodel.named_modules()
            if isinstance(m, QuantLinear) and m._buffers.get("input_smooth") is not None]  # fmt: skip


def scalable(qmodel: nn.Module) -> list[tuple[str, QuantLinear]]:
    """(name, Linear) of every Linear whose input channels can be rescaled without changing the float
    function (:func:`fold_factors`), in the order the folds are applied: V → proj first (it rescales
    rows of qkv, whose columns the norm1 → qkv fold then rescales), LayerNorm → Linear, explicit."""
    return ([(p[2], p[3]) for p in _v_proj_pairs(qmodel)] + [(p[2], p[3]) for p in _pairs(qmodel)]
            + _explicit(qmodel))  # fmt: skip


@torch.no_grad()
def fold_factors(qmodel: nn.Module, factors: dict[str, torch.Tensor]) -> set[str]:
    """For each Linear named in ``factors`` (one of :func:`scalable`): its weight's input channel j
    ← ·s_j and 1/s_j folded where its input is made, so the float function is unchanged. Returns
    (and marks modified) the changed parameter and buffer names."""
    changed = set()
    for qkv_name, qkv, proj_name, proj in _v_proj_pairs(qmodel):
        if (s := factors.get(proj_name)) is None:
            continue
        c = proj.in_features
        qkv.weight[2 * c :].div_(s[:, None])
        if qkv.bias is not None:
            qkv.bias[2 * c :].div_(s)
        proj.weight.mul_(s[None, :])
        changed |= {f"{qkv_name}.weight", f"{proj_name}.weight"} | (
            {f"{qkv_name}.bias"} if qkv.bias is not None else set()
        )
    for ln_name, ln, lin_name, lin in _pairs(qmodel):
        if (s := factors.get(lin_name)) is None:
            continue
        ln.weight.div_(s)
        if ln.bias is not None:
            ln.bias.div_(s)
        lin.weight.mul_(s[None, :])
        changed |= {f"{ln_name}.weight", f"{lin_name}.weight"} | (
            {f"{ln_name}.bias"} if ln.bias is not None else set()
        )
    for lin_name, lin in _explicit(qmodel):  # no op to fold into: the factor stays as an explicit Mul
        if (s := factors.get(lin_name)) is None:
            continue
        lin.input_smooth.copy_(1.0 / s)
        lin.weight.mul_(s[None, :])
        changed |= {f"{lin_name}.weight", f"{lin_name}.input_smooth"}
    mark_modified(qmodel, changed)
    return changed


def observe_inputs(qmodel: nn.Module, sites, data, fn, progress: bool = False, desc: str = "inputs") -> None:
    """Run ``data`` through ``qmodel`` once, calling ``fn(name, rows)`` with the input of every
    Linear in ``sites`` (``[(name, Linear)]``) as ``[tokens, channels]`` rows. A centred input
    (``input_shift``) is given centred: it is what the weights see and what a fold rescales."""
    from sardfq_export.calibrators.calibrate import _run_data

    hooks = []
    for name, lin in sites:

        def hook(m, args, n=name):
            x = args[0].detach()
            shift = m._buffers.get("input_shift")
            fn(n, (x - shift if shift is not None else x).reshape(-1, x.shape[-1]))

        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        _run_data(qmodel, data, progress, desc)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def smooth_quant(qmodel: nn.Module, data, alpha: float = 0.5, progress: bool = False) -> int:
    """Fold SmoothQuant factors into LayerNorm/Linear pairs; returns how many pairs were smoothed."""
    sites = scalable(qmodel)
    amax: dict[str, torch.Tensor] = {}

    def observe(n: str, rows: torch.Tensor) -> None:
        x = rows.abs().amax(0)
        amax[n] = x if n not in amax else torch.maximum(amax[n], x)

    observe_inputs(qmodel, sites, data, observe, progress, "smoothquant")
    # One pass measured every input: each fold keeps the float function, so none changes the input
    # of a Linear folded after it. V's fold goes first (fold_factors' order): it rescales rows of
    # qkv, whose column maxima the norm1 → qkv factors must see (then both end balanced).
    v = {
        proj_name: _factors(amax[proj_name], proj.weight, alpha)
        for _, _, proj_name, proj in _v_proj_pairs(qmodel)
    }
    fold_factors(qmodel, v)
    fold_factors(qmodel, {n: _factors(amax[n], lin.weight, alpha) for n, lin in sites if n not in v})
    return len(sites)
