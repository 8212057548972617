"""Fake-quant PyTorch model → TensorRT-ready QDQ ONNX.

1. Trace with the TorchScript exporter (``dynamo=False``; dynamic batch axis). Activation
   quantizers trace to ``QuantizeLinear → DequantizeLinear`` (4-bit ones to ``Clip → Q → DQ`` in
   INT8 containers); weight quantizers are switched off for the trace and every quantized
   weight is a plain constant holding its fake-quant value.
2. Each such constant is found by value and replaced by integer codes + ``DequantizeLinear``:
   INT8 ``(out, in)`` per-channel (axis 0) → ``Transpose`` → ``MatMul`` (the pattern TensorRT and
   ONNX Runtime fuse), or for W4A16 an INT4 ``(in, out)`` initializer with a blocked
   ``DequantizeLinear`` (opset 21, ``block_size`` on the input dim) feeding the ``MatMul``.
3. Optional FP16 for everything unquantized (FP32 graph I/O), metadata, ``onnx.checker`` full
   check, the TensorRT-rules lint, and an atomic write.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from sardfq_export.exporters.lint import LintReport, lint_model
from sardfq_export.exporters.onnx_graph import consumers, convert_to_fp16, int4_tensor, set_opset, toposort
from sardfq_export.exporters.weights import (
    WeightPlan,
    float_weights_for_export,
    plan_weight,
    quantized_linears,
)

from sardfq_export.core.errors import UserInputError
from sardfq_export.core.io import atomic_path

TRACE_OPSET = 17  # ≥ 17 keeps LayerNorm one op; the TorchScript exporter goes up to 20
INT4_OPSET = 21  # INT4 initializers and blocked DequantizeLinear
FP16_OPSET = 19  # Q/DQ with FP16 scales


@dataclass(frozen=True)
class ExportConfig:
    """How to write the ONNX (``None`` means the default)."""

    opset: int | None = None  # None: 17, 19 with fp16, 21 with INT4 weights
    fp16: bool = False  # unquantized ops in FP16, graph I/O stays FP32 (TensorRT 11 speed)
    dynamic_batch: bool = True  # batch axis symbolic ("batch")
    input_name: str = "input"
    output_name: str = "logits"
    lint: bool = True  # run the TensorRT-rules linter on the result
    strict_lint: bool = False  # a lint violation raises instead of being reported


@dataclass
class ExportResult:
    """What an export wrote and what it found."""

    path: Path
    opset: int
    scheme: str
    weights: dict[str, int] = field(default_factory=dict)  # storage kind → count
    lint: LintReport | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {
            "path": str(self.path),
            "opset": self.opset,
            "scheme": self.scheme,
            "weights": self.weights,
            "metadata": self.metadata,
        }
        if self.lint is not None:
            out["lint"] = self.lint.to_dict()
        return out


def _scheme_info(qmodel: nn.Module) -> tuple[str, dict]:
    scheme = getattr(qmodel, "scheme", None)
    if scheme is None:
        return "none", {}
    data = scheme.to_dict() if hasattr(scheme, "to_dict") else {"name": str(scheme)}
    return str(getattr(scheme, "name", data.get("name", "unknown"))), data


def check_exportable(qmodel: nn.Module) -> None:
    """Refuse research-only schemes and quantizers with no ONNX form (UserInputError)."""
    scheme = getattr(qmodel, "scheme", None)
    if scheme is not None and hasattr(scheme, "assert_exportable"):
        scheme.assert_exportable()  # the calibrators' own list of reasons
    if scheme is not None and not getattr(scheme, "exportable", True):
        raise UserInputError(
            f"scheme {scheme.name!r} is research-only and cannot be exported to ONNX/TensorRT: "
            "use w8a8, w4a16, w4a8 or w4a4"
        )
    for name, mod in qmodel.named_modules():
        if getattr(mod, "enabled", False) and getattr(mod, "kind", "int") != "int" and hasattr(mod, "scale"):
            raise UserInputError(
                f"quantizer {name} uses a {mod.kind} grid, which has no ONNX Q/DQ form: "
                "export a scheme with integer grids only"
            )


def _match_key(arr: np.ndarray) -> tuple:
    return arr.shape, hashlib.sha1(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).hexdigest()


def _rewrite_weights(model: onnx.ModelProto, plans: list[WeightPlan]) -> dict[str, int]:
    """Replace every planned weight constant by codes + DequantizeLinear. Returns storage counts."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    by_value: dict[tuple, list[str]] = {}
    for t in graph.initializer:
        if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2:
            by_value.setdefault(_match_key(numpy_helper.to_array(t)), []).append(t.name)
    users = consumers(graph)
    counts: dict[str, int] = {}
    new_nodes: list[onnx.NodeProto] = []
    replaced: set[str] = set()
    for plan in plans:
        tag = plan.module.replace(".", "/")
        found = [(n, False) for n in by_value.get(_match_key(plan.fq_weight), [])]
        if plan.fq_weight.ndim == 2:
            found += [(n, True) for n in by_value.get(_match_key(plan.fq_weight.T), [])]
        if not found:
            raise RuntimeError(f"export: the weight of {plan.module} was not found in the traced graph")
        if len(found) > 1:
            raise RuntimeError(f"export: the weight of {plan.module} appears {len(found)} times in the graph")
        init_name, transposed = found[0]
        replaced.add(init_name)
        if plan.bits == 4 and plan.block:
            kind = _int4_blocked(plan, init_name, transposed, graph, users, new_nodes, inits, tag)
        else:
            kind = _int8(plan, init_name, transposed, graph, new_nodes, tag)
        counts[kind] = counts.get(kind, 0) + 1
    kept = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.node.extend(new_nodes)
    toposort(graph)  # the new DQ nodes were appended
    return counts


