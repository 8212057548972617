"""ONNX Runtime as a deployment target: session settings that make the int8 kernels fire, and an
op census of the graph ORT actually runs.

* ``MatMulAddFusion`` is disabled: on a QDQ model it can turn ``DQ → MatMul → Add`` into a float
  ``Gemm`` before the QDQ fusions run, and the model then runs at FP32 speed or slower
  (DEPLOYMENT.md: 0.84× vs 1.82× FP32 on ViT-S/16). With it off, ORT fuses every quantized
  Linear into ``com.microsoft::MatMulIntegerToFloat``.
* ``session.qdq_matmulnbits_accuracy_level`` = 1 for INT4 blocked ``DQ → MatMul`` (fused into
  ``MatMulNBits``): FP32 compute, equal to the fake-quant model up to accumulation order. Left at
  ORT's default (4) the kernel quantizes activations to int8 on the fly, which is faster but
  no longer W4A16.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sardfq_export.errors import MissingComponentError

DISABLED_OPTIMIZERS = ("MatMulAddFusion",)
INT8_GEMM_OPS = (
    "MatMulIntegerToFloat",
    "QGemm",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
    "MatMulInteger",
    "QLinearConv",
    "ConvInteger",
    "QAttention",
)
INT4_GEMM_OPS = ("MatMulNBits",)
FLOAT_GEMM_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")


@dataclass(frozen=True)
class OrtConfig:
    """ONNX Runtime session settings (``None`` means ORT's default)."""

    threads: int | None = None  # intra-op threads; None: ORT picks (all physical cores)
    disabled_optimizers: tuple[str, ...] = DISABLED_OPTIMIZERS  # fusions that block the int8 kernels
    matmulnbits_accuracy_level: int | None = 1  # 1: FP32 compute (exact W4A16); 4: int8 activations
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    optimization_level: str = "all"  # "disable" | "basic" | "extended" | "all"
    extra_config: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # session config entries


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingComponentError(
            "ONNX Runtime is not installed: pip install 'sardfq-export[cpu]' (or [gpu])"
        ) from None
    return onnxruntime


def session_options(config: OrtConfig = OrtConfig(), optimized_model_path: str | Path | None = None):
    """``onnxruntime.SessionOptions`` for ``config``."""
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[config.optimization_level]
    if config.threads:
        so.intra_op_num_threads = int(config.threads)
        so.inter_op_num_threads = 1
    if config.matmulnbits_accuracy_level is not None:
        so.add_session_config_entry(
            "session.qdq_matmulnbits_accuracy_level", str(config.matmulnbits_accuracy_level)
        )
    for key, value in config.extra_config:
        so.add_session_config_entry(key, value)
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    so.log_severity_level = 3  # errors only: the NCHWc "hardware specific" warning is expected
    return so


def create_session(
    path: str | Path, config: OrtConfig = OrtConfig(), optimized_model_path: str | Path | None = None
):
    """An ``InferenceSession`` on ``path`` with the int8-friendly settings of ``config``."""
    ort = _ort()
    available = set(ort.get_available_providers())
    providers = [p for p in config.providers if p in available] or ["CPUExecutionProvider"]
    return ort.InferenceSession(
        str(path),
        session_options(config, optimized_model_path),
        providers=providers,
        disabled_optimizers=list(config.disabled_optimizers),
    )


def op_census(path: str | Path, config: OrtConfig = OrtConfig()) -> dict:
    """The op types of the graph ORT runs after its optimizations, and the GEMMs by precision.

    ``int8_gemm`` counts fused integer kernels (MatMulIntegerToFloat, QGemm, ...), ``int4_gemm``
    MatMulNBits, ``float_gemm`` what is left in float (MatMul/Gemm, attention matmuls included).
    """
    import onnx

    with tempfile.TemporaryDirectory(prefix="sardfq-ort-") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        create_session(path, config, optimized_model_path=opt)
        model = onnx.load(str(opt), load_external_data=False)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    ops = dict(sorted(ops.items()))
    return {
        "ops": ops,
        "int8_gemm": sum(ops.get(o, 0) for o in INT8_GEMM_OPS),
        "int4_gemm": sum(ops.get(o, 0) for o in INT4_GEMM_OPS),
        "float_gemm": sum(ops.get(o, 0) for o in FLOAT_GEMM_OPS),
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "settings": describe(config),
    }


def describe(config: OrtConfig = OrtConfig()) -> dict:
    """The settings as plain data (for reports and manifests)."""
    ort = _ort()
    return {
        "onnxruntime": ort.__version__,
        "threads": config.threads or os.cpu_count(),
        "disabled_optimizers": list(config.disabled_optimizers),
        "matmulnbits_accuracy_level": config.matmulnbits_accuracy_level,
        "providers": list(config.providers),
        "optimization_level": config.optimization_level,
    }
