"""The fake-quant primitive: ``TensorQuantizer``, numerically identical to the exported Q/DQ.

Every quantizer is symmetric with zero-point 0 and round-half-to-even:

* 8-bit: ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` (quant range
  -128..127), which ``torch.onnx`` exports as QuantizeLinear/DequantizeLinear.
* 4-bit (int): ``clamp(x, -8·s, 7·s)`` followed by the same 8-bit fake-quant with scale ``s``.
  After the clamp ``round(x/s)`` lies in -8..7, so this equals 4-bit fake-quant exactly and
  exports as Clip → Q → DQ in an INT8 container.
* per-block (INT4 weight-only): the weight (out, in) is viewed as (out·in/blk, blk) and
  fake-quantized per row with the (out, in/blk) scales flattened: same arithmetic per block.
* log2 (research only): ``s · 2^-clamp(round(-log2(x/s)), 0, 2^b-1)`` for non-negative inputs
  (post-softmax probabilities); no Q/DQ equivalent, so schemes using it are not exportable.

Scales are buffers frozen after calibration; ``forward`` never recomputes them and has no
data-dependent branch. A disabled or uncalibrated quantizer returns its input object itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from sardfq_export.calibrators.scheme import Granularity, PerBlock, PerChannel, PerTensor

SCALE_FLOOR = 1e-8  # scales must be strictly positive (TensorRT); an all-zero channel gets this


class TensorQuantizer(nn.Module):
    """Symmetric fake-quantizer for one tensor (an activation or a weight)."""

    def __init__(
        self,
        bits: int,
        granularity: Granularity = PerTensor(),
        kind: str = "int",
        enabled: bool = True,
        shape: tuple[int, ...] = (),
        role: str = "activation",
    ):
        super().__init__()
        if kind not in ("int", "log2"):
            raise ValueError(f"unknown quantizer kind {kind!r}")
        self.bits = int(bits)
        self.granularity = granularity
        self.kind = kind
        self.enabled = bool(enabled)
        self.default_enabled = self.enabled  # what the scheme asked for (set_quantizers_enabled(True))
        self.role = role  # "activation" or "weight": which calibration applies
        self.register_buffer("scale", torch.zeros(shape, dtype=torch.float32))
        self._calibrated = False  # Python flag, so forward has no tensor-dependent branch
        self.collector = None  # set during calibration: statistics of what flows through
        # (weight, its fake-quant) inside ``with frozen_weights(model):``, else None
        self._frozen: tuple[torch.Tensor, torch.Tensor] | None = None
        # log of a learned factor on the frozen step while reconstruction trains it (learn_step), else None
        self._gain: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(_refresh_after_load)

    # -- properties of the contract --------------------------------------------------------
    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def is_calibrated(self) -> bool:
        """Scale set and strictly positive everywhere."""
        return bool(self.scale.numel() > 0 and (self.scale > 0).all())

    @property
    def active(self) -> bool:
        """Whether forward changes anything (enabled and calibrated)."""
        return self.enabled and self._calibrated

    def set_scale(self, scale: torch.Tensor) -> None:
        """Freeze a new scale (shape must match the granularity); floors it at SCALE_FLOOR."""
        scale = torch.as_tensor(scale, dtype=torch.float32).to(self.scale.device)
        if tuple(scale.shape) != tuple(self.scale.shape):
            raise ValueError(f"scale shape {tuple(scale.shape)} != expected {tuple(self.scale.shape)}")
        with torch.no_grad():
            self.scale.copy_(scale.clamp(min=SCALE_FLOOR))
        self._calibrated = True

    def set_amax(self, amax: torch.Tensor) -> None:
        """Scale from the clipping range: ``amax / qmax`` (int) or ``amax`` (log2)."""
        amax = torch.as_tensor(amax, dtype=torch.float32)
        self.set_scale(amax if self.kind == "log2" else amax / self.qmax)

    def learn_step(self) -> torch.Tensor:
        """Start learning this quantizer's step: returns the log-factor (a leaf tensor, 0) that
        ``fake_quant`` applies to the frozen scale, with LSQ's gradient through rounding and clipping
        (torch's learnable fake-quant op). Per-tensor integer quantizers only; ``freeze_step`` ends it."""
        if self.kind != "int" or not isinstance(self.granularity, PerTensor) or not self._calibrated:
            raise ValueError(
                f"only a calibrated per-tensor integer quantizer learns its step, not {self.extra_repr()}"
            )
        self._gain = torch.zeros(1, device=self.scale.device, requires_grad=True)
        return self._gain

    def freeze_step(self) -> None:
        """End ``learn_step``: the learned factor is folded into the frozen scale."""
        gain, self._gain = self._gain, None
        if gain is not None:
            self.set_scale(self.scale * gain.detach().exp().reshape(self.scale.shape))

    def reset(self) -> None:
        with torch.no_grad():
            self.scale.zero_()
        self._calibrated = False

    # -- numerics --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.collector is not None:
            self.collector.collect(x.detach())
            return x
        if not (self.enabled and self._calibrated):
            return x
        if self._frozen is not None and x is self._frozen[0] and not torch.is_grad_enabled():
            return self._frozen[1]
        return self.fake_quant(x)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``x`` with the frozen scale (no enabled check)."""
        if self.kind == "log2":
            return _log2_fake_quant(x, self.scale, self.bits)
        if self._gain is not None:  # learning the step: same grid, clip and rounding, plus d/d(step)
            scale = (self.scale * self._gain.exp()).reshape(1)
            zero = torch.zeros(1, device=scale.device)
            y = torch._fake_quantize_learnable_per_tensor_affine(
                x.float(), scale, zero, self.qmin, self.qmax, 1.0
            )
            return y.to(x.dtype)
        g = self.granularity
        if isinstance(g, PerBlock):
            out, nblk = self.scale.shape
            xb = x.reshape(out * nblk, x.shape[-1] // nblk)
            y = _fq_channel(xb, self.scale.reshape(-1), 0, self.bits)
            return y.reshape(x.shape)
        if isinstance(g, PerChannel):
            return _fq_channel(x, self.scale, g.axis, self.bits)
        return _fq_tensor(x, self.scale, self.bits)

    def extra_repr(self) -> str:
        g = self.granularity
        gran = {PerTensor: "per-tensor", PerChannel: "per-channel", PerBlock: "per-block"}[type(g)]
        if isinstance(g, PerBlock):
            gran += f"({g.size})"
        state = "enabled" if self.enabled else "disabled"
        cal = "calibrated" if self._calibrated else "uncalibrated"
        return f"{self.kind}{self.bits}, {gran}, {state}, {cal}"


class frozen_weights:
    """Within ``with frozen_weights(model):`` each active weight quantizer returns its weight's
    fake-quant computed once on entry, when called without grad on that same weight tensor.

    Evaluation passes (validation's fidelity, accuracy over 10k images) otherwise re-quantize every
    weight per batch, a cost that does not shrink with the batch. The cached tensor is the very same op's output on the same input, so the logits are
    bit-identical (tested). The weights and scales must not change inside the block; a disabled
    quantizer, or a call with grad (training), takes the normal path.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.frozen: list[TensorQuantizer] = []

    def __enter__(self) -> nn.Module:
        with torch.no_grad():
            for m in self.model.modules():
                q, w = getattr(m, "weight_quantizer", None), getattr(m, "weight", None)
                if isinstance(q, TensorQuantizer) and isinstance(w, torch.Tensor) and q.active:
                    q._frozen = (w, q.fake_quant(w))
                    self.frozen.append(q)
        return self.model

    def __exit__(self, *exc) -> None:
        for q in self.frozen:
            q._frozen = None
        self.frozen.clear()


class perturbed_activations:
    """Within ``with perturbed_activations(model):`` every active activation quantizer sees its
    input times (1 + ``rel``·ε), ε ~ N(0, 1) drawn from a generator seeded with ``seed``.

    This is what another runtime does to the fake-quant model: its float kernels (integer GEMMs,
    fused attention, its own LayerNorm/GELU) round differently by a few ulps in *every* layer, and
    each difference can carry a value across an 8-bit rounding boundary. Perturbing only the input
    misses that (measured on DINOv2 in docs/dinov2-accuracy.md), so the report's noise floor is
    measured this way. Weights are constants both runtimes quantize identically: left alone.
    """

    def __init__(self, model: nn.Module, rel: float = 1e-6, seed: int = 0, names: set[str] | None = None):
        # names: the activation quantizers (module names in ``model``) to perturb; None: all of them
        self.model, self.rel, self.seed, self.names = model, rel, seed, names
        self.handles: list = []

    def __enter__(self) -> nn.Module:
        gen = torch.Generator().manual_seed(self.seed)

        def hook(_m, args):
            x = args[0]
            eps = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device)
            # in float32: in bf16/fp16, 1 + 1e-6·ε rounds to 1 and the floor would silently read 100%
            return ((x.float() * (1 + self.rel * eps)).to(x.dtype),) + tuple(args[1:])

        for name, m in self.model.named_modules():
            if isinstance(m, TensorQuantizer) and m.role == "activation" and m.active:
                if self.names is None or name in self.names:
                    self.handles.append(m.register_forward_pre_hook(hook))
        return self.model

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class dropped_quantization:
    """Within ``with dropped_quantization(module, p, seed):`` every active activation quantizer in
    ``module`` passes each element of its input through unquantized with probability ``p`` (the rest
    fake-quantized as usual): QDrop's random drop of activation quantization (Wei et al., ICLR 2022,
    their p = 0.5). Reconstruction trains the weights under it so that they suit a neighbourhood of
    the calibrated activations rather than the few calibration images' exact rounding, which is what
    flattens the loss for unseen inputs. Training only: a deployed model quantizes every element.
    The mask comes from a generator seeded with ``seed`` on the input's device (deterministic)."""

    def __init__(self, module: nn.Module, p: float, seed: int = 0):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"the drop probability is in [0, 1), got {p}")
        self.module, self.p, self.seed = module, float(p), seed
        self.handles: list = []

    def __enter__(self) -> nn.Module:
        if self.p == 0.0:
            return self.module
        gens: dict[torch.device, torch.Generator] = {}

        def hook(_m, args, out):
            x = args[0]
            if out is x:
                return out
            gen = gens.get(x.device)
            if gen is None:
                gen = gens[x.device] = torch.Generator(device=x.device).manual_seed(self.seed)
            keep_float = torch.rand(x.shape, generator=gen, device=x.device) < self.p
            return torch.where(keep_float, x, out)

        for m in self.module.modules():
            if isinstance(m, TensorQuantizer) and m.role == "activation" and m.active:
                self.handles.append(m.register_forward_hook(hook))
        return self.module

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _refresh_after_load(module: TensorQuantizer, incompatible) -> None:
    module._calibrated = module.is_calibrated