def _int8(
    plan: WeightPlan, init_name: str, transposed: bool, graph: onnx.GraphProto, new_nodes: list, tag: str
) -> str:
    """INT8 codes (out, in) → DequantizeLinear(axis 0) [→ Transpose where the MatMul wants (in, out)]."""
    codes, scale = f"{tag}/weight_int8", f"{tag}/weight_scale"
    zp = f"{tag}/weight_zero_point"
    dq_out = f"{tag}/weight_dq"
    graph.initializer.extend(
        [
            numpy_helper.from_array(plan.codes.astype(np.int8), codes),
            numpy_helper.from_array(plan.scale.astype(np.float32), scale),
            numpy_helper.from_array(np.zeros(plan.scale.shape, np.int8), zp),
        ]
    )
    kwargs = {"axis": 0} if plan.scale.ndim == 1 else {}
    if plan.block:  # an INT8 container with block scales: only valid from opset 21 (linted)
        kwargs = {"axis": 1, "block_size": plan.block}
    new_nodes.append(
        helper.make_node("DequantizeLinear", [codes, scale, zp], [dq_out], name=f"/{tag}/weight_dq", **kwargs)
    )
    final = dq_out
    if transposed:
        final = f"{tag}/weight_dq_t"
        new_nodes.append(
            helper.make_node("Transpose", [dq_out], [final], perm=[1, 0], name=f"/{tag}/weight_transpose")
        )
    _rename_input(graph, init_name, final)
    if plan.nested_block:
        return f"int{plan.bits}-block{plan.nested_block}-in-int8-{plan.granularity}"
    return f"int{plan.bits}-in-int8-{plan.granularity}" if plan.bits < 8 else f"int8-{plan.granularity}"


