"""Small ONNX graph helpers: constant lookup, producer/consumer maps, INT4 tensors, FP16, opset.

Plain ``onnx`` protobuf is enough for what the exporter and the linter need; every helper here is
a pure function over a ``ModelProto``/``GraphProto`` so they stay easy to test.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset version the model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def constant_map(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Tensor name → TensorProto for everything constant: initializers, Constant nodes, and
    Identity nodes over either (the TorchScript exporter emits those for shared constants)."""
    consts: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = attr.t
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            if node.op_type == "Identity" and node.input[0] in consts and node.output[0] not in consts:
                consts[node.output[0]] = consts[node.input[0]]
                changed = True
    return consts


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name → the node that produces it."""
    return {out: node for node in graph.node for out in node.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name → the nodes that read it."""
    found: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                found[name].append(node)
    return found


def attr(node: onnx.NodeProto, name: str, default=None):
    """A node attribute's value, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """TensorProto → numpy (INT4/UINT4 unpacked to int8/uint8 values)."""
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        arr = numpy_helper.to_array(tensor)
        return np.asarray(arr).astype(np.int8 if tensor.data_type == TensorProto.INT4 else np.uint8)
    return numpy_helper.to_array(tensor)


def int4_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer (packed two per byte, as opset 21 defines) from integer values."""
    values = np.asarray(values)
    if values.size and (values.min() < -8 or values.max() > 7):
        raise ValueError(f"{name}: values outside the INT4 range -8..7")
    return helper.make_tensor(
        name, TensorProto.INT4, list(values.shape), values.astype(np.int32).ravel().tolist()
    )


def set_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """Raise the default-domain opset to ``version`` (ONNX's version converter, else a plain bump).

    Every op the ViT exports keeps its semantics from 17 to 21 (only types and Q/DQ attributes
    were added), so a plain bump is a safe fallback when the converter lacks an adapter.
    """
    if opset_of(model) >= version:
        return model
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(model, version)
    except Exception:  # the converter has no adapter for some op: bump directly
        converted = onnx.ModelProto()
        converted.CopyFrom(model)
        for imp in converted.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = version
    converted.ir_version = max(converted.ir_version, 10 if version >= 21 else 9)
    return converted


_FLOAT_ATTR_OPS = {"Cast": "to", "ConstantOfShape": None, "Constant": None}


def convert_to_fp16(model: onnx.ModelProto, keep_io_fp32: bool = True) -> onnx.ModelProto:
    """Everything float in FP16 (initializers, constants, casts, Q/DQ scales), FP32 graph I/O.

    TensorRT 11 is strongly typed: the unquantized layers (LayerNorm, Softmax, GELU, residual
    adds) run in FP16 only if the ONNX itself is FP16. Q/DQ with FP16 scales needs opset ≥ 19.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph

    def half(t: onnx.TensorProto) -> onnx.TensorProto:
        if t.data_type != TensorProto.FLOAT:
            return t
        arr = numpy_helper.to_array(t)
        return numpy_helper.from_array(np.clip(arr, -65504, 65504).astype(np.float16), t.name)

    for i, t in enumerate(list(graph.initializer)):
        graph.initializer[i].CopyFrom(half(t))
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(half(a.t))
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
    del graph.value_info[:]
    if keep_io_fp32:
        new_nodes = []
        for inp in graph.input:
            if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            half_name = inp.name + "_fp16"
            for node in graph.node:
                for k, name in enumerate(node.input):
                    if name == inp.name:
                        node.input[k] = half_name
            new_nodes.append(
                helper.make_node(
                    "Cast", [inp.name], [half_name], to=TensorProto.FLOAT16, name=f"/input_cast/{inp.name}"
                )
            )
        tail = []
        for outp in graph.output:
            if outp.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            half_name = outp.name + "_fp16"
            for node in graph.node:
                for k, name in enumerate(node.output):
                    if name == outp.name:
                        node.output[k] = half_name
            tail.append(
                helper.make_node(
                    "Cast", [half_name], [outp.name], to=TensorProto.FLOAT, name=f"/output_cast/{outp.name}"
                )
            )
        nodes = new_nodes + list(graph.node) + tail
        del graph.node[:]
        graph.node.extend(nodes)
    else:
        for vi in list(graph.input) + list(graph.output):
            if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return out


def op_census(model: onnx.ModelProto) -> dict[str, int]:
    """op type (``domain::Op`` outside the default domain) → count, sorted by name."""
    counts: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] += 1
    return dict(sorted(counts.items()))
