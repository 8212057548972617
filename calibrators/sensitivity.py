"""Per-layer sensitivity, data-free: what each quantized Linear alone costs the model's output.

For every quantized Linear (its input and weight quantizers together, as they deploy), only that
layer is quantized, the rest of the model float, and the logits on held-out images (synthetic:
no data needed) are compared with the float model's: the relative squared error
``‖z_q − z‖² / ‖z‖²`` and the top-1 agreement. Attention-matmul quantizers, when the scheme
enables them, are measured the same way per attention module.

``keep_fp_for_target`` uses it for mixed precision: it leaves the most sensitive layers float, one
more at a time, until the whole model's held-out agreement with the float model meets a target,
and returns the fewest such layers (a greedy choice by sensitivity, each step measured).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from sardfq_export.calibrators.calibrate import iter_batches
from sardfq_export.calibrators.instrument import iter_quantizers
from sardfq_export.calibrators.modules import QuantLinear, _AttnQuantMixin
from sardfq_export.calibrators.quantizer import TensorQuantizer

from sardfq_export.core.errors import UserInputError


def _units(qmodel: nn.Module) -> list[tuple[str, list[TensorQuantizer]]]:
    """(name, quantizers) of every unit measured alone: quantized Linears, quantized attentions."""
    units = []
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLinear):
            qs = [q for q in (m.input_quantizer, m.weight_quantizer) if q.default_enabled]
        elif isinstance(m, _AttnQuantMixin):
            qs = [
                q
                for q in (m.q_quantizer, m.k_quantizer, m.v_quantizer, m.softmax_quantizer)
                if q.default_enabled
            ]
        else:
            continue
        if qs:
            units.append((name, qs))
    return units


def _logits(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model(b.to(device)).float().cpu() for b in iter_batches(images, batch_size)])


def _compare(z: torch.Tensor, ref: torch.Tensor) -> dict:
    rel = float(((z - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-30))
    agree = float((z.argmax(1) == ref.argmax(1)).float().mean())
    return {"rel_error": rel, "agreement": agree}


def _set(quantizers: list[TensorQuantizer], on: bool) -> None:
    for q in quantizers:
        q.enabled = on and q.default_enabled


@torch.no_grad()
def layer_sensitivity(
    qmodel: nn.Module, images: torch.Tensor, batch_size: int = 32, progress: bool = False
) -> dict:
    """Each quantized unit's cost on ``images`` when it alone is quantized, most sensitive first.

    Returns ``{"images": n, "all": {...whole model...}, "layers": [{"name", "rel_error",
    "agreement"}, ...]}``; the model's quantizers are left as they were.
    """
    from sardfq_export.core.progress import progress_bar

    if len(images) == 0:
        raise UserInputError("sensitivity needs at least one held-out image")
    units = _units(qmodel)
    all_qs = [q for _, q in iter_quantizers(qmodel)]
    saved = [q.enabled for q in all_qs]
    was_training = qmodel.training
    qmodel.eval()
    try:
        _set(all_qs, False)
        ref = _logits(qmodel, images, batch_size)
        rows = []
        for name, qs in progress_bar(
            units, desc="sensitivity", unit="layer", disable=not progress, leave=False
        ):
            _set(qs, True)
            rows.append({"name": name, **_compare(_logits(qmodel, images, batch_size), ref)})
            _set(qs, False)
        _set(all_qs, True)
        whole = _compare(_logits(qmodel, images, batch_size), ref)
    finally:
        for q, on in zip(all_qs, saved, strict=True):
            q.enabled = on
        qmodel.train(was_training)
    rows.sort(key=lambda r: (-r["rel_error"], r["name"]))
    return {"images": len(images), "all": whole, "layers": rows}


@torch.no_grad()
def fidelity_to_float(qmodel: nn.Module, images: torch.Tensor, batch_size: int = 32) -> dict:
    """The whole fake-quant model against itself with every quantizer off (the float model)."""
    all_qs = [q for _, q in iter_quantizers(qmodel)]
    saved = [q.enabled for q in all_qs]
    try:
        _set(all_qs, False)
        ref = _logits(qmodel, images, batch_size)
    finally:
        for q, on in zip(all_qs, saved, strict=True):
            q.enabled = on
    return _compare(_logits(qmodel, images, batch_size), ref)


@torch.no_grad()
def keep_fp_for_target(
    qmodel: nn.Module, images: torch.Tensor, target: float, sensitivity: dict | None = None,
    batch_size: int = 32, max_float: int | None = None,
) -> dict:  # fmt: skip
    """The fewest most-sensitive layers to leave float for held-out agreement ≥ ``target``.

    Layers are tried in sensitivity order (their quantizers switched off, which computes exactly
    what a float Linear computes); the whole model is re-measured after each. Returns
    ``{"keep_fp": [names], "agreement": a, "rel_error": e, "met": bool, "steps": [...]}``.
    """
    if not 0.0 < target <= 1.0:
        raise UserInputError(f"the fidelity target is an agreement in (0, 1], got {target}")
    sens = sensitivity or layer_sensitivity(qmodel, images, batch_size)
    units = dict(_units(qmodel))
    # keep_fp names Linears: attention-matmul units are measured but not candidates
    order = [r["name"] for r in sens["layers"] if isinstance(qmodel.get_submodule(r["name"]), QuantLinear)]
    limit = len(order) if max_float is None else min(max_float, len(order))
    all_qs = [q for _, q in iter_quantizers(qmodel)]
    saved = [q.enabled for q in all_qs]
    try:
        _set(all_qs, False)
        ref = _logits(qmodel, images, batch_size)
        _set(all_qs, True)
        now = _compare(_logits(qmodel, images, batch_size), ref)
        steps = [{"float": 0, **now}]
        kept: list[str] = []
        while now["agreement"] < target and len(kept) < limit:
            name = order[len(kept)]
            _set(units[name], False)
            kept.append(name)
            now = _compare(_logits(qmodel, images, batch_size), ref)
            steps.append({"float": len(kept), "name": name, **now})
    finally:
        for q, on in zip(all_qs, saved, strict=True):
            q.enabled = on
    return {"keep_fp": kept, "target": target, "met": now["agreement"] >= target, "steps": steps, **now}
