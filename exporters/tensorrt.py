"""TensorRT engines from the QDQ ONNX (explicit quantization).

``tensorrt`` is imported lazily: it is an optional extra that only installs on GPU hosts. Without
it (or without a GPU) :func:`build_engine` writes the exact ``trtexec`` command next to the ONNX
and raises :class:`MissingComponentError` (exit 4) naming it, so the receiving team can build the
engine on their machine.

* TensorRT 11 is strongly typed (no precision flags): INT8/INT4 come from the Q/DQ nodes, FP16
  from the ONNX being FP16 (export with ``fp16=True``).
* TensorRT 10.x still has builder flags: a strongly typed network when the ONNX is FP16,
  otherwise the INT8 flag (Q/DQ present) + FP16 so unquantized layers may use half precision.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from sardfq_export.core.errors import MissingComponentError, UserInputError
from sardfq_export.core.io import atomic_write_bytes


@dataclass(frozen=True)
class EngineConfig:
    """Engine build settings (``None`` means TensorRT's default)."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mib: int | None = None  # memory pool limit for tactics
    timing_cache: str | None = None  # file reused across builds (faster rebuilds); None: beside the engine
    builder_optimization_level: int | None = None  # 0..5 (TensorRT default 3)

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UserInputError(
                f"batch range must satisfy 1 ≤ min ≤ opt ≤ max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )


@dataclass
class EngineResult:
    """What a build wrote, and the versions the engine is tied to."""

    engine: Path
    log: Path
    timing_cache: Path
    versions: dict = field(default_factory=dict)  # tensorrt, gpu, compute_capability, cuda
    build_s: float = 0.0


def _shape(batch: int, chw: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in (batch, *chw))


def trtexec_command(
    onnx_path: str | Path,
    engine_path: str | Path,
    input_name: str,
    chw: tuple[int, ...],
    config: EngineConfig = EngineConfig(),
    tensorrt_major: int | None = None,
) -> list[str]:
    """The ``trtexec`` command that builds the same engine as :func:`build_engine`.

    For TensorRT 10.x with an FP32 ONNX add ``--int8 --fp16`` (it still has the flags); 11.x and
    FP16 ONNX files are strongly typed (``--stronglyTyped`` on 10.x, the default on 11.x).
    """
    engine_path = Path(engine_path)
    cache = config.timing_cache or str(engine_path.with_suffix(".timing.cache"))
    cmd = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--minShapes={input_name}:{_shape(config.min_batch, chw)}",
        f"--optShapes={input_name}:{_shape(config.opt_batch, chw)}",
        f"--maxShapes={input_name}:{_shape(config.max_batch, chw)}",
        f"--timingCacheFile={cache}",
    ]
    if tensorrt_major == 10:
        cmd.append("--stronglyTyped")
    if config.workspace_mib:
        cmd.append(f"--memPoolSize=workspace:{config.workspace_mib}M")
    if config.builder_optimization_level is not None:
        cmd.append(f"--builderOptimizationLevel={config.builder_optimization_level}")
    return cmd


def tensorrt_status() -> tuple[bool, str]:
    """(available, reason): TensorRT importable and a CUDA GPU present."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed (pip install 'sardfq-export[tensorrt]' on a GPU host)"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible (TensorRT builds engines on a GPU)"
    except ImportError:
        pass
    return True, "ok"


def write_build_script(
    onnx_path: str | Path,
    engine_path: str | Path,
    input_name: str,
    chw: tuple[int, ...],
    config: EngineConfig = EngineConfig(),
) -> tuple[Path, str]:
    """Write ``build_engine.sh`` beside the engine path; returns (path, the command line)."""
    cmd = " ".join(shlex.quote(c) for c in trtexec_command(onnx_path, engine_path, input_name, chw, config))
    script = Path(engine_path).with_name("build_engine.sh")
    here = script.parent
    # The script uses paths relative to its folder, so the folder can be copied to the GPU host.
    rel_config = config
    if config.timing_cache:
        rel_config = dataclasses.replace(config, timing_cache=os.path.relpath(config.timing_cache, here))
    rel = trtexec_command(
        os.path.relpath(onnx_path, here), os.path.relpath(engine_path, here), input_name, chw, rel_config
    )
    text = (
        "#!/usr/bin/env sh\n"
        "# Build the TensorRT engine on the GPU it will run on (engines are tied to GPU + TensorRT version).\n"
        "# TensorRT 10.x: add --stronglyTyped (FP16 ONNX) or --int8 --fp16 (FP32 ONNX). 11.x: as is.\n"
        'cd "$(dirname "$0")"\n'
        f"{' '.join(shlex.quote(c) for c in rel)}\n"
    )
    atomic_write_bytes(script, text.encode())
    script.chmod(0o755)
    return script, cmd


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    input_name: str,
    chw: tuple[int, ...],
    config: EngineConfig = EngineConfig(),
) -> EngineResult:
    """Build and serialize a TensorRT engine, with its build log and timing cache.

    Without TensorRT or a GPU: writes ``build_engine.sh`` (the trtexec command) and raises
    MissingComponentError whose one line names the command.
    """
    ok, reason = tensorrt_status()
    if not ok:
        script, cmd = write_build_script(onnx_path, engine_path, input_name, chw, config)
        raise MissingComponentError(
            f"{reason}; the TensorRT-ready ONNX is written — build the engine with: {cmd}"
        )
    import tensorrt as trt

    engine_path = Path(engine_path)
    log_path = engine_path.with_suffix(".build.log")
    cache_path = (
        Path(config.timing_cache) if config.timing_cache else engine_path.with_suffix(".timing.cache")
    )
    major = int(trt.__version__.split(".")[0])
    lines: list[str] = []

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):  # noqa: D401 - TensorRT callback
            lines.append(f"[{severity.name if hasattr(severity, 'name') else severity}] {msg}")

    logger = _Logger()
    builder = trt.Builder(logger)
    onnx_bytes = Path(onnx_path).read_bytes()
    fp16_onnx = _onnx_is_fp16(onnx_bytes)
    flags = 0
    strongly_typed = major >= 11 or fp16_onnx
    if major < 11 and strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes, str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        atomic_write_bytes(log_path, "\n".join(lines + [errors]).encode())
        raise UserInputError(f"TensorRT cannot parse {onnx_path}: {errors[:300]} (full log: {log_path})")
    bconfig = builder.create_builder_config()
    if major < 11 and not strongly_typed:
        bconfig.set_flag(trt.BuilderFlag.INT8)
        bconfig.set_flag(trt.BuilderFlag.FP16)
    if config.workspace_mib:
        bconfig.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    if config.builder_optimization_level is not None:
        bconfig.builder_optimization_level = config.builder_optimization_level
    cache = bconfig.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    bconfig.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    profile.set_shape(
        input_name, (config.min_batch, *chw), (config.opt_batch, *chw), (config.max_batch, *chw)
    )
    bconfig.add_optimization_profile(profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, bconfig)
    build_s = time.perf_counter() - start
    atomic_write_bytes(log_path, "\n".join(lines).encode())
    if serialized is None:
        raise RuntimeError(f"TensorRT engine build failed (log: {log_path})")
    atomic_write_bytes(engine_path, bytes(serialized))
    atomic_write_bytes(cache_path, bytes(bconfig.get_timing_cache().serialize()))
    versions = {"tensorrt": trt.__version__, "strongly_typed": strongly_typed, **gpu_info()}
    atomic_write_bytes(engine_path.with_suffix(".engine.json"), json.dumps(versions, indent=2).encode())
    return EngineResult(engine_path, log_path, cache_path, versions, build_s)


def gpu_info() -> dict:
    """GPU name, compute capability and CUDA version (an engine only runs where these match)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {
                "gpu": torch.cuda.get_device_name(0),
                "compute_capability": f"{major}.{minor}",
                "cuda": torch.version.cuda,
            }
    except ImportError:
        pass
    return {"gpu": None}


def _onnx_is_fp16(onnx_bytes: bytes) -> bool:
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    return any(p.key == "sardfq.fp16" and p.value == "true" for p in model.metadata_props)
