"""TensorRT's explicit-quantization rules, checked on an ONNX graph.

Errors (``violations``) are what makes TensorRT's parser or builder refuse the model or silently
fall back: non-zero zero-points, non-positive scales, per-channel scales on activations, block
scales other than 64/128 on INT4 weights, INT4 activations, UINT8 Q/DQ, too old an opset, a
``QuantizeLinear`` not followed by its ``DequantizeLinear``, requantization. ``warnings`` are
patterns that build but do not fuse into INT8 kernels (a Q/DQ pair feeding LayerNorm, a GEMM
with only one side quantized). Every message names the node and says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from sardfq_export.exporters.onnx_graph import (
    QDQ_OPS,
    attr,
    constant_map,
    consumers,
    opset_of,
    producers,
    to_array,
)

from sardfq_export.core.errors import UserInputError

MIN_OPSET = 17  # LayerNormalization as one op (a decomposed one overflows in FP16)
MIN_OPSET_INT4 = 21  # INT4 types and blocked DequantizeLinear
INT4_BLOCKS = (64, 128)
GEMMS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
# Ops TensorRT can absorb a DQ into, or move Q/DQ across, without an extra reformat.
FUSABLE_CONSUMERS = set(GEMMS) | {
    "Add",
    "Concat",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Gather",
    "Split",
    "Flatten",
    "Identity",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Pad",
}
_TYPE_NAMES = {v: k for k, v in TensorProto.DataType.items()}


@dataclass
class Violation:
    """One broken rule: which node, which rule, and why it matters."""

    rule: str
    node: str
    message: str
    severity: str = "error"  # "error": TensorRT refuses or mis-builds; "warning": will not fuse

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"

    def to_dict(self) -> dict:
        return {"rule": self.rule, "node": self.node, "message": self.message, "severity": self.severity}


@dataclass
class LintReport:
    """``passed`` when there is no error; warnings never fail the lint."""

    violations: list[Violation] = field(default_factory=list)
    warnings: list[Violation] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "violations": [str(v) for v in self.violations],
            "warnings": [str(v) for v in self.warnings],
            "details": [v.to_dict() for v in self.violations + self.warnings],
            "stats": self.stats,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _name(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0]})"


class _Linter:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.consts = constant_map(self.graph)
        self.prod = producers(self.graph)
        self.cons = consumers(self.graph)
        self.report = LintReport()

    def error(self, rule: str, node: onnx.NodeProto | str, msg: str) -> None:
        name = node if isinstance(node, str) else _name(node)
        self.report.violations.append(Violation(rule, name, msg))

    def warn(self, rule: str, node: onnx.NodeProto | str, msg: str) -> None:
        name = node if isinstance(node, str) else _name(node)
        self.report.warnings.append(Violation(rule, name, msg, "warning"))

    def qtype(self, node: onnx.NodeProto) -> int | None:
        """The integer type a Q produces / a DQ consumes (from the zero-point or the constant)."""
        if len(node.input) > 2 and node.input[2] in self.consts:
            return self.consts[node.input[2]].data_type
        if node.op_type == "DequantizeLinear" and node.input[0] in self.consts:
            return self.consts[node.input[0]].data_type
        if node.op_type == "QuantizeLinear" and len(node.input) <= 2:
            return TensorProto.UINT8  # no zero-point: ONNX defaults to uint8 output
        return None

    def run(self) -> LintReport:
        opset = opset_of(self.model)
        qdq = [n for n in self.graph.node if n.op_type in QDQ_OPS]
        int4_types = (TensorProto.INT4, TensorProto.UINT4)
        has_int4 = any(t.data_type in int4_types for t in self.consts.values())
        # INT4 weights: the distinct INT4 constants a DQ dequantizes (not their zero-points, and an
        # Identity alias of a constant is the same tensor)
        int4 = {id(self.consts[n.input[0]]) for n in qdq
                if n.op_type == "DequantizeLinear" and n.input[0] in self.consts
                and self.consts[n.input[0]].data_type in int4_types}  # fmt: skip
        if opset < MIN_OPSET:
            self.error(
                "opset",
                "model",
                f"opset {opset} < {MIN_OPSET}: LayerNorm would be decomposed "
                "(overflows in FP16); export with opset ≥ 17",
            )
        if has_int4 and opset < MIN_OPSET_INT4:
            self.error(
                "opset-int4", "model", f"INT4 tensors need opset ≥ {MIN_OPSET_INT4}, model has {opset}"
            )
        for node in qdq:
            self.check_qdq(node)
        for node in self.graph.node:
            if node.op_type == "QuantizeLinear":
                self.check_q_pairing(node)
            elif node.op_type == "DequantizeLinear":
                self.check_dq_use(node)
            elif node.op_type in ("MatMul", "Gemm"):
                self.check_gemm(node)
        self.report.stats = {
            "opset": opset,
            "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in qdq),
            "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in qdq),
            "int4_tensors": len(int4),  # INT4 weights (the blocked weights of a W4 export)
        }
        return self.report

    # --- per-node rules -------------------------------------------------------------------
    def check_qdq(self, node: onnx.NodeProto) -> None:
        x, scale_name = node.input[0], node.input[1]
        if scale_name not in self.consts:
            self.error(
                "scale-constant", node, "scale is computed at run time; TensorRT needs a constant scale"
            )
            return
        scale = to_array(self.consts[scale_name]).astype(np.float64)
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            self.error(
                "scale-positive",
                node,
                f"scale has {int(np.sum(~(scale > 0)))} non-positive or non-finite "
                "values; TensorRT needs strictly positive scales",
            )
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in self.consts:
                self.error(
                    "zero-point", node, "zero-point is not a constant; TensorRT needs a constant of zeros"
                )
            elif np.any(to_array(self.consts[node.input[2]]) != 0):
                self.error(
                    "zero-point",
                    node,
                    "non-zero zero-point (asymmetric quantization): TensorRT's parser "
                    "fails with shiftIsAllZeros(zeroPoint); use symmetric scales",
                )
        qtype = self.qtype(node)
        if qtype in (TensorProto.UINT8, TensorProto.UINT4):
            self.error(
                "signed-int",
                node,
                f"{_TYPE_NAMES.get(qtype)} Q/DQ: TensorRT takes INT8/INT4 (signed, zero-point 0) only",
            )
        block = attr(node, "block_size", 0) or 0
        is_const_input = x in self.consts
        if scale.size > 1 and not is_const_input:
            self.error(
                "per-channel-activation",
                node,
                f"per-channel/blocked scale ({scale.size} values) on a "
                "non-constant input: TensorRT supports per-channel scales on constant weights only; "
                "activations must be per-tensor",
            )
        if qtype == TensorProto.INT4 and node.op_type == "QuantizeLinear" and not is_const_input:
            self.error(
                "int4-activation",
                node,
                "INT4 activations do not exist in TensorRT (INT4 is weight-only, "
                "W4A16); quantize activations to INT8",
            )
        if block:
            if qtype != TensorProto.INT4:
                self.error(
                    "block-type",
                    node,
                    f"block_size {block} on {_TYPE_NAMES.get(qtype, 'non-INT4')} data: "
                    "TensorRT supports block quantization only for INT4 weights",
                )
            elif block not in INT4_BLOCKS:
                self.error(
                    "block-size", node, f"block_size {block}: TensorRT INT4 supports blocks of 64 or 128"
                )
            self.check_block_axis(node, block)
        elif qtype == TensorProto.INT4:
            self.warn(
                "int4-unblocked", node, "INT4 weight without block_size: TensorRT's INT4 GEMMs are block-wise"
            )

    def check_block_axis(self, node: onnx.NodeProto, block: int) -> None:
        axis = attr(node, "axis", 1)
        for user in self.cons.get(node.output[0], []):
            if user.op_type == "MatMul" and user.input[1] == node.output[0] and axis != 0:
                self.error(
                    "block-axis",
                    node,
                    f"blocks along axis {axis} of a MatMul weight (K, N): "
                    "TensorRT needs them on the input-channel axis 0",
                )
            if user.op_type == "Gemm" and user.input[1] == node.output[0]:
                want = 1 if attr(user, "transB", 0) else 0
                if axis != want:
                    self.error(
                        "block-axis",
                        node,
                        f"blocks along axis {axis}; Gemm {_name(user)} needs axis {want} "
                        "(the input-channel dimension)",
                    )

    def check_q_pairing(self, node: onnx.NodeProto) -> None:
        users = self.cons.get(node.output[0], [])
        if any(u.op_type != "DequantizeLinear" for u in users) or not users:
            self.error(
                "q-without-dq",
                node,
                "QuantizeLinear output does not go (only) to DequantizeLinear: "
                "TensorRT fuses Q only with a following DQ",
            )
            return
        for dq in users:
            same_scale = self._same_const(node.input[1], dq.input[1])
            zq = node.input[2] if len(node.input) > 2 else ""
            zd = dq.input[2] if len(dq.input) > 2 else ""
            if not same_scale or not self._same_const(zq, zd):
                self.error(
                    "requantize",
                    dq,
                    f"scale/zero-point differ from its QuantizeLinear {_name(node)}: "
                    "a requantization TensorRT cannot fuse",
                )
            per_channel = node.input[1] in self.consts and np.size(to_array(self.consts[node.input[1]])) > 1
            if per_channel and attr(node, "axis", 1) != attr(dq, "axis", 1):
                self.error("requantize", dq, f"axis differs from its QuantizeLinear {_name(node)}")

    def _same_const(self, a: str, b: str) -> bool:
        if a == b:
            return True
        if not a or not b or a not in self.consts or b not in self.consts:
            return False
        va, vb = to_array(self.consts[a]), to_array(self.consts[b])
        return va.shape == vb.shape and bool(np.array_equal(va, vb))

    def check_dq_use(self, node: onnx.NodeProto) -> None:
        src = node.input[0]
        if src in self.consts:
            return  # a weight: checked with its GEMM
        prod = self.prod.get(src)
        if prod is None or prod.op_type != "QuantizeLinear":
            self.error(
                "dq-without-q",
                node,
                "DequantizeLinear of a non-constant tensor that no QuantizeLinear "
                "produced: TensorRT needs Q→DQ pairs on activations",
            )
            return
        users = self.cons.get(node.output[0], [])
        bad = sorted({u.op_type for u in users if u.op_type not in FUSABLE_CONSUMERS})
        if bad:
            self.warn(
                "unfused-qdq",
                node,
                f"Q/DQ feeds {', '.join(bad)}: TensorRT cannot fuse it there and "
                "runs it as a separate (de)quantize; place Q/DQ on GEMM inputs",
            )

    def _dq_source(self, name: str) -> tuple[onnx.NodeProto | None, bool]:
        """The DQ behind a GEMM input (through layout-only ops), and whether it is a weight."""
        seen = 0
        node = self.prod.get(name)
        while (
            node is not None
            and node.op_type in ("Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze")
            and seen < 4
        ):
            node = self.prod.get(node.input[0])
            seen += 1
        if node is None or node.op_type != "DequantizeLinear":
            return None, name in self.consts
        return node, node.input[0] in self.consts

    def check_gemm(self, node: onnx.NodeProto) -> None:
        a, b = node.input[0], node.input[1]
        dq_a, _ = self._dq_source(a)
        dq_b, b_is_weight = self._dq_source(b)
        b_float_const = dq_b is None and b in self.consts
        if dq_b is not None and b_is_weight and dq_a is None:
            wtype = self.qtype(dq_b)
            if wtype == TensorProto.INT8:
                self.warn(
                    "weight-only-int8",
                    node,
                    "INT8 weight but float activation: TensorRT dequantizes the "
                    "weight and runs the GEMM in float (add activation Q/DQ, or use INT4 W4A16)",
                )
        elif dq_a is not None and b_float_const:
            self.warn(
                "float-weight",
                node,
                "activation is quantized but the weight is float: no INT8 GEMM; "
                "quantize the weight per channel",
            )
        elif dq_a is not None and dq_b is None and not b_float_const:
            self.warn("one-sided", node, "only one input of this MatMul has Q/DQ: TensorRT runs it in float")
        elif dq_b is not None and not b_is_weight and dq_a is None:
            self.warn("one-sided", node, "only one input of this MatMul has Q/DQ: TensorRT runs it in float")


def load_onnx_file(path: str | Path) -> onnx.ModelProto:
    """``path`` as an ONNX model, or a one-line :class:`UserInputError` naming the file.

    Protobuf parses an empty file (and some other bytes) as an empty model without complaint: a
    model with neither a graph node nor an opset is refused here rather than linted as "opset 0".
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path} does not exist (or is not a file)")
    size = path.stat().st_size
    if size == 0:
        raise UserInputError(f"{path} is empty (0 bytes): not an ONNX model; re-export it")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf parse errors: the file's fault
        raise UserInputError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None
    if not model.opset_import and not model.graph.node:
        raise UserInputError(f"{path} is not an ONNX model (no graph, no opset in its {size} bytes)")
    return model


def lint_model(model: onnx.ModelProto | str | Path) -> LintReport:
    """Check ``model`` (a ModelProto or a path: see :func:`load_onnx_file`) against TensorRT's Q/DQ rules."""
    if not isinstance(model, onnx.ModelProto):
        model = load_onnx_file(model)
    return _Linter(model).run()


def format_report(report: LintReport, source: str = "model") -> str:
    """Human-readable lint verdict, one line per finding."""
    lines = [
        f"{source}: {'PASS' if report.passed else 'FAIL'} — {len(report.violations)} violation(s), "
        f"{len(report.warnings)} warning(s); {report.stats.get('quantize_linear', 0)} Q / "
        f"{report.stats.get('dequantize_linear', 0)} DQ nodes, opset {report.stats.get('opset')}"
    ]
    lines += [f"  error   {v}" for v in report.violations]
    lines += [f"  warning {v}" for v in report.warnings]
    return "\n".join(lines)
