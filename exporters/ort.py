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
* ``SkipLayerNormFusion`` is disabled too: ORT 1.32's CPU ``SkipLayerNormalization`` kernel took
  6× the time of the ``Add → Add → LayerNormalization`` it replaces on ViT-S shapes (0.28 vs
  0.04 ms per block at batch 1, 10.3 vs 2.5 ms at batch 32, measured on the 2-core AVX-512 CPU).
* ``stop_spinning`` (``session.force_spinning_stop``): ORT's intra-op workers otherwise keep
  spinning for a while after ``run`` returns, and on a 2-core machine they steal a core from
  whatever runs next — another session, PyTorch, the next request's pre-processing. Measured with
  two sessions alternating at batch 1 (ViT-S, 2 threads): ours INT8 31.0 → 11.6 ms, PyTorch 107
  → 54 ms; a session run back to back alone is unchanged (it re-wakes one worker per run).
* ``fuse_attention``: ORT has no CPU fusion for the attention torch exports (timm's fused SDPA
  traces to ~25 small ops per block: shape arithmetic, transposes, split/squeeze, two scale Muls,
  two MatMuls, Softmax). ``create_session`` folds each one into ``com.microsoft::MultiHeadAttention``
  in memory before ORT sees the graph (``exporters.onnx_graph.fuse_attention``); the file on disk
  stays the portable QDQ ONNX. The attention is float in the exported schemes either way (the
  default schemes do not quantize the two attention matmuls; schemes that do keep their Q/DQ and
  are not fused), so the result equals the fake-quant model up to float rounding — the parity
  tests run through this path. It applies to any float attention, so FP32 baselines built with
  the same ``OrtConfig`` get it too.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sardfq_export.core.errors import MissingComponentError

DISABLED_OPTIMIZERS = ("MatMulAddFusion", "SkipLayerNormFusion")
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
ATTENTION_OPS = ("MultiHeadAttention", "Attention")  # fused float attention kernels
_FUSE_PROVIDERS = ("CPUExecutionProvider",)  # where MultiHeadAttention was measured to help


@dataclass(frozen=True)
class OrtConfig:
    """ONNX Runtime session settings (``None`` means ORT's default)."""

    threads: int | None = None  # intra-op threads; None: ORT picks (all physical cores)
    disabled_optimizers: tuple[str, ...] = DISABLED_OPTIMIZERS  # fusions that block int8 kernels / are slow
    matmulnbits_accuracy_level: int | None = 1  # 1: FP32 compute (exact W4A16); 4: int8 activations
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    optimization_level: str = "all"  # "disable" | "basic" | "extended" | "all"
    extra_config: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # session config entries
    fuse_attention: bool = True  # fold float self-attention into com.microsoft::MultiHeadAttention
    stop_spinning: bool = True  # workers stop spinning when run() returns (session.force_spinning_stop)
    # INT8 Q/DQ shifted to UINT8 (exact) for a non-saturating integer GEMM: None = where this CPU's
    # would saturate (x86 without VNNI, int8_gemm_saturates), only on the CPU provider.
    unsigned_int8: bool | None = None


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
    if config.stop_spinning:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    for key, value in config.extra_config:
        so.add_session_config_entry(key, value)
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    so.log_severity_level = 3  # errors only: the NCHWc "hardware specific" warning is expected
    return so


