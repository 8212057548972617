"""Exporters: fake-quant model → QDQ ONNX, TensorRT-rules linter, TensorRT engines, ORT sessions.

    res = export_onnx(qmodel, "model.onnx", (3, 224, 224))      # INT8 / INT4-blocked / 4-bit-in-INT8 Q/DQ
    res.lint.passed                                             # TensorRT rules, checked on every export
    sess = create_session("model.onnx")                         # int8 kernels fire, attention → MultiHeadAttention
    graph, fused = deployment_graph("model.onnx")               # the graph ORT runs (bytes when rewritten)
    op_census("model.onnx")["int8_gemm"]                        # what ORT actually runs
    build_engine("model.onnx", "model.engine", "input", (3, 224, 224))   # or exit 4 + the trtexec command

Reads the quantizer state of ``calibrators``; never re-derives a scale. TensorRT is imported lazily.
"""

from sardfq_export.exporters.lint import LintReport, Violation, format_report, lint_model
from sardfq_export.exporters.onnx_export import (
    ExportConfig,
    ExportResult,
    check_exportable,
    export_float_onnx,
    export_onnx,
)
from sardfq_export.exporters.ort import OrtConfig, create_session, deployment_graph, op_census
from sardfq_export.exporters.tensorrt import (
    EngineConfig,
    EngineResult,
    build_engine,
    tensorrt_status,
    trtexec_command,
)

__all__ = [
    "ExportConfig", "ExportResult", "check_exportable", "export_onnx", "export_float_onnx",
    "LintReport", "Violation", "format_report", "lint_model",
    "OrtConfig", "create_session", "deployment_graph", "op_census",
    "EngineConfig", "EngineResult", "build_engine", "tensorrt_status", "trtexec_command",
]  # fmt: skip
