"""bench/peers.py: the peer quantizers (ONNX Runtime quantize_static, NVIDIA ModelOpt) on a tiny ViT."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_vit
from onnx import numpy_helper

from sardfq_export.models import LoadedModel

_spec = importlib.util.spec_from_file_location("peers", Path(__file__).parents[1] / "bench" / "peers.py")
peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)

HAS_MODELOPT = importlib.util.find_spec("modelopt") is not None


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LoadedModel(tiny_vit(), "tiny", {"input_size": (3, 32, 32)}, "vit", "random-init")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(48, 3, 32, 32, generator=g)  # 32 to calibrate, 16 to evaluate


def _float_logits(loaded, x):
    with torch.inference_mode():
        return loaded.model(x)


def _agreement(q: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(mean per-image cosine of the logits after removing the float model's mean logit, top-1
    agreement). Centred, because a random-init ViT's raw logits are alike for any input (cosine
    ~0.84 between *different* images here; ~-0.1 once centred)."""
    c = ref.mean(0)
    cos = torch.nn.functional.cosine_similarity((q - c).float(), (ref - c).float(), dim=1).mean()
    return float(cos), float((q.argmax(1) == ref.argmax(1)).float().mean())


def _producers(graph):
    return {o: n for n in graph.node for o in n.output}


def _dq_fed_ops(graph) -> set[str]:
    """Op types (other than Q/DQ) with at least one input coming out of a DequantizeLinear."""
    prod = _producers(graph)
    return {
        n.op_type
        for n in graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
        and any(i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input)
    }


@pytest.fixture(scope="module")
def qdq_default(tiny, images, tmp_path_factory):
    return peers.ort_quantize_static(tiny, images[:32], tmp_path_factory.mktemp("ort"))


@pytest.fixture(scope="module")
def qdq_matmul(tiny, images, tmp_path_factory):
    return peers.ort_quantize_static(
        tiny, images[:32], tmp_path_factory.mktemp("ort"), op_types=["MatMul", "Gemm"]
    )


