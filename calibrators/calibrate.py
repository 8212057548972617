"""Range calibration: weights from the weights themselves, activations from a forward loop.

Activation methods (per-tensor, symmetric): ``minmax`` (max |x| seen), ``percentile`` (the p-th
percentile of |x|, default 99.99), ``mse`` (the clip that minimizes the quantization MSE of the
observed distribution). Statistics are streamed into a symmetric histogram whose range doubles
when needed (pairs of bins merge exactly), so any number of batches fits in constant memory.
Weight methods: ``minmax`` (max |w| per channel/block) or ``mse`` (per channel/block search of
the clip ratio). The data source is a callable ``forward_loop(model)`` or an iterable of image
batches (tensors, ``(images, labels)`` tuples, or an object with ``.batches()`` such as CalibSet).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from sardfq_export.calibrators.modules import QUANT_WEIGHTED
from sardfq_export.calibrators.quantizer import SCALE_FLOOR, TensorQuantizer, _fq_channel
from sardfq_export.calibrators.scheme import PerBlock

from sardfq_export.core.errors import UserInputError

ACT_METHODS = ("minmax", "percentile", "mse")
WEIGHT_METHODS = ("minmax", "mse")
DataSource = Callable[[nn.Module], None] | Iterable


class HistogramCollector:
    """Running max |x| and a symmetric histogram over [-R, R] (R doubles as values grow)."""

    def __init__(self, num_bins: int = 2048, histogram: bool = True):
        if num_bins % 4:
            raise ValueError("num_bins must be a multiple of 4")
        self.num_bins = num_bins
        self.histogram = histogram
        self.amax: torch.Tensor | None = None
        self.hist: torch.Tensor | None = None
        self.range = 0.0

    def collect(self, x: torch.Tensor) -> None:
        x = x.float()
        amax = x.abs().max()
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        if not self.histogram:
            return
        a = float(amax)  # one host sync per quantizer and batch, during calibration only
        if self.hist is None:
            self.range = max(a, 1e-12)
            self.hist = torch.zeros(self.num_bins, dtype=torch.float64, device=x.device)
        while a > self.range:  # double the range: merge bin pairs, pad a quarter on each side
            merged = self.hist.view(-1, 2).sum(1)
            pad = torch.zeros(self.num_bins // 4, dtype=torch.float64, device=x.device)
            self.hist = torch.cat([pad, merged, pad])
            self.range *= 2
        self.hist += torch.histc(x.reshape(-1), bins=self.num_bins, min=-self.range, max=self.range).double()

    def centers(self) -> torch.Tensor:
        w = 2 * self.range / self.num_bins
        return -self.range + w * (
            torch.arange(self.num_bins, dtype=torch.float64, device=self.hist.device) + 0.5
        )

    def compute_amax(
        self, method: str, quantizer: TensorQuantizer, percentile: float = 99.99, norm: float = 2.0
    ) -> torch.Tensor:
        if self.amax is None:
            raise UserInputError("calibration saw no data: the data source yielded no batches")
        amax = self.amax.float()
        if method == "minmax" or quantizer.kind == "log2" or self.hist is None or float(amax) == 0.0:
            return amax
        if method == "percentile":
            half = self.num_bins // 2
            folded = self.hist[half:] + self.hist[:half].flip(0)  # histogram of |x|
            cdf = folded.cumsum(0) / folded.sum()
            j = int(
                torch.searchsorted(cdf, torch.tensor(percentile / 100.0, dtype=cdf.dtype, device=cdf.device))
            )
            edge = (j + 1) * self.range / half
            return torch.minimum(amax, torch.tensor(edge, dtype=torch.float32, device=amax.device))
        if method == "mse":
            v, n = self.centers(), self.hist
            keep = n > 0
            v, n = v[keep], n[keep]
            cands = float(amax) * torch.linspace(0.02, 1.0, 200, dtype=torch.float64, device=v.device)
            s = (cands / quantizer.qmax)[:, None]
            q = torch.clamp(torch.round(v[None] / s), quantizer.qmin, quantizer.qmax) * s
            d = v[None] - q
            err = ((d**2 if norm == 2 else d.abs() ** norm) * n[None]).sum(1)
            return cands[int(err.argmin())].float().to(amax.device)
        raise UserInputError(f"unknown range method {method!r}: choose one of {', '.join(ACT_METHODS)}")


def _weight_views(w: torch.Tensor, q: TensorQuantizer) -> tuple[torch.Tensor, int]:
    """(rows, row_len) view of a weight whose rows each get one scale, and the scale count."""
    if isinstance(q.granularity, PerBlock):
        return w.reshape(q.scale.numel(), -1), q.scale.numel()
    return w.reshape(w.shape[0], -1), w.shape[0]


@torch.no_grad()
def calibrate_weight(
    q: TensorQuantizer, weight: torch.Tensor, method: str = "minmax", importance: torch.Tensor | None = None
) -> None:
    """Per channel (or block) scales for ``weight``: max |w|, or the MSE-best clip ratio.

    ``importance`` (one value per input channel, e.g. the layer input's mean square): the MSE
    weighs each weight's error by it, i.e. the output error when input channels are uncorrelated
    (activation-aware clipping, as AWQ's clip search; without it a clip would cut exactly the
    weights AWQ scaled up to protect)."""
    if method not in WEIGHT_METHODS:
        raise UserInputError(
            f"unknown weight range method {method!r}: choose one of {', '.join(WEIGHT_METHODS)}"
        )
    w = weight.detach().float()
    rows, _ = _weight_views(w, q)
    amax = rows.abs().amax(1)
    weigh = None
    if method == "mse":
        weigh = 1.0
        if importance is not None:  # the same per-input-channel weights, laid out as the rows are
            weigh = _weight_views(importance.float().reshape(1, -1).expand_as(w), q)[0]
        best_err = torch.full_like(amax, float("inf"))
        best = amax.clone()
        for ratio in torch.linspace(1.0, 0.3, 71).tolist():
            cand = (amax * ratio).clamp(min=1e-8)
            fq = _fq_channel(rows, cand / q.qmax, 0, q.bits)
            err = ((fq - rows) ** 2 * weigh).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, cand, best)
        amax = best
    if isinstance(q.granularity, PerBlock) and q.granularity.nested:
        q.set_scale(nested_block_scales(rows, amax / q.qmax, q, weigh))
        return
    q.set_amax(amax.reshape(q.scale.shape))


# A block scale is m × its channel's step, m = 1..15: the INT8 codes q·m (q in -8..7) stay in
# [-120, 105], inside the narrow weight range [-127, 127] that TensorRT's implicit (calibrator) INT8
# mode and TFLite's spec assume; explicit Q/DQ, what we export, takes -128 as well (NVIDIA/TensorRT#1796).
NEST_MULTIPLES = 15


def channel_step(block_scales: torch.Tensor) -> torch.Tensor:
    """(out,) INT8 step of each channel of nested (out, blocks) scales: the largest block's / 15,
    its float32 significand rounded up to 20 bits so that every m × step (m ≤ 15) is exact in
    float32 (and the largest scale / 15 gives the step back exactly). Then a 4-bit code q times its
    block scale and the INT8 code q·m times the step round the same exact product once: the
    fake-quant weight and the exported INT8 per-channel ``DequantizeLinear`` agree bit for bit
    (exporters.weights checks it)."""
    top = block_scales.amax(1).clamp(min=SCALE_FLOOR * NEST_MULTIPLES) / NEST_MULTIPLES
    mant, exp = torch.frexp(top.float())
    return torch.ldexp(torch.ceil(mant * 2.0**20), exp - 20).float()


@torch.no_grad()
def nested_block_scales(
    rows: torch.Tensor, scale: torch.Tensor, q: TensorQuantizer, weigh: torch.Tensor | float | None
) -> torch.Tensor:
    """Block scales (out, blocks) on each channel's INT8 step (``PerBlock(nested=True)``), from the
    free ones the range method chose (``scale``, one per row of ``rows``, the blocks' weights).

    The largest block of each channel keeps 15 steps (its scale, rounded up by at most 2⁻¹⁹); every
    other block takes the multiple m of the step with the least (``weigh``-ted) squared error on its
    weights (``weigh`` None: the smallest m that clips nothing, min-max's meaning)."""
    shape = q.scale.shape
    step = channel_step(scale.reshape(shape))
    per_row = step.repeat_interleave(shape[1])
    if weigh is None:
        m = torch.ceil(scale / per_row).clamp(1, NEST_MULTIPLES)
    else:
        best_err = torch.full_like(scale, float("inf"))
        m = torch.ones_like(scale)
        for k in range(1, NEST_MULTIPLES + 1):
            err = ((_fq_channel(rows, per_row * k, 0, q.bits) - rows) ** 2 * weigh).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            m = torch.where(better, torch.full_like(m, k), m)
    # the largest block keeps all 15 steps: the export reads each channel's step back as its largest / 15
    m = m.reshape(shape)
    m[torch.arange(shape[0]), scale.reshape(shape).argmax(1)] = NEST_MULTIPLES
    return m * step[:, None]


def _run_data(model: nn.Module, data: DataSource, progress: bool, desc: str) -> int:
    """Feed the data source through ``model``; returns the number of images seen."""
    if callable(data) and not isinstance(data, torch.Tensor) and not hasattr(data, "batches"):
        data(model)
        return -1
    from sardfq_export.core.progress import progress_bar

    device = next(model.parameters()).device
    seen = 0
    for batch in progress_bar(iter_batches(data), desc=desc, unit="batch", disable=not progress, leave=False):
        model(batch.to(device))
        seen += int(batch.shape[0])
    if seen == 0:
        raise UserInputError("calibration data is empty: pass at least one image")
    return seen


def iter_batches(data, batch_size: int = 32):
    """Image batches from a tensor, a CalibSet-like object, or an iterable of tensors/tuples."""
    if isinstance(data, torch.Tensor):
        yield from data.split(batch_size)
        return
    if hasattr(data, "batches"):
        data = data.batches(batch_size)
    for batch in data:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        elif isinstance(batch, dict):
            batch = batch["images"]
        if not isinstance(batch, torch.Tensor):
            raise UserInputError(f"calibration batches must be image tensors, got {type(batch).__name__}")
        yield batch


def calibrate(
    qmodel: nn.Module,
    data: DataSource,
    method: str = "minmax",
    weight_method: str = "minmax",
    percentile: float = 99.99,
    num_bins: int = 2048,
    progress: bool = True,
    norm: float = 2.0,
) -> dict:
    """Set every enabled quantizer's scale in ``qmodel`` (weights first, then activations).

    ``data``: a ``forward_loop(model)`` callable, a tensor of images, a CalibSet-like object, or
    any iterable of image batches. ``norm``: the exponent p of ``mse``'s error, sum |x - q(x)|^p (2:
    the squared error; a larger p weighs the clipped tail more, so the clip is wider). Returns a
    summary (also stored in the saved model).
    """
    if norm <= 0:
        raise UserInputError(f"the range search's error exponent must be > 0, got {norm}")
    if method not in ACT_METHODS:
        raise UserInputError(f"unknown range method {method!r}: choose one of {', '.join(ACT_METHODS)}")
    was_training = qmodel.training
    qmodel.eval()
    scheme = getattr(qmodel, "scheme", None)
    if scheme is not None and scheme.centre_fc2:
        from sardfq_export.calibrators.centre import centre_inputs  # moves biases: before smoothing

        centre_inputs(qmodel, data, progress)
    if scheme is not None and scheme.smoothquant_alpha is not None:
        from sardfq_export.calibrators.smooth import (
            smooth_quant,  # folds factors into weights: before weight ranges
        )

        smooth_quant(qmodel, data, scheme.smoothquant_alpha, progress)
    awq = None
    if scheme is not None and scheme.awq:
        from sardfq_export.calibrators.awq import (
            awq_scale,  # folds factors into weights: before weight ranges
        )

        awq = awq_scale(qmodel, data, weight_method, progress=progress)
    weight_qs = set()
    for m in qmodel.modules():
        if isinstance(m, QUANT_WEIGHTED):
            weight_qs.add(id(m.weight_quantizer))
            if m.weight_quantizer.enabled:
                importance = awq["importance"].get(id(m)) if awq is not None else None
                calibrate_weight(m.weight_quantizer, m.weight, weight_method, importance)
    acts = [
        m for m in qmodel.modules()
        if isinstance(m, TensorQuantizer) and id(m) not in weight_qs and m.enabled
    ]  # fmt: skip
    seen = 0
    if acts:
        for q in acts:
            q.collector = HistogramCollector(num_bins, histogram=method != "minmax")
        try:
            with torch.no_grad():
                seen = _run_data(qmodel, data, progress, f"calibrate ({method})")
            for q in acts:
                q.set_amax(q.collector.compute_amax(method, q, percentile, norm))
        finally:
            for q in acts:
                q.collector = None
    qmodel.train(was_training)
    summary = {
        "method": method,
        "weight_method": weight_method,
        "percentile": percentile if method == "percentile" else None,
        "norm": norm if method == "mse" else None,
        "num_images": seen,
        "activation_quantizers": len(acts),
        "weight_quantizers": sum(
            1 for m in qmodel.modules() if isinstance(m, QUANT_WEIGHTED) and m.weight_quantizer.enabled
        ),
    }
    if awq is not None:
        summary["awq"] = {k: v for k, v in awq.items() if k != "importance"}
    info = getattr(qmodel, "sardfq_quant", None)
    if info is not None:
        info["calibration"].update(summary)
    return summary