def _int4_blocked(
    plan: WeightPlan,
    init_name: str,
    transposed: bool,
    graph: onnx.GraphProto,
    users: dict,
    new_nodes: list,
    inits: dict,
    tag: str,
) -> str:
    """INT4 codes (in, out) → DequantizeLinear(axis 0, block_size) → MatMul (ORT: MatMulNBits)."""
    codes, scale, zp = f"{tag}/weight_int4", f"{tag}/weight_scale", f"{tag}/weight_zero_point"
    dq_out = f"{tag}/weight_dq"
    graph.initializer.extend(
        [
            int4_tensor(codes, plan.codes.T),
            numpy_helper.from_array(np.ascontiguousarray(plan.scale.T).astype(np.float32), scale),
            int4_tensor(zp, np.zeros(plan.scale.T.shape, np.int8)),
        ]
    )
    new_nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [codes, scale, zp],
            [dq_out],
            axis=0,
            block_size=plan.block,
            name=f"/{tag}/weight_dq",
        )
    )
    if transposed:  # MatMul(x, W^T): the DQ output is W^T already
        _rename_input(graph, init_name, dq_out)
        return "int4-blocked"
    # (out, in) constant: a Gemm with transB=1 (2-D input). Rewrite it as MatMul (+ Add).
    for node in users.get(init_name, []):
        if node.op_type != "Gemm" or node.input[1] != init_name:
            raise RuntimeError(
                f"export: unexpected use of {plan.module}'s weight by {node.op_type} {node.name}"
            )
        alpha, beta = 1.0, 1.0
        for a in node.attribute:
            if a.name == "transA" and a.i:
                raise RuntimeError(f"export: Gemm {node.name} with transA is not supported")
            alpha = a.f if a.name == "alpha" else alpha
            beta = a.f if a.name == "beta" else beta
        if alpha != 1.0 or beta != 1.0:
            raise RuntimeError(f"export: Gemm {node.name} with alpha/beta != 1 is not supported")
        out = node.output[0]
        mm_out = out + "_mm" if len(node.input) > 2 and node.input[2] else out
        inputs = list(node.input)
        node.op_type = "MatMul"
        del node.attribute[:]
        del node.input[:]
        node.input.extend([inputs[0], dq_out])
        if mm_out != out:
            node.output[0] = mm_out
            new_nodes.append(helper.make_node("Add", [mm_out, inputs[2]], [out], name=f"/{tag}/bias_add"))
    return "int4-blocked"


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"torch": torch.__version__, "onnx": onnx.__version__}
    try:
        out["sardfq_export"] = metadata.version("sardfq-export")
    except metadata.PackageNotFoundError:  # running from a source checkout
        out["sardfq_export"] = "source"
    return out


def _trace(
    model: nn.Module, input_size: tuple[int, int, int], opset: int, config: ExportConfig
) -> onnx.ModelProto:
    """``model`` traced by the TorchScript exporter (the settings every export here shares)."""
    import warnings

    device = next(model.parameters()).device
    dummy = torch.zeros(2, *input_size, device=device)
    axes = (
        {config.input_name: {0: "batch"}, config.output_name: {0: "batch"}} if config.dynamic_batch else None
    )
    with tempfile.TemporaryDirectory(prefix="sardfq-export-") as tmp:
        traced = Path(tmp) / "traced.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (dummy,),
                str(traced),
                dynamo=False,
                opset_version=min(opset, 20),
                do_constant_folding=True,
                input_names=[config.input_name],
                output_names=[config.output_name],
                dynamic_axes=axes,
            )
        return onnx.load(str(traced))


