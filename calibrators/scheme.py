"""Quantization schemes: small frozen, printable, serializable configs, and their registry.

TensorRT's constraints are encoded here once: activations symmetric per-tensor (zero-point 0),
weights symmetric per output channel, INT4 weight-only with blocks of 64/128 input channels.
A scheme that breaks them (the research scheme: log2 softmax, quantized patch-embed/head at
4 bits) carries ``exportable=False`` and the exporter calls :meth:`Scheme.assert_exportable`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from sardfq_export.core.errors import UserInputError


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor (every activation quantizer)."""

    def to_dict(self) -> dict:
        return {"type": "per_tensor"}


@dataclass(frozen=True)
class PerChannel:
    """One scale per slice along ``axis`` (axis 0 = output channel of a Linear/Conv weight)."""

    axis: int = 0

    def to_dict(self) -> dict:
        return {"type": "per_channel", "axis": self.axis}


@dataclass(frozen=True)
class PerBlock:
    """One scale per block of ``size`` consecutive input channels of each output row (INT4).

    ``nested``: each row's block scales are integer multiples m ∈ [1, 15] of one step per output
    channel (the largest block scale of the row / 15), so a 4-bit code q of a block is the INT8 code
    q·m ∈ [-120, 105] of that channel (inside the narrow weight range [-127, 127]): the weight is
    stored and run as INT8 per channel (an INT8 GEMM beside INT8 activations, which TensorRT's
    blocked INT4 path is not), while each block keeps a 4-bit grid of its own size. The multiples
    are 4-bit scale codes, as llama.cpp's k-quants quantize their block scales against one
    super-block scale."""

    size: int = 128
    nested: bool = False

    def __post_init__(self) -> None:
        if self.size not in (64, 128):
            raise UserInputError(f"INT4 block size must be 64 or 128 (TensorRT), got {self.size}")

    def to_dict(self) -> dict:
        return {"type": "per_block", "size": self.size, **({"nested": True} if self.nested else {})}


Granularity = PerTensor | PerChannel | PerBlock


def granularity_from_dict(d: dict) -> Granularity:
    kind = d.get("type")
    if kind == "per_tensor":
        return PerTensor()
    if kind == "per_channel":
        return PerChannel(int(d.get("axis", 0)))
    if kind == "per_block":
        return PerBlock(int(d.get("size", 128)), bool(d.get("nested", False)))
    raise UserInputError(f"unknown granularity {d!r}")