@functools.cache  # the CPU does not change while we run; read once, not per session
def int8_gemm_saturates() -> bool:
    """Whether ONNX Runtime's CPU INT8 GEMM can saturate on this machine: x86 without VNNI
    (AVX-512 VNNI or AVX-VNNI), where signed weights go through ``vpmaddubsw``'s saturating int16
    pair sums (onnx_graph.unsigned_int8). Read from /proc/cpuinfo, else numpy's CPU features."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), None)
        if flags is not None:
            return not {"avx512_vnni", "avx_vnni"} & set(flags)
    except OSError:
        pass
    try:
        import numpy as np

        features = getattr(np, "_core", getattr(np, "core", None))._multiarray_umath.__cpu_features__
        return not (features.get("AVX512VNNI") or features.get("AVXVNNI"))
    except Exception:  # unknown: leave the graph as exported
        return False


def _unsigned(config: OrtConfig, providers: list[str]) -> bool:
    if "CPUExecutionProvider" not in providers[:1]:
        return False  # the rewrite is for ORT's CPU kernels only
    return int8_gemm_saturates() if config.unsigned_int8 is None else config.unsigned_int8


def deployment_graph(path: str | Path, config: OrtConfig = OrtConfig()):
    """What ``create_session`` hands to ONNX Runtime for ``path``: the file's path when no graph
    rewrite applies, else the serialized rewritten model (bytes), and the number of attentions
    fused. Rewrites: float attention → MultiHeadAttention (``fuse_attention``), INT8 → UINT8 Q/DQ
    where the CPU's integer GEMM would saturate (``unsigned_int8``)."""
    providers = _providers(config)
    fuse = config.fuse_attention and all(p in _FUSE_PROVIDERS for p in providers)
    unsigned = _unsigned(config, providers)
    if not (fuse or unsigned):
        return str(path), 0
    import onnx
    from sardfq_export.exporters.onnx_graph import fuse_attention, unsigned_int8

    model = onnx.load(str(path))
    if model.ByteSize() >= 2**31 - 2**20:  # protobuf cannot serialize ≥ 2 GiB: run the file as is
        return str(path), 0
    fused = shifted = 0
    if fuse:
        model, fused = fuse_attention(model)
    if unsigned:
        model, shifted = unsigned_int8(model)
    if not (fused or shifted):
        return str(path), 0
    return model.SerializeToString(), fused


def write_deployment_graph(onnx_path: str | Path, out_path: str | Path, config: OrtConfig = OrtConfig()):
    """Write the graph ORT will run (float attention folded) as an artifact of its own.

    Returns ``(path, config)``: the file to open and the settings to open it with (the rewrite is
    not redone at session creation). Without a rewrite, the original ``onnx_path`` and ``config``.
    """
    from dataclasses import replace

    from sardfq_export.core.io import atomic_write_bytes

    graph, _ = deployment_graph(onnx_path, config)
    if not isinstance(graph, bytes):
        return Path(onnx_path), config
    return atomic_write_bytes(out_path, graph), replace(config, fuse_attention=False, unsigned_int8=False)


def _providers(config: OrtConfig) -> list[str]:
    available = set(_ort().get_available_providers())
    return [p for p in config.providers if p in available] or ["CPUExecutionProvider"]


def create_session(
    path: str | Path,
    config: OrtConfig = OrtConfig(),
    optimized_model_path: str | Path | None = None,
    profile_prefix: str | Path | None = None,
):
    """An ``InferenceSession`` on ``path`` with the settings of ``config`` (int8 kernels fire,
    float attention fused, see the module docstring). ``profile_prefix``: turn on ORT's profiler
    (per-node kernel times; ``session.end_profiling()`` writes the JSON and returns its path)."""
    ort = _ort()
    model, _ = deployment_graph(path, config)
    so = session_options(config, optimized_model_path)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(
        model,
        so,
        providers=_providers(config),
        disabled_optimizers=list(config.disabled_optimizers),
    )


def op_census(path: str | Path, config: OrtConfig = OrtConfig()) -> dict:
    """The op types of the graph ORT runs after its optimizations, and the GEMMs by precision.

    ``int8_gemm`` counts fused integer kernels (MatMulIntegerToFloat, QGemm, ...), ``int4_gemm``
    MatMulNBits, ``float_gemm`` what is left in float (MatMul/Gemm: attention matmuls that were
    not fused, the head), ``attention`` fused attention kernels (MultiHeadAttention).
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
        "attention": sum(ops.get(o, 0) for o in ATTENTION_OPS),
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
        "fuse_attention": config.fuse_attention,
        "stop_spinning": config.stop_spinning,
        "unsigned_int8": _unsigned(config, list(config.providers)),
    }