def export_float_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: tuple[int, int, int],
    opset: int = TRACE_OPSET,
    fp16: bool = False,
) -> Path:
    """Write the float ``model`` (the timm model, not a fake-quant one) as ONNX at ``path`` (atomically).

    Traced exactly as :func:`export_onnx` traces a fake-quant model (same exporter settings, input
    and output names, dynamic batch), so a runtime runs the same graph without the Q/DQ: the
    float baseline a deployed INT8 model's speed-up is measured against. ``fp16``: everything in
    FP16 with FP32 graph I/O (the TensorRT FP16 baseline; TensorRT builds it strongly typed).
    """
    path = Path(path)
    config = ExportConfig()
    was_training = model.training
    model.eval()
    try:
        onnx_model = _trace(model, input_size, opset, config)
    finally:
        model.train(was_training)
    if fp16:
        onnx_model = convert_to_fp16(onnx_model)
    meta = {
        "sardfq.scheme": "none",
        "sardfq.precision": "fp16" if fp16 else "fp32",
        "sardfq.fp16": str(bool(fp16)).lower(),
        "sardfq.versions": json.dumps(_versions(), sort_keys=True),
        "sardfq.input": json.dumps(
            {"name": config.input_name, "shape": ["batch", *input_size], "dtype": "float32"}
        ),
    }
    del onnx_model.metadata_props[:]
    for key, value in meta.items():
        onnx_model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx_model.producer_name, onnx_model.producer_version = "sardfq-export", _versions()["sardfq_export"]
    onnx.checker.check_model(onnx_model)
    with atomic_path(path) as tmp:
        onnx.save(onnx_model, tmp)
    return path


def export_onnx(
    qmodel: nn.Module,
    path: str | Path,
    input_size: tuple[int, int, int],
    config: ExportConfig = ExportConfig(),
    metadata: dict | None = None,
) -> ExportResult:
    """Write ``qmodel`` (a calibrators fake-quant model) as QDQ ONNX at ``path`` (atomically).

    ``metadata`` (calibration settings, model name ...) goes into ``metadata_props`` next to the
    scheme and tool versions. Raises UserInputError for schemes that cannot be exported.
    """
    check_exportable(qmodel)
    path = Path(path)
    scheme_name, scheme_dict = _scheme_info(qmodel)
    qmodel = qmodel.eval()
    plans = [plan_weight(name, mod) for name, mod in quantized_linears(qmodel)]
    has_int4 = any(p.bits == 4 and p.block for p in plans)
    has_block8 = any(p.block and p.bits != 4 for p in plans)
    opset = config.opset or (
        INT4_OPSET if (has_int4 or has_block8) else (FP16_OPSET if config.fp16 else TRACE_OPSET)
    )
    if has_int4 and opset < INT4_OPSET:
        raise UserInputError(f"INT4 weights need ONNX opset ≥ {INT4_OPSET}, got --opset {opset}")
    with float_weights_for_export(qmodel, plans):
        model = _trace(qmodel, input_size, opset, config)
    counts = _rewrite_weights(model, plans)
    model = set_opset(model, opset)
    if config.fp16:
        if opset < FP16_OPSET:
            raise UserInputError(f"--fp16 with Q/DQ needs opset ≥ {FP16_OPSET}, got {opset}")
        model = convert_to_fp16(model)
    meta = {
        "sardfq.scheme": scheme_name,
        "sardfq.scheme_json": json.dumps(scheme_dict, sort_keys=True, default=str),
        "sardfq.versions": json.dumps(_versions(), sort_keys=True),
        "sardfq.weights": json.dumps(counts, sort_keys=True),
        "sardfq.fp16": str(bool(config.fp16)).lower(),
        "sardfq.input": json.dumps(
            {"name": config.input_name, "shape": ["batch", *input_size], "dtype": "float32"}
        ),
    }
    for key, value in (metadata or {}).items():
        meta[f"sardfq.{key}"] = (
            value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        )
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    model.producer_name, model.producer_version = "sardfq-export", _versions()["sardfq_export"]
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    onnx.checker.check_model(model, full_check=True)
    report = lint_model(model) if config.lint else None
    if report is not None and config.strict_lint and not report.passed:
        raise UserInputError(f"exported ONNX breaks TensorRT rules: {report.violations[0]}")
    with atomic_path(path) as tmp:
        onnx.save(model, tmp)
    return ExportResult(path, opset, scheme_name, counts, report, meta)


__all__ = ["ExportConfig", "ExportResult", "export_onnx", "export_float_onnx", "check_exportable"]