@pytest.mark.parametrize("variant", ["qdq_default", "qdq_matmul"])
def test_ort_quantize_static_is_symmetric_per_channel_qdq(request, variant):
    m = onnx.load(str(request.getfixturevalue(variant)))
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    ops = [n.op_type for n in g.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    assert m.opset_import[0].version >= 17 and g.input[0].name == "input"

    prod = _producers(g)
    weights = 0
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in prod:
            continue
        dq = prod[node.input[1]]
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue  # an activation x activation MatMul (attention)
        w, scale, zp = inits[dq.input[0]], inits[dq.input[1]], inits[dq.input[2]]
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        transb = next((a.i for a in node.attribute if a.name == "transB"), 0)
        out_axis = 0 if (node.op_type == "Gemm" and transb) else 1
        assert w.dtype == np.int8 and zp.dtype == np.int8
        assert not zp.any(), f"{dq.name}: weight zero-points not all 0"
        assert axis == out_axis and scale.shape == (w.shape[out_axis],), f"{dq.name}: not per output channel"
        assert len(np.unique(scale)) > 1
        weights += 1
    assert weights == 2 * 4 + 1  # depth 2 x (qkv, proj, fc1, fc2) + head

    # Symmetric activations too: every QuantizeLinear has a zero zero-point.
    for node in g.node:
        if node.op_type == "QuantizeLinear":
            assert not inits[node.input[2]].any(), node.name


# ORT's default quantizes every op it can (LayerNorm, residual Adds, Softmax ...): on this tiny random
# ViT that costs a lot (centred cosine ~0.55, 10/16 top-1); MatMul/Gemm only is near-lossless
# (~0.995, 16/16). Thresholds sit well below the measured values and well above unrelated
# logits (~-0.1).
@pytest.mark.parametrize(
    ("variant", "min_cos", "min_agree"), [("qdq_default", 0.3, 0.5), ("qdq_matmul", 0.9, 0.75)]
)
def test_ort_quantize_static_matches_float_model(tiny, images, request, variant, min_cos, min_agree):
    import onnxruntime as ort

    path = request.getfixturevalue(variant)
    x = images[32:]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    q = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    assert q.shape == (16, 10)
    # dynamic batch: one image at a time gives the same logits
    one = sess.run(None, {"input": x[:1].numpy()})[0]
    np.testing.assert_allclose(one[0], q[0].numpy(), atol=1e-4)
    ref = _float_logits(tiny, x)
    assert not torch.allclose(q, ref, atol=1e-5)  # it does quantize
    cos, agree = _agreement(q, ref)
    assert cos > min_cos and agree >= min_agree, (cos, agree)


def test_ort_op_types_restricts_what_is_quantized(tiny, images, qdq_default, qdq_matmul, tmp_path):
    default_ops = _dq_fed_ops(onnx.load(str(qdq_default)).graph)
    assert {"LayerNormalization", "Add", "Conv"} <= default_ops  # ORT's default quantizes broadly

    assert qdq_matmul.name != qdq_default.name  # both variants can share a folder
    restricted = _dq_fed_ops(onnx.load(str(qdq_matmul)).graph)
    assert {"MatMul", "Gemm"} <= restricted
    assert not restricted & {"LayerNormalization", "Conv", "Mul", "Concat"}

    # ... and OpTypesToExcludeOutputQuantization keeps the MatMul/Gemm outputs float.
    path = peers.ort_quantize_static(
        tiny,
        images[:32],
        tmp_path,
        op_types=["MatMul", "Gemm"],
        extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
    )
    assert _dq_fed_ops(onnx.load(str(path)).graph) == {"MatMul", "Gemm"}
    assert path.name not in (qdq_matmul.name, qdq_default.name)


def test_ensure_modelopt_reports_a_failed_install_in_one_line(monkeypatch):
    def no_module(name):
        raise ImportError(f"No module named {name!r}")

    calls = []

    def failing_pip(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution found for nvidia-modelopt\n"
        )

    monkeypatch.setattr(peers.importlib, "import_module", no_module)
    monkeypatch.setattr(peers.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError) as e:
        peers.ensure_modelopt()
    assert "\n" not in str(e.value) and "No matching distribution" in str(e.value)
    assert calls and calls[0][1:] == ["-m", "pip", "install", "-q", "nvidia-modelopt", "requests"]


def test_ensure_modelopt_does_nothing_when_importable(monkeypatch):
    monkeypatch.setattr(peers.importlib, "import_module", lambda name: object())
    monkeypatch.setattr(peers.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    peers.ensure_modelopt()


@pytest.mark.skipif(HAS_MODELOPT, reason="checks the message shown when modelopt is missing")
def test_modelopt_fakequant_without_modelopt_says_what_to_do(tiny, images):
    with pytest.raises(RuntimeError, match="ensure_modelopt"):
        peers.modelopt_fakequant(tiny, images[:32], "INT8_DEFAULT_CFG")


@pytest.mark.skipif(not HAS_MODELOPT, reason="nvidia-modelopt not installed (bench-only: ensure_modelopt())")
@pytest.mark.parametrize("config", ["INT8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG"])
def test_modelopt_fakequant_int8(tiny, images, config):
    q = peers.modelopt_fakequant(tiny, images[:32], config)
    assert q is not tiny.model and not q.training
    names = {type(m).__name__ for m in q.modules()}
    assert "TensorQuantizer" in names
    assert not any(type(m).__name__ == "TensorQuantizer" for m in tiny.model.modules())  # a copy
    x = images[32:]
    with torch.inference_mode():
        z = q(x)
    ref = _float_logits(tiny, x)
    assert not torch.equal(z, ref)  # it does quantize
    cos, agree = _agreement(z, ref)
    assert cos > 0.9 and agree >= 0.75, (cos, agree)


@pytest.mark.skipif(not HAS_MODELOPT, reason="nvidia-modelopt not installed (bench-only: ensure_modelopt())")
def test_modelopt_fakequant_rejects_unknown_config(tiny, images):
    with pytest.raises(ValueError, match="INT8_DEFAULT_CFG"):
        peers.modelopt_fakequant(tiny, images[:32], "INT3_MAGIC_CFG")