def _zero_point(scale: torch.Tensor) -> torch.Tensor:
    return torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)


def _fq_tensor(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    if bits < 8:  # 4-bit grid inside the INT8 container: clip first, then the same Q/DQ
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        x = torch.clamp(x, min=scale * lo, max=scale * hi)
    if x.device.type == "cpu" and x.dtype == scale.dtype == torch.float32 and _plain_eval(x, scale):
        # ATen's CPU per-tensor kernel computes clamp(nearbyint(x · (1/scale)), -128, 127) through
        # an int64, times scale, element by element (and builds a gradient mask). The same float
        # ops, vectorized and in place, give the same bits (tested): NaN → -128 as fmax does it,
        # and +0.0 where the integer round trip drops the sign of a -0.0. A DINOv2 fake-quant
        # forward takes 1.36× as long with the op (bench/validation_passes.py). With gradients
        # (the straight-through mask), while exporting (Q/DQ nodes) or on a GPU (one fused kernel
        # there), the op itself runs.
        q = x.mul(torch.reciprocal(scale)).round_().clamp_(-128, 127).nan_to_num_(nan=-128.0)
        return q.add_(0.0).mul_(scale)
    return torch.fake_quantize_per_tensor_affine(x, scale, _zero_point(scale), -128, 127)


def _plain_eval(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """No gradient to carry and no graph being traced: a pure evaluation of the fake-quant."""
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return False
    return not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def _fq_channel(x: torch.Tensor, scale: torch.Tensor, axis: int, bits: int) -> torch.Tensor:
    if bits < 8:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        shape = [1] * x.dim()
        shape[axis] = -1
        s = scale.view(shape)
        x = torch.clamp(x, min=s * lo, max=s * hi)
    return torch.fake_quantize_per_channel_affine(x, scale, _zero_point(scale), axis, -128, 127)


class _Log2Round(torch.autograd.Function):
    """round() with a straight-through gradient (log2 quantizer is not a torch fake-quant op)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _log2_fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2**bits - 1
    ratio = (x / scale).clamp(min=2.0 ** (-levels - 1))
    e = _Log2Round.apply(-torch.log2(ratio)).clamp(0, levels)
    y = scale * torch.pow(2.0, -e)
    # values below the smallest level flush to zero (as in FQ-ViT / RepQ-ViT)
    return torch.where(x / scale < 2.0 ** (-levels - 0.5), torch.zeros_like(y), y)
