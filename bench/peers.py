"""Peer quantizers for the benchmark tables: the tools a user would reach for instead of ours, run on
the same float model and the same calibration images.

- :func:`ort_quantize_static`: ONNX Runtime's ``quantize_static`` (QDQ, symmetric INT8 activations
  and weights, per-channel weights, MinMax calibration) on the model exported by ``torch.onnx``.
  ``op_types=None`` is ORT's default, which quantizes *every* op type it has a QDQ/QLinear rule
  for (Add, Mul, Softmax, LayerNormalization, Concat, Gather, Reshape, Transpose ... ). On a ViT
  that puts per-tensor INT8 on the residual stream (the ``Add`` nodes) and on the LayerNorm/GELU
  internals as well, so also report the variant ``op_types=["MatMul", "Gemm"]`` (the linear layers
  and attention products only), which is the scope ModelOpt and our own W8A8 quantize.
- :func:`modelopt_fakequant`: NVIDIA ModelOpt (PyPI ``nvidia-modelopt``) ``mtq.quantize`` with one of
  its stock configs (``INT8_DEFAULT_CFG``, ``INT8_SMOOTHQUANT_CFG``, ``INT4_AWQ_CFG``), returning
  the fake-quant torch model. ModelOpt is a bench-only dependency, never a runtime one:
  :func:`ensure_modelopt` installs it into the running venv on request.

Imported by ``bench/dinov2_table.py``; tested by ``tests/test_peers.py``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

MODELOPT_CONFIGS = ("INT8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG", "INT4_AWQ_CFG")
CALIB_BATCH = 32  # images per calibration forward (both peers)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime quantize_static


def export_fp32_onnx(model: torch.nn.Module, path: Path, input_size) -> Path:
    """The float model as ONNX, traced exactly like our exports (exporters.export_float_onnx)."""
    from sardfq_export.exporters import export_float_onnx

    return export_float_onnx(model.eval(), path, tuple(input_size))


def _calibration_reader(images: np.ndarray, batch: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Feeds ``images`` (N, C, H, W float32, already normalized) in batches of ``batch``."""

        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter({"input": images[i : i + batch]} for i in range(0, len(images), batch))

    return Reader()


def ort_quantize_static(
    loaded,
    calib_images: torch.Tensor,
    out_dir: Path,
    per_channel: bool = True,
    op_types: list[str] | None = None,
    extra_options: dict | None = None,
) -> Path:
    """ONNX Runtime's own ``quantize_static`` on ``loaded.model``: QDQ format, QInt8 activations and
    weights, symmetric both (``ActivationSymmetric``/``WeightSymmetric``), per-channel weights,
    MinMax calibration over ``calib_images`` (N, C, H, W, already normalized).

    ``op_types``: ORT's ``op_types_to_quantize``; ``None`` keeps ORT's default (every op type it can
    quantize, residual ``Add``/``Mul``/``Softmax``/``LayerNormalization`` included), e.g.
    ``["MatMul", "Gemm"]`` restricts it to the linear layers and attention matmuls. ORT also
    quantizes the *outputs* of the ops it quantizes (a MatMul's pre-bias output included);
    ``extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]}`` turns that off.
    ``extra_options`` is merged over the symmetric settings.

    Writes ``model_fp32.onnx``, ``model_fp32_pre.onnx`` and the quantized model into ``out_dir``
    and returns the quantized model's path (``model_int8_qdq.onnx``, or
    ``model_int8_qdq_<ops>[_x<hash of extra_options>].onnx``, so variants can share a folder).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    input_size = tuple(getattr(loaded, "input_size", None) or loaded.data_config["input_size"])
    fp32 = export_fp32_onnx(loaded.model, out_dir / "model_fp32.onnx", input_size)

    # ORT recommends this pre-processing step (quantize_static warns without it): symbolic shape
    # inference (shapes for every tensor, dynamic batch included, so the quantizer knows them),
    # ONNX Runtime's basic graph optimizations (constant folding, redundant-node elimination,
    # simple fusions) and ONNX shape inference; it also stamps the model as pre-processed.
    pre = out_dir / "model_fp32_pre.onnx"
    quant_pre_process(str(fp32), str(pre))

    suffix = "" if not op_types else "_" + "-".join(t.lower() for t in op_types)
    if extra_options:  # a distinct name per option set too
        suffix += (
            "_x"
            + hashlib.sha1(json.dumps(extra_options, sort_keys=True, default=str).encode()).hexdigest()[:8]
        )
    out = out_dir / f"model_int8_qdq{suffix}.onnx"
    images = calib_images.detach().to("cpu", torch.float32).contiguous().numpy()
    quantize_static(
        str(pre),
        str(out),
        _calibration_reader(images, CALIB_BATCH),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(op_types) if op_types else None,
        per_channel=per_channel,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, **(extra_options or {})},
    )
    return out


# ---------------------------------------------------------------------------------------------
# NVIDIA ModelOpt


def ensure_modelopt() -> None:
    """Make ``modelopt.torch.quantization`` importable: when it is not, pip-install
    ``nvidia-modelopt`` and ``requests`` (which its import needs but it does not declare) into the
    running interpreter's environment. Raises a one-line RuntimeError when that fails."""
    try:
        importlib.import_module("modelopt.torch.quantization")
        return
    except ImportError:
        pass
    cmd = [sys.executable, "-m", "pip", "install", "-q", "nvidia-modelopt", "requests"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout or "").strip().splitlines()
        why = last[-1] if last else f"exit status {proc.returncode}"
        raise RuntimeError(f"could not install nvidia-modelopt into {sys.prefix}: {why}")
    importlib.invalidate_caches()
    try:
        importlib.import_module("modelopt.torch.quantization")
    except ImportError as e:
        raise RuntimeError(f"nvidia-modelopt installed but does not import: {e}") from None


def _mtq():
    try:
        return importlib.import_module("modelopt.torch.quantization")
    except ImportError as e:
        raise RuntimeError(
            f"nvidia-modelopt is not importable ({e}); call bench.peers.ensure_modelopt() first"
        ) from None


def modelopt_fakequant(loaded, calib_images: torch.Tensor, config: str) -> torch.nn.Module:
    """A deep copy of ``loaded.model`` quantized by ModelOpt: ``mtq.quantize(model,
    getattr(mtq, config), forward_loop)``, where ``forward_loop`` runs ``calib_images`` through
    the model in batches of 32. ``config`` is one of :data:`MODELOPT_CONFIGS` (any ``mtq.*_CFG``
    is accepted). Returns the fake-quant model in eval mode, on the float model's device.

    ModelOpt's stock configs apply unchanged: they do not exclude a timm ViT's ``head`` (their name
    patterns target LLM heads), and INT8 also quantizes the patch-embedding Conv2d."""
    mtq = _mtq()
    if not (config.endswith("_CFG") and hasattr(mtq, config)):
        raise ValueError(f"unknown ModelOpt config {config!r}; expected one of {', '.join(MODELOPT_CONFIGS)}")
    model = copy.deepcopy(loaded.model).eval()
    device = next(model.parameters()).device
    images = calib_images.detach().to(device, torch.float32)

    def forward_loop(m):
        with torch.no_grad():
            for batch in images.split(CALIB_BATCH):
                m(batch)

    try:
        model = mtq.quantize(model, copy.deepcopy(getattr(mtq, config)), forward_loop)
    except Exception as e:  # noqa: BLE001 - one line for the benchmark table, cause chained
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RuntimeError(f"ModelOpt {config} failed on {device}: {type(e).__name__}: {msg}") from e
    return model.eval()
