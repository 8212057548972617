"""Quantized modules. Each is a subclass of the timm/torch module it replaces, swapped in place
(``module.__class__ = Quant...``), so parameters, buffers and state-dict keys stay the original
ones and the quantizers are added next to them with stable names.

Bit-exactness when every quantizer is off: ``QuantLinear``/``QuantConv2d`` call the same
``F.linear``/``_conv_forward`` as torch; ``QuantAttention``/``QuantWindowAttention`` keep the
*original module's forward* (timm's fused SDPA for ViT, its explicit path for Swin) whenever none
of their attention-matmul quantizers is enabled, and only then switch to the explicit
``q@kᵀ → softmax → @v`` path, written op for op like timm's non-fused branch
(``set_explicit_attention`` forces it, e.g. for attention capture or export).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from sardfq_export.calibrators.quantizer import TensorQuantizer
from sardfq_export.calibrators.scheme import PerBlock, PerChannel, PerTensor, Scheme
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block

from sardfq_export.core.errors import UserInputError


def _act_quantizer(bits: int | None, enabled: bool = True, kind: str = "int") -> TensorQuantizer:
    return TensorQuantizer(bits or 8, PerTensor(), kind=kind, enabled=bool(bits) and enabled)


def _weight_quantizer(weight: torch.Tensor, scheme: Scheme, where: str) -> TensorQuantizer:
    g = scheme.w_granularity
    if isinstance(g, PerBlock) and weight.dim() == 2:
        fan_in = weight.shape[1]
        size = next((s for s in (g.size, 128, 64) if s <= g.size and fan_in % s == 0), None)
        if size is None:
            fix = "--weight-block 0 (4-bit per channel)" if g.nested else "a per-channel scheme (w4a8)"
            raise UserInputError(
                f"{where}: {fan_in} input channels are not a multiple of the 4-bit block size "
                f"({g.size}; 64 also tried): use {fix} for this model"
            )
        shape = (weight.shape[0], fan_in // size)
        return TensorQuantizer(scheme.w_bits, PerBlock(size, g.nested), shape=shape, role="weight")
    return TensorQuantizer(scheme.w_bits, PerChannel(0), shape=(weight.shape[0],), role="weight")


class QuantLinear(nn.Linear):
    """``nn.Linear`` with ``input_quantizer`` (per-tensor) and ``weight_quantizer`` (per channel/block)."""

    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer

    @classmethod
    def convert(cls, m: nn.Linear, scheme: Scheme, where: str = "Linear") -> QuantLinear:
        if type(m) is not nn.Linear:
            raise UserInputError(f"{where}: expected nn.Linear, found {type(m).__name__}")
        m.__class__ = cls
        m.input_quantizer = _act_quantizer(scheme.a_bits)
        m.weight_quantizer = _weight_quantizer(m.weight, scheme, where)
        return m

    def add_input_smoothing(self) -> None:
        """A per-input-channel factor applied before the input quantizer (explicit SmoothQuant),
        ones until calibrators.smooth sets it (x·1 is exact: the float function is unchanged)."""
        self.register_buffer("input_smooth", torch.ones(self.in_features, device=self.weight.device))

    def add_input_shift(self) -> None:
        """A per-input-channel shift subtracted before the input quantizer (and before the smoothing
        factor): zeros until calibrators.centre sets it and adds ``W·shift`` to the bias."""
        self.register_buffer("input_shift", torch.zeros(self.in_features, device=self.weight.device))

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the GEMM sees: x shifted, smoothed, then through the input quantizer."""
        shift = self._buffers.get("input_shift")
        if shift is not None:
            x = x - shift
        smooth = self._buffers.get("input_smooth")
        if smooth is not None:
            x = x * smooth
        return self.input_quantizer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quant_input(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` (patch embedding) with per-tensor input and per-output-channel weight quantizers."""

    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer

    @classmethod
    def convert(cls, m: nn.Conv2d, scheme: Scheme, where: str = "Conv2d") -> QuantConv2d:
        if type(m) is not nn.Conv2d:
            raise UserInputError(f"{where}: expected nn.Conv2d, found {type(m).__name__}")
        m.__class__ = cls
        m.input_quantizer = _act_quantizer(scheme.a_bits)
        # Convolutions have no INT4 block path in TensorRT: per output channel always.
        m.weight_quantizer = TensorQuantizer(
            scheme.w_bits, PerChannel(0), shape=(m.weight.shape[0],), role="weight"
        )
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class _AttnQuantMixin:
    """Quantizers on the two attention matmuls: q·kᵀ (q, k) and softmax·v (softmax, v)."""

    def _setup_attn_quant(self, scheme: Scheme) -> None:
        on = scheme.quantize_attn_matmuls
        self.q_quantizer = _act_quantizer(scheme.a_bits, on)
        self.k_quantizer = _act_quantizer(scheme.a_bits, on)
        self.v_quantizer = _act_quantizer(scheme.a_bits, on)
        kind = "log2" if scheme.log2_softmax else "int"
        self.softmax_quantizer = _act_quantizer(scheme.a_bits, on, kind=kind)
        self.force_explicit = False

    def _explicit(self) -> bool:
        # Python state only (no tensor-dependent branch): explicit when a matmul quantizer would act
        # (enabled and calibrated) or is collecting calibration statistics.
        return self.force_explicit or any(
            qz.enabled and (qz._calibrated or qz.collector is not None)
            for qz in (self.q_quantizer, self.k_quantizer, self.v_quantizer, self.softmax_quantizer)
        )


class QuantAttention(_AttnQuantMixin, Attention):
    """timm ``Attention`` (ViT/DeiT) with explicit, quantizable q·kᵀ and softmax·v."""

    @classmethod
    def convert(cls, m: Attention, scheme: Scheme, where: str = "attn") -> QuantAttention:
        m.__class__ = cls
        m._setup_attn_quant(scheme)
        return m

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if not self._explicit():
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * self.scale
        attn = self.q_quantizer(q) @ self.k_quantizer(k).transpose(-2, -1)
        attn_bias = resolve_self_attn_mask(N, attn, attn_mask, is_causal)
        attn = maybe_add_mask(attn, attn_bias)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = self.softmax_quantizer(attn) @ self.v_quantizer(v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class QuantWindowAttention(_AttnQuantMixin, WindowAttention):
    """timm Swin ``WindowAttention`` (relative position bias, shift masks) with quantizable matmuls."""

    @classmethod
    def convert(cls, m: WindowAttention, scheme: Scheme, where: str = "attn") -> QuantWindowAttention:
        m.__class__ = cls
        m._setup_attn_quant(scheme)
        return m

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self._explicit():
            return super().forward(x, mask=mask)
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = self.q_quantizer(q) @ self.k_quantizer(k).transpose(-2, -1)
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        x = self.softmax_quantizer(attn) @ self.v_quantizer(v)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class _ResidualQuantMixin:
    """Quantizers on both inputs of each of the block's two residual adds (off by default)."""

    def _setup_residual_quant(self, scheme: Scheme) -> None:
        self.residual_quantizer1 = _act_quantizer(scheme.a_bits)
        self.branch_quantizer1 = _act_quantizer(scheme.a_bits)
        self.residual_quantizer2 = _act_quantizer(scheme.a_bits)
        self.branch_quantizer2 = _act_quantizer(scheme.a_bits)


class QuantBlock(_ResidualQuantMixin, Block):
    """timm ViT ``Block`` with quantized residual adds (only used when the scheme asks for it)."""

    @classmethod
    def convert(cls, m: Block, scheme: Scheme, where: str = "block") -> QuantBlock:
        m.__class__ = cls
        m._setup_residual_quant(scheme)
        return m

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        branch = self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = self.residual_quantizer1(x) + self.branch_quantizer1(branch)
        branch = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return self.residual_quantizer2(x) + self.branch_quantizer2(branch)


class QuantSwinBlock(_ResidualQuantMixin, SwinTransformerBlock):
    """timm ``SwinTransformerBlock`` with quantized residual adds (only when the scheme asks)."""

    @classmethod
    def convert(cls, m: SwinTransformerBlock, scheme: Scheme, where: str = "block") -> QuantSwinBlock:
        m.__class__ = cls
        m._setup_residual_quant(scheme)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = self.residual_quantizer1(x) + self.branch_quantizer1(self.drop_path1(self._attn(self.norm1(x))))
        x = x.reshape(B, -1, C)
        x = self.residual_quantizer2(x) + self.branch_quantizer2(self.drop_path2(self.mlp(self.norm2(x))))
        return x.reshape(B, H, W, C)


QUANT_WEIGHTED = (QuantLinear, QuantConv2d)
