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


def toposort(graph: onnx.GraphProto) -> None:
    """Order nodes so every input is produced before use (in place)."""
    available = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError(f"graph has a cycle or a dangling input near {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads and initializers no node reads (in place)."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for node in graph.node for i in node.input} | outputs
        alive = [node for node in graph.node if any(o in read for o in node.output if o)]
        if len(alive) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(alive)
    read = {i for node in graph.node for i in node.input} | outputs
    kept = [t for t in graph.initializer if t.name in read]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


# --- attention fusion for ONNX Runtime -------------------------------------------------------------

# Ops the scale sub-graphs of an exported attention are made of (F.scaled_dot_product_attention
# traces to Shape → Slice → Cast → Sqrt → Div → Sqrt → Mul on q and on kᵀ; timm's explicit path to
# one Mul by a constant). Anything else and the attention is left alone.
_SCALAR_OPS = {
    "Shape", "Slice", "Gather", "Cast", "Sqrt", "Div", "Mul", "Add", "Sub", "Reciprocal", "Pow",
    "Unsqueeze", "Squeeze", "Concat", "Identity", "Constant", "Reshape",
}  # fmt: skip


def _eval_const(name: str, consts: dict, prod: dict, shapes: dict[str, tuple[int, ...]], depth: int = 0):
    """Value of ``name`` computed from constants and the given tensor shapes, or None."""
    if name in consts:
        return to_array(consts[name])
    node = prod.get(name)
    if node is None or node.op_type not in _SCALAR_OPS or depth > 32:
        return None
    if node.op_type == "Shape":
        shape = shapes.get(node.input[0])
        if shape is None:
            return None
        arr = np.array(shape, np.int64)
        start, end = attr(node, "start", 0), attr(node, "end", None)
        return arr[start:end]
    ins = []
    for i in node.input:
        if not i:
            ins.append(None)
            continue
        v = _eval_const(i, consts, prod, shapes, depth + 1)
        if v is None:
            return None
        ins.append(v)
    op = node.op_type
    if op == "Identity":
        return ins[0]
    if op == "Cast":
        return ins[0].astype(helper.tensor_dtype_to_np_dtype(attr(node, "to")))
    if op in ("Sqrt", "Reciprocal"):
        return np.sqrt(ins[0]) if op == "Sqrt" else np.reciprocal(ins[0])
    if op in ("Div", "Mul", "Add", "Sub", "Pow"):
        a, b = ins
        fn = {"Div": np.divide, "Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Pow": np.power}[op]
        if op == "Div" and a.dtype.kind in "iu":
            return (a // b).astype(a.dtype)
        return fn(a, b).astype(np.result_type(a, b))
    if op == "Slice":
        data, starts, ends = ins[0], ins[1], ins[2]
        axes = ins[3] if len(ins) > 3 and ins[3] is not None else np.arange(len(starts))
        steps = ins[4] if len(ins) > 4 and ins[4] is not None else np.ones(len(starts), np.int64)
        index = [slice(None)] * data.ndim
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            index[int(a)] = slice(int(s), int(e), int(st))
        return data[tuple(index)]
    if op == "Gather":
        return np.take(ins[0], ins[1], axis=attr(node, "axis", 0))
    if op == "Unsqueeze":
        axes = ins[1] if len(ins) > 1 else attr(node, "axes")
        out = ins[0]
        for a in sorted(int(x) % (out.ndim + len(axes)) for x in np.atleast_1d(axes)):
            out = np.expand_dims(out, a)
        return out
    if op == "Squeeze":
        axes = ins[1] if len(ins) > 1 else attr(node, "axes")
        return np.squeeze(ins[0], axis=None if axes is None else tuple(int(a) for a in np.atleast_1d(axes)))
    if op == "Concat":
        return np.concatenate(ins, axis=attr(node, "axis", 0))
    if op == "Reshape":
        return ins[0].reshape([int(d) for d in ins[1]])
    return None


def _shape_tail(name: str, consts: dict, prod: dict) -> list[int | None] | None:
    """A Reshape target as a list with None for the entries only known at run time."""
    if name in consts:
        return [int(v) for v in to_array(consts[name]).ravel()]
    node = prod.get(name)
    if node is None or node.op_type != "Concat":
        return None
    out: list[int | None] = []
    for i in node.input:
        if i in consts:
            out += [int(v) for v in to_array(consts[i]).ravel()]
        else:
            out.append(None)  # one runtime entry per Unsqueeze'd Gather(Shape) in torch exports
    return out


def _scalar_path(name: str, consts: dict, prod: dict, depth: int = 0) -> bool:
    """True when ``name`` is computed from constants and tensor shapes only (no tensor data)."""
    if name in consts:
        return True
    node = prod.get(name)
    if node is None or node.op_type not in _SCALAR_OPS or depth > 32:
        return False
    if node.op_type == "Shape":
        return True
    return all(_scalar_path(i, consts, prod, depth + 1) for i in node.input if i)


def _scaled_chain(name: str, consts: dict, prod: dict, transpose_perm: list[int] | None):
    """Walk up from ``name`` through Mul/Div by scalars (and one Transpose with ``transpose_perm``).

    Returns ``(source, steps)``: ``steps`` lists ``(node, data_input, scalar_input_or_None)`` from
    ``name`` upwards; None when another op is met before the source or the Transpose is missing.
    """
    steps: list[tuple[onnx.NodeProto, str, str | None]] = []
    seen_transpose = transpose_perm is None
    while True:
        node = prod.get(name)
        if node is not None and node.op_type in ("Mul", "Div") and len(node.input) == 2:
            a, b = node.input
            a_s, b_s = _scalar_path(a, consts, prod), _scalar_path(b, consts, prod)
            if a_s == b_s or (node.op_type == "Div" and a_s):
                return None  # not (data op scalar), or scalar / data
            data, scalar = (b, a) if a_s else (a, b)
            steps.append((node, data, scalar))
            name = data
            continue
        if node is not None and node.op_type == "Transpose" and not seen_transpose:
            if list(attr(node, "perm", [])) != transpose_perm:
                return None
            steps.append((node, node.input[0], None))
            seen_transpose = True
            name = node.input[0]
            continue
        return (name, steps) if seen_transpose else None


def _unbound(name: str, consts: dict, prod: dict):
    """``(index, qkv, nodes)`` when ``name`` is q/k/v (index 0/1/2) unbound from ``qkv`` along axis 0."""
    node = prod.get(name)
    if node is None:
        return None
    if node.op_type == "Squeeze":
        if len(node.input) > 1:
            axes = to_array(consts[node.input[1]]) if node.input[1] in consts else None
        else:
            axes = attr(node, "axes")
        split = prod.get(node.input[0])
        if axes is None or [int(a) for a in np.atleast_1d(axes)] != [0] or split is None:
            return None
        if split.op_type != "Split" or attr(split, "axis", 0) != 0 or len(split.output) != 3:
            return None
        if len(split.input) > 1 and split.input[1]:
            sizes = to_array(consts[split.input[1]]) if split.input[1] in consts else None
            if sizes is None or [int(v) for v in sizes] != [1, 1, 1]:
                return None
        return list(split.output).index(node.input[0]), split.input[0], [node, split]
    if node.op_type == "Gather" and attr(node, "axis", 0) == 0 and node.input[1] in consts:
        idx = to_array(consts[node.input[1]])
        if idx.ndim == 0 and int(idx) in (0, 1, 2):
            return int(idx), node.input[0], [node]
    return None


def _dims_map(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name → inferred dims (None where symbolic); empty when shape inference fails."""
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # shape inference is a safety check only: without shapes nothing is fused
        return {}
    return {
        vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output)
        if vi.type.tensor_type.HasField("shape")
    }


def fuse_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold each exported multi-head self-attention into ``com.microsoft::MultiHeadAttention``.

    Matches the float attention timm's ``Attention`` traces to (fused SDPA or the explicit path)::

        X (B,S,3D) [= Add(Y, bias)] → Reshape(B,S,3,H,hd) → Transpose(2,0,3,1,4) → unbind → q, k, v
        Softmax((q·a) @ (k·b)ᵀ) @ v → Transpose(0,2,1,3) → Reshape(B,S,D)

    and rewrites it as ``Split(Y, 3 × D) → MultiHeadAttention(q, k, v[, bias], num_heads=H,
    scale=a·b)``: the same float math in one ONNX Runtime kernel instead of ~25 small ops (shape
    arithmetic, transposes, split/squeeze, two scale Muls, two MatMuls, Softmax). Scales are
    evaluated from the graph (the SDPA export computes them from ``Shape(q)`` at run time) for two
    probe (batch, tokens) pairs and must not depend on them. Attentions whose matmuls carry Q/DQ
    (schemes that quantize them) do not match and stay as they are. The result uses an ONNX
    Runtime contrib op: it is for ORT sessions only, never for TensorRT. Returns a new model and
    the number of attentions fused (the input model itself when none).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    dims = _dims_map(out)
    consts = constant_map(graph)
    prod = producers(graph)
    users = consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    new_nodes: list[onnx.NodeProto] = []
    removed: set[int] = set()
    fused = 0

    def sole_user(name: str, op: str):
        found = users.get(name, [])
        if name in graph_outputs or len(found) != 1 or found[0].op_type != op:
            return None
        return found[0]

    for softmax in list(graph.node):
        if softmax.op_type != "Softmax" or attr(softmax, "axis", -1) not in (-1, 3):
            continue
        mm1 = prod.get(softmax.input[0])
        mm2 = sole_user(softmax.output[0], "MatMul")
        if mm1 is None or mm1.op_type != "MatMul" or sole_user(mm1.output[0], "Softmax") is None:
            continue
        if mm2 is None or mm2.input[0] != softmax.output[0]:
            continue
        t_out = sole_user(mm2.output[0], "Transpose")
        if t_out is None or list(attr(t_out, "perm", [])) != [0, 2, 1, 3]:
            continue
        r_out = sole_user(t_out.output[0], "Reshape")
        if r_out is None:
            continue
        q_chain = _scaled_chain(mm1.input[0], consts, prod, None)
        k_chain = _scaled_chain(mm1.input[1], consts, prod, [0, 1, 3, 2])
        if q_chain is None or k_chain is None:
            continue
        found = [_unbound(n, consts, prod) for n in (q_chain[0], k_chain[0], mm2.input[1])]
        if None in found or [f[0] for f in found] != [0, 1, 2] or len({f[1] for f in found}) != 1:
            continue
        t_in = prod.get(found[0][1])
        if t_in is None or t_in.op_type != "Transpose" or list(attr(t_in, "perm", [])) != [2, 0, 3, 1, 4]:
            continue
        r_in = prod.get(t_in.input[0])
        if r_in is None or r_in.op_type != "Reshape" or sole_user(r_in.output[0], "Transpose") is None:
            continue
        tail_in = _shape_tail(r_in.input[1], consts, prod)
        tail_out = _shape_tail(r_out.input[1], consts, prod)
        if tail_in is None or len(tail_in) != 5 or tail_out is None or len(tail_out) != 3:
            continue
        three, num_heads, head_dim = tail_in[2:]
        if three != 3 or not num_heads or not head_dim or tail_out[2] != num_heads * head_dim:
            continue
        x = r_in.input[0]
        x_dims, out_dims = dims.get(x), dims.get(r_out.output[0])
        if x_dims is None or len(x_dims) != 3 or out_dims is None or len(out_dims) != 3:
            continue  # MultiHeadAttention wants (B, S, D) in and out
        if x_dims[2] not in (None, 3 * num_heads * head_dim) or x in graph_outputs:
            continue
        # Shapes of the q/k tensors the scale sub-graphs may read: (b, H, s, hd), kᵀ (b, H, hd, s).
        after_t = False
        bnhs, bnsh_k = [mm1.input[1]], []
        for node, data, _ in k_chain[1]:
            after_t = after_t or node.op_type == "Transpose"
            (bnsh_k if after_t else bnhs).append(data)
        bnsh = [q_chain[0], mm2.input[1], mm1.input[0], *[s[1] for s in q_chain[1]], *bnsh_k]
        scale_values = []
        for b, s in ((1, 7), (3, 11)):
            shapes = {n: (b, num_heads, s, head_dim) for n in bnsh}
            shapes |= {n: (b, num_heads, head_dim, s) for n in bnhs}
            scale = 1.0
            for node, _, scalar in q_chain[1] + k_chain[1]:
                if scalar is None:
                    continue
                v = _eval_const(scalar, consts, prod, shapes)
                if v is None or v.size != 1:
                    scale = None
                    break
                v = float(np.asarray(v, np.float64).ravel()[0])
                scale = scale * v if node.op_type == "Mul" else scale / v
            scale_values.append(scale)
        if None in scale_values or not np.isfinite(scale_values[0]) or scale_values[0] <= 0:
            continue
        if abs(scale_values[0] - scale_values[1]) > 1e-6 * scale_values[0]:
            continue  # depends on batch or sequence length: not a MultiHeadAttention scale
        chain = [softmax, mm1, mm2, t_out, r_out, r_in, t_in]
        chain += [s[0] for s in q_chain[1] + k_chain[1]] + [n for f in found for n in f[2]]
        internal = {o for n in chain for o in n.output} - {r_out.output[0]}
        chain_ids = {id(n) for n in chain}
        # Every internal tensor feeds the chain only, or Shape ops whose results feed nothing but
        # the scale sub-graphs (pure shape arithmetic that dies with the chain).
        if internal & graph_outputs or any(
            u.op_type != "Shape" and id(u) not in chain_ids for t in internal for u in users.get(t, [])
        ):
            continue
        frontier = [u for t in internal for u in users.get(t, []) if u.op_type == "Shape"]
        shape_side: dict[int, onnx.NodeProto] = {}
        while frontier:
            node = frontier.pop()
            if id(node) in chain_ids or id(node) in shape_side:
                continue
            shape_side[id(node)] = node
            frontier += [u for o in node.output for u in users.get(o, [])]
        if any(
            n.op_type not in _SCALAR_OPS
            or set(n.output) & graph_outputs
            or not all(_scalar_path(o, consts, prod) for o in n.output)
            for n in shape_side.values()
        ):
            continue
        dim = int(num_heads * head_dim)
        bias_input: list[str] = []
        add = prod.get(x)
        if add is not None and add.op_type == "Add" and len(users.get(x, [])) == 1:
            for data, bias in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
                if bias in consts and to_array(consts[bias]).shape == (3 * dim,):
                    x, bias_input = data, [bias]  # MultiHeadAttention adds it per q/k/v slice
                    chain.append(add)
                    break
        tag = (softmax.name.rsplit("/", 1)[0] if "/" in softmax.name else f"/{softmax.name}") + "/mha"
        qkv = [f"{tag}/q", f"{tag}/k", f"{tag}/v"]
        if opset_of(out) >= 13:
            sizes = f"{tag}/split_sizes"
            graph.initializer.append(numpy_helper.from_array(np.array([dim] * 3, np.int64), sizes))
            new_nodes.append(helper.make_node("Split", [x, sizes], qkv, axis=-1, name=f"{tag}/split"))
        else:
            new_nodes.append(
                helper.make_node("Split", [x], qkv, axis=-1, split=[dim] * 3, name=f"{tag}/split")
            )
        new_nodes.append(
            helper.make_node(
                "MultiHeadAttention",
                qkv + bias_input,
                [r_out.output[0]],
                domain="com.microsoft",
                num_heads=int(num_heads),
                scale=float(scale_values[0]),
                name=tag,
            )
        )
        removed.update(id(n) for n in chain)
        fused += 1
    if not fused:
        return model, 0
    kept = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(kept + new_nodes)
    prune(graph)
    toposort(graph)
    if not any(imp.domain == "com.microsoft" for imp in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out, fused


def unsigned_int8(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Shift every INT8 Q/DQ pair and INT8 weight code to UINT8 with zero point +128, in place.

    The codes and zero points move together (``q + 128`` against ``zp + 128``), so every
    dequantized value and every clamp is the same: the graph computes exactly what it did. Why:
    ONNX Runtime's CPU integer GEMM on x86 without VNNI (AVX2, AVX-512 before Cascade Lake) feeds
    signed weights through ``vpmaddubsw``, whose int16 pair sums saturate (ORT documents it for
    its own quantizer as the "U8S8 saturation" that ``reduce_range`` works around). On a
    2-core AMD EPYC (AVX2) the tiny test ViT's w8a8 logits came out at cosine 0.9917 to the
    fake-quant model, 92% argmax agreement (exact: 1.0 and 100% with ORT's integer fusions off).
    UINT8 × UINT8 runs through a non-saturating kernel. ``reduce_range`` (7-bit weights) would
    change the model; this does not. Returns the model and how many tensors were shifted (0 when
    a Q output feeds anything but a DequantizeLinear: then nothing is touched)."""
    graph = model.graph
    consts = constant_map(graph)
    users = consumers(graph)
    prod = producers(graph)
    shift: dict[int, onnx.TensorProto] = {}
    codes_out: list[str] = []  # the activation codes, whose recorded type changes with them
    for node in graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 3 or not node.input[2]:
            continue  # no zero point: UINT8 already
        zp = consts.get(node.input[2])
        if zp is None or zp.data_type != TensorProto.INT8:
            continue
        if node.op_type == "QuantizeLinear":
            if any(u.op_type != "DequantizeLinear" for u in users.get(node.output[0], [])):
                return model, 0
            codes_out.append(node.output[0])
        elif (codes := consts.get(node.input[0])) is not None:
            if codes.data_type != TensorProto.INT8:
                continue
            shift[id(codes)] = codes
        else:  # an activation's DQ: its Q must shift with it
            q = prod.get(node.input[0])
            qzp = consts.get(q.input[2]) if q is not None and len(q.input) > 2 else None
            if q is None or q.op_type != "QuantizeLinear" or qzp is None or qzp.data_type != TensorProto.INT8:
                return model, 0
        shift[id(zp)] = zp
    for tensor in shift.values():
        values = numpy_helper.to_array(tensor).astype(np.int16) + 128
        tensor.CopyFrom(numpy_helper.from_array(values.astype(np.uint8), tensor.name))
    codes = set(codes_out)
    for info in graph.value_info:  # the exporter's recorded types of the codes
        if info.name in codes and info.type.tensor_type.elem_type == TensorProto.INT8:
            info.type.tensor_type.elem_type = TensorProto.UINT8
    return model, len(shift)
