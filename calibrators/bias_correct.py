"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", §4.2; AIMET's empirical
variant): after ranges and weight rounding, each quantized Linear's bias absorbs the mean error of
its output on the calibration images.

Quantization error is not zero-mean per output channel: clipped outliers, rounding of a few large
weights, and an upstream layer's error all shift E[y_q] away from E[y]. The next layer's
per-tensor activation step sees that shift as signal. For each quantized Linear, in execution
order, with every earlier one already corrected:

    b ← b + E_tokens[ y_float ] − E_tokens[ y_quant ]

where y_float is the float model's output of that Linear on the images and y_quant the fake-quant
model's (quantized weights, quantized input, everything upstream quantized and corrected). A bias
is a float in the deployed graph (TensorRT and ONNX Runtime add it after the integer GEMM), so the
export is unchanged; save/load carries the new biases (``mark_modified``).

Cost: the model's transformer blocks (``block_names``: units that chain) are run one at a time
from the previous block's corrected output, each once per Linear inside it, stopping right after
that Linear (an exception from its hook): about one forward per Linear *of one block*, a few full
forwards in all. A Linear outside the blocks (a quantized head) is measured by a full forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from sardfq_export.calibrators.calibrate import iter_batches
from sardfq_export.calibrators.instrument import block_names, mark_modified
from sardfq_export.calibrators.modules import QuantLinear


class _Stop(Exception):
    """Raised by a hook once what is needed has been seen: the rest of the forward is skipped."""


def _feed(run, batches: list[torch.Tensor]) -> None:
    """``run(i, batch)`` for every batch, each stopped early by ``_Stop`` where a hook raises it."""
    for i, b in enumerate(batches):
        try:
            run(i, b)
        except _Stop:
            pass


def _unit_inputs(qmodel: nn.Module, unit: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """What ``unit`` receives for each batch: the model run up to it (and stopped there)."""
    got: list[torch.Tensor] = []

    def pre(m, args):
        got.append(args[0])
        raise _Stop

    h = unit.register_forward_pre_hook(pre)
    try:
        _feed(lambda i, b: qmodel(b), batches)
    finally:
        h.remove()
    return got


def _channel_mean(out: torch.Tensor) -> tuple[torch.Tensor, int]:
    flat = out.detach().reshape(-1, out.shape[-1]).double()
    return flat.sum(0), flat.shape[0]


@torch.no_grad()
def correct_biases(qmodel: nn.Module, float_model: nn.Module, data, progress: bool = False) -> dict:
    """Correct every quantized Linear's bias of ``qmodel`` (in place) on ``data`` (images tensor,
    CalibSet-like or iterable of batches) against ``float_model``: the model it was made from, or,
    after folds that rescale a Linear's outputs (SmoothQuant's or AWQ's V → proj: qkv's V rows), a
    float copy of ``qmodel`` itself (its quantizers off, weights not yet rounded), whose Linears
    compute in ``qmodel``'s units.

    Linears without a bias are skipped (adding one would change the exported graph). Returns a
    summary: how many Linears were corrected, on how many images, and the largest correction."""
    from sardfq_export.core.progress import progress_bar

    floats = dict(float_model.named_modules())
    targets = [(n, m) for n, m in qmodel.named_modules()
               if isinstance(m, QuantLinear) and m.bias is not None and isinstance(floats.get(n), nn.Linear)]  # fmt: skip
    if not targets:
        return {"corrected": 0}
    device = next(qmodel.parameters()).device
    batches = [b.to(device) for b in iter_batches(data)]

    # The float model's output means, every target at once.
    sums: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}

    def float_hook(m, args, out, n):
        s, k = _channel_mean(out)
        sums[n] = sums[n] + s if n in sums else s
        count[n] = count.get(n, 0) + k

    hooks = [floats[n].register_forward_hook(lambda m, a, o, n=n: float_hook(m, a, o, n)) for n, _ in targets]
    was = float_model.training
    float_model.eval()
    try:
        for b in batches:
            float_model(b)
    finally:
        float_model.train(was)
        for h in hooks:
            h.remove()

    def correct(name: str, lin: nn.Module, run) -> float:
        """Measure ``lin``'s mean output while ``run(batch)`` feeds each batch, then fix its bias."""
        acc: list[torch.Tensor] = []

        def hook(m, args, out):
            acc.append(_channel_mean(out)[0])
            raise _Stop

        h = lin.register_forward_hook(hook)
        try:
            _feed(run, batches)
        finally:
            h.remove()
        delta = (sums[name] - torch.stack(acc).sum(0)) / count[name]
        lin.bias.add_(delta.to(lin.bias.dtype))
        return float(delta.abs().max())

    was = qmodel.training
    qmodel.eval()
    largest = 0.0
    units = [(u, qmodel.get_submodule(u)) for u in block_names(qmodel)]
    in_unit = {n: u for n, _ in targets for u, _ in units if n.startswith(u + ".")}
    bar = progress_bar(
        total=len(targets), desc="bias correction", unit="layer", disable=not progress, leave=False
    )
    try:
        xs = _unit_inputs(qmodel, units[0][1], batches) if units else []
        for u, unit in units:
            for name, lin in ((n, m) for n, m in targets if in_unit.get(n) == u):
                largest = max(largest, correct(name, lin, lambda i, b, unit=unit, xs=xs: unit(xs[i])))
                bar.update(1)
            xs = [unit(x) for x in xs]  # the next unit's input, with this one corrected
        for name, lin in ((n, m) for n, m in targets if n not in in_unit):
            largest = max(largest, correct(name, lin, lambda i, b: qmodel(b)))
            bar.update(1)
    finally:
        bar.close()
        qmodel.train(was)
    mark_modified(qmodel, {f"{n}.bias" for n, _ in targets})
    return {"corrected": len(targets), "images": sum(int(b.shape[0]) for b in batches),
            "largest_correction": largest}  # fmt: skip