@dataclass(frozen=True)
class Scheme:
    """What gets quantized, to how many bits, at which granularity. ``None`` = not quantized."""

    name: str
    w_bits: int = 8  # weight bits of every quantized Linear/Conv (4 or 8)
    w_granularity: Granularity = PerChannel(0)  # PerChannel(0) or PerBlock(64|128)
    a_bits: int | None = 8  # activation bits (per-tensor); None = weight-only (W4A16)
    quantize_attn_matmuls: bool = False  # Q·Kᵀ inputs and softmax·V inputs (TensorRT fused MHA)
    quantize_residual: bool = False  # both inputs of every residual add (hurts ViT accuracy)
    quantize_patch_embed: bool = False  # patch-embed conv input + weight
    quantize_head: bool = False  # classifier head(s) input + weight
    log2_softmax: bool = False  # post-softmax probabilities with a log2 quantizer (not deployable)
    smoothquant_alpha: float | None = None  # SmoothQuant migration strength, folded into weights
    # With smoothquant_alpha: also smooth the MLP's second Linear, whose input (post-GELU) has no
    # affine op to fold into: an explicit per-channel Mul before its input quantizer (a pointwise
    # op TensorRT fuses into the GELU kernel; one Mul in ONNX Runtime).
    smooth_explicit: bool = False
    # Centre the MLP's second Linear input per channel (Outlier Suppression+'s shift): post-GELU
    # values lie in [-0.17, max], so symmetric INT8 wastes half its levels; an explicit per-channel
    # Sub before the input quantizer (a pointwise op TensorRT fuses into the GELU kernel), W·shift
    # added to the bias, so the float function is unchanged.
    centre_fc2: bool = False
    # Activation-aware scaling of 4-bit weights (calibrators.awq): per-input-channel factors searched
    # on the calibration images, folded like SmoothQuant's (fc2 through the same explicit Mul).
    awq: bool = False
    # Linears left in float (timm module-name globs, e.g. "blocks.11.mlp.fc2"): mixed precision
    # that TensorRT runs as is (a float GEMM between Q/DQ ones). Saved with the scheme.
    keep_fp: tuple[str, ...] = ()
    exportable: bool = True  # False: research only, the exporter refuses it
    description: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.keep_fp, str) or not all(isinstance(p, str) and p for p in self.keep_fp):
            raise UserInputError(f"keep_fp must be a sequence of module-name patterns, got {self.keep_fp!r}")
        object.__setattr__(self, "keep_fp", tuple(self.keep_fp))  # JSON gives a list
        if self.w_bits not in (4, 8):
            raise UserInputError(f"weight bits must be 4 or 8, got {self.w_bits}")
        if self.a_bits not in (None, 4, 8):
            raise UserInputError(f"activation bits must be 4, 8 or None, got {self.a_bits}")
        if isinstance(self.w_granularity, PerBlock) and self.w_bits != 4:
            raise UserInputError("block-wise weight scales are for INT4 weight-only (w_bits=4)")
        if isinstance(self.w_granularity, PerTensor):
            raise UserInputError("weights are quantized per output channel or per block, not per tensor")
        if self.a_bits is None and (
            self.quantize_attn_matmuls or self.quantize_residual or self.log2_softmax
        ):
            raise UserInputError("a weight-only scheme cannot quantize attention matmuls or residuals")
        if self.log2_softmax and not self.quantize_attn_matmuls:
            raise UserInputError("log2_softmax needs quantize_attn_matmuls")
        if self.smooth_explicit and self.smoothquant_alpha is None:
            raise UserInputError("smooth_explicit needs smoothquant_alpha")
        if self.centre_fc2 and self.a_bits is None:
            raise UserInputError("centre_fc2 centres a quantized activation: a weight-only scheme has none")
        if self.awq and self.w_bits != 4:
            raise UserInputError("awq scales 4-bit weights: use a w4 scheme (w4a16, w4a8, w4a4)")
        if self.awq and self.smoothquant_alpha is not None:
            raise UserInputError("awq and smoothquant both rescale the Linears' inputs: choose one")
        if self.smoothquant_alpha is not None and not 0.0 < self.smoothquant_alpha < 1.0:
            raise UserInputError(f"smoothquant_alpha must be in (0, 1), got {self.smoothquant_alpha}")

    # -- export contract -------------------------------------------------------------------
    def export_problems(self) -> list[str]:
        """Why this scheme cannot become a TensorRT/ONNX Q/DQ graph (empty list: it can)."""
        problems = []
        if not self.exportable:
            problems.append(f"scheme {self.name!r} is research-only (exportable=False)")
        if self.log2_softmax:
            problems.append("log2 softmax quantizer has no Q/DQ equivalent")
        g = self.w_granularity
        if isinstance(g, PerBlock) and self.a_bits is not None and not g.nested:
            problems.append(
                "block-wise INT4 weights are weight-only in TensorRT (a_bits must be None; with INT8 "
                "activations, nested blocks run as INT8 per channel)"
            )
        return problems

    def assert_exportable(self) -> None:
        """Raise UserInputError when this scheme cannot be exported (the exporter calls it)."""
        problems = self.export_problems()
        if problems:
            raise UserInputError(
                "cannot export: "
                + "; ".join(problems)
                + ". Use a deployable scheme: "
                + ", ".join(n for n, s in SCHEMES.items() if s.exportable)
            )

    # -- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["w_granularity"] = self.w_granularity.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scheme:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserInputError(f"unknown scheme fields {sorted(unknown)} (saved by a newer version?)")
        d = dict(d)
        if isinstance(d.get("w_granularity"), dict):
            d["w_granularity"] = granularity_from_dict(d["w_granularity"])
        return cls(**d)

    def with_options(self, **changes: Any) -> Scheme:
        """A copy with some fields changed (``None`` values are ignored: 'keep the default')."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **changes) if changes else self

    def __str__(self) -> str:
        g = self.w_granularity
        gran = "per-channel"
        if isinstance(g, PerBlock):
            gran = f"block{g.size}" + (" on INT8 channel steps" if g.nested else "")
        flags = [
            f
            for f in (
                "quantize_attn_matmuls",
                "quantize_residual",
                "quantize_patch_embed",
                "quantize_head",
                "log2_softmax",
            )
            if getattr(self, f)
        ]
        if self.smoothquant_alpha is not None:
            flags.append(f"smoothquant={self.smoothquant_alpha}")
        if self.centre_fc2:
            flags.append("centred fc2 input")
        if self.awq:
            flags.append("awq")
        if self.keep_fp:
            flags.append(f"float: {' '.join(self.keep_fp)}")
        acts = f"A{self.a_bits} per-tensor" if self.a_bits else "A16 (float activations)"
        tail = "" if self.exportable else " [research only, not exportable]"
        return (
            f"{self.name}: W{self.w_bits} {gran}, {acts}" + (f", {', '.join(flags)}" if flags else "") + tail
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# name → scheme. Adding a scheme adds an entry here (and a test, and a README line).
SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme(
            "w8a8",
            8,
            PerChannel(0),
            8,
            description="INT8 weights per channel + INT8 activations per tensor on every block Linear",
        ),
        Scheme(
            "w4a16",
            4,
            PerBlock(128),
            None,
            description="INT4 weight-only, blocks of 128 input channels (TensorRT INT4 GEMM)",
        ),
        Scheme(
            "w4a16_b64", 4, PerBlock(64), None, description="INT4 weight-only, blocks of 64 input channels"
        ),
        Scheme(
            "w4a8",
            4,
            PerChannel(0),
            8,
            description="4-bit weight grid per channel in INT8 containers + INT8 activations",
        ),
        Scheme(
            "w4a4",
            4,
            PerChannel(0),
            4,
            description="4-bit weight and activation grids emulated in INT8 containers (Clip + Q/DQ)",
        ),
        Scheme(
            "research_w4a4_log2",
            4,
            PerChannel(0),
            4,
            quantize_attn_matmuls=True,
            quantize_patch_embed=True,
            quantize_head=True,
            log2_softmax=True,
            exportable=False,
            description="papers' W4A4 setting: + patch-embed, head, attention matmuls, log2 softmax",
        ),
    )
}
DEFAULT_SCHEME = "w8a8"


def get_scheme(name: str | Scheme | None = None) -> Scheme:
    """A registered scheme by name (None → w8a8); a Scheme passes through."""
    if isinstance(name, Scheme):
        return name
    name = name or DEFAULT_SCHEME
    if name not in SCHEMES:
        raise UserInputError(f"unknown scheme {name!r}: choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name]
