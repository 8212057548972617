"""Exporters: QDQ ONNX export, the torch-vs-ONNX-Runtime parity every numerics change must keep
green, the op census, the TensorRT-rules linter, and the TensorRT fallback."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from onnx import TensorProto, helper, numpy_helper
from sardfq_export.exporters.lint import lint_model
from sardfq_export.exporters.onnx_export import ExportConfig, export_onnx
from sardfq_export.exporters.onnx_graph import fuse_attention
from sardfq_export.exporters.ort import OrtConfig, create_session, op_census

from sardfq_export import calibrators
from sardfq_export.cli import main
from sardfq_export.core.errors import MissingComponentError, UserInputError

# Linear layers of tiny_vit (depth 2): qkv, proj, fc1, fc2 per block.
N_LINEARS = 8


def _quantized(scheme: str, embed_dim: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    model = tiny_vit(embed_dim=embed_dim)
    qmodel = calibrators.quantize_model(model, scheme)
    gen = torch.Generator().manual_seed(seed)
    calib = torch.randn(32, 3, 32, 32, generator=gen)
    calibrators.calibrate(qmodel, calib, progress=False)
    held = torch.randn(64, 3, 32, 32, generator=gen)
    return model, qmodel, held


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    model, qmodel, held = _quantized("w8a8")
    path = tmp_path_factory.mktemp("w8a8") / "model.onnx"
    res = export_onnx(qmodel, path, (3, 32, 32), metadata={"calibration": {"method": "noise"}})
    return model, qmodel, held, path, res


def _parity(qmodel, path, images, worst: float = 0.999):
    sess = create_session(path)
    got = torch.from_numpy(sess.run(None, {"input": images.numpy()})[0])
    with torch.no_grad():
        want = qmodel(images)
    cos = F.cosine_similarity(got.double(), want.double(), dim=1)
    # Q/DQ math is exact; a code may still flip where float accumulation order moves x/scale
    # across a rounding boundary, so the worst image is allowed a little less than the mean.
    assert float(cos.min()) >= worst
    return float((got.argmax(1) == want.argmax(1)).double().mean()), float(cos.mean())


def test_w8a8_parity_with_onnxruntime(w8a8):
    _, qmodel, held, path, _ = w8a8
    agreement, cos_mean = _parity(qmodel, path, held)
    assert agreement == 1.0 and cos_mean >= 0.9999


@pytest.mark.parametrize("scheme", ["w4a16", "w4a8", "w4a4"])
def test_4bit_parity_with_onnxruntime(scheme, tmp_path):
    _, qmodel, held = _quantized(scheme, embed_dim=128)
    res = export_onnx(qmodel, tmp_path / "m.onnx", (3, 32, 32))
    assert res.lint.passed, res.lint.violations
    agreement, cos_mean = _parity(qmodel, tmp_path / "m.onnx", held)
    assert agreement == 1.0 and cos_mean >= 0.9999


def test_w8a8_graph_is_int8_qdq_and_int8_kernels_fire(w8a8):
    _, _, _, path, res = w8a8
    model = onnx.load(str(path))
    assert res.weights == {"int8-per-channel": N_LINEARS}
    weights = [t for t in model.graph.initializer if t.name.endswith("weight_int8")]
    assert len(weights) == N_LINEARS and all(t.data_type == TensorProto.INT8 for t in weights)
    linears = [n for n, _ in calibrators.iter_quantizers(w8a8[1]) if n.endswith(".weight_quantizer")]
    float_names = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert len(linears) == N_LINEARS
    assert not float_names & {n.replace("weight_quantizer", "weight") for n in linears}
    ops = [n.op_type for n in model.graph.node]
    assert "LayerNormalization" in ops and ops.count("QuantizeLinear") == N_LINEARS
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    census = op_census(path)
    assert census["int8_gemm"] == N_LINEARS and census["ops"].get("MatMulIntegerToFloat") == N_LINEARS


def test_unsigned_int8_rewrite_is_exact_and_keeps_parity(w8a8, tmp_path):
    """INT8 → UINT8 (+128) Q/DQ computes the same numbers; forced on, the int8 kernels still fire and
    match the fake-quant model on any CPU (auto turns it on where ORT's int8 GEMM saturates)."""
    from sardfq_export.exporters.onnx_graph import unsigned_int8

    _, qmodel, held, path, _ = w8a8
    shifted_model, shifted = unsigned_int8(onnx.load(str(path)))
    # every weight's codes and zero point, and one zero-point constant per activation quantizer
    zps = {t.name for t in shifted_model.graph.initializer if t.data_type == TensorProto.UINT8}
    assert shifted == 2 * N_LINEARS + N_LINEARS and len(zps) == 2 * N_LINEARS
    assert not [t for t in shifted_model.graph.initializer if t.data_type == TensorProto.INT8]
    onnx.save(shifted_model, str(tmp_path / "u8.onnx"))
    plain = OrtConfig(optimization_level="disable", fuse_attention=False, unsigned_int8=False)
    x = {"input": held.numpy()}
    want = create_session(path, plain).run(None, x)[0]
    assert np.array_equal(create_session(tmp_path / "u8.onnx", plain).run(None, x)[0], want)
    forced = OrtConfig(unsigned_int8=True)
    assert op_census(path, forced)["ops"].get("MatMulIntegerToFloat") == N_LINEARS
    got = torch.from_numpy(create_session(path, forced).run(None, x)[0])
    with torch.no_grad():
        ref = qmodel(held)
    cos = F.cosine_similarity(got.double(), ref.double(), dim=1)
    assert float(cos.min()) >= 0.999 and bool((got.argmax(1) == ref.argmax(1)).all())


def test_ort_session_folds_float_attention_into_multiheadattention(w8a8):
    """create_session rewrites each float attention (fused SDPA export) into one contrib kernel."""
    _, _, held, path, _ = w8a8
    fused = op_census(path)
    # tiny_vit: 2 blocks → 2 attentions; only the head is left as a float GEMM.
    assert fused["attention"] == 2 and fused["ops"]["MultiHeadAttention"] == 2
    assert fused["float_gemm"] == 1 and fused["int8_gemm"] == N_LINEARS
    assert "SkipLayerNormalization" not in fused["ops"]  # disabled: a slow kernel on CPU
    plain = op_census(path, OrtConfig(fuse_attention=False))
    assert plain["attention"] == 0 and plain["float_gemm"] == 5 and plain["ops"]["Softmax"] == 2
    # The per-attention shape arithmetic, unbind and scale ops go with it (20 nodes each on ORT 1.32).
    assert not {"Softmax", "Squeeze", "Sqrt", "Cast"} & set(fused["ops"])
    assert sum(fused["ops"].values()) <= sum(plain["ops"].values()) - 2 * 20
    model, count = fuse_attention(onnx.load(str(path)))
    assert count == 2
    onnx.checker.check_model(model)
    mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    for node in mha:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "com.microsoft" and attrs["num_heads"] == 2
        # SDPA traces the scale as sqrt(1/sqrt(hd)) on q and on kᵀ: their product is 1/sqrt(32).
        assert abs(attrs["scale"] - 32**-0.5) < 1e-6
        assert len(node.input) == 4  # q, k, v + the qkv bias (its Add is gone)
    fast = create_session(path).run(None, {"input": held.numpy()})[0]
    slow = create_session(path, OrtConfig(fuse_attention=False)).run(None, {"input": held.numpy()})[0]
    cos = F.cosine_similarity(torch.from_numpy(fast).double(), torch.from_numpy(slow).double(), dim=1)
    assert float(cos.min()) >= 0.9999 and (fast.argmax(1) == slow.argmax(1)).all()


def test_attention_fusion_explicit_path_and_quantized_attention(tmp_path):
    """timm's explicit attention (q·scale) fuses too; attention matmuls with Q/DQ are left alone."""
    torch.manual_seed(0)
    qmodel = calibrators.quantize_model(tiny_vit(), "w8a8")
    calibrators.calibrate(qmodel, torch.randn(16, 3, 32, 32), progress=False)
    for mod in qmodel.modules():
        if hasattr(mod, "force_explicit"):
            mod.force_explicit = True  # the non-SDPA forward: one Mul by a constant scale
    export_onnx(qmodel, tmp_path / "explicit.onnx", (3, 32, 32))
    model, count = fuse_attention(onnx.load(str(tmp_path / "explicit.onnx")))
    assert count == 2
    scales = [
        helper.get_attribute_value(a) for n in model.graph.node for a in n.attribute if a.name == "scale"
    ]
    assert len(scales) == 2 and all(abs(v - 32**-0.5) < 1e-6 for v in scales)
    agreement, cos_mean = _parity(qmodel, tmp_path / "explicit.onnx", torch.randn(32, 3, 32, 32))
    assert agreement == 1.0 and cos_mean >= 0.9999

    scheme = calibrators.get_scheme("w8a8").with_options(name="w8a8_attn", quantize_attn_matmuls=True)
    torch.manual_seed(0)
    qmodel = calibrators.quantize_model(tiny_vit(), scheme)
    calibrators.calibrate(qmodel, torch.randn(16, 3, 32, 32), progress=False)
    export_onnx(qmodel, tmp_path / "qattn.onnx", (3, 32, 32))
    assert fuse_attention(onnx.load(str(tmp_path / "qattn.onnx")))[1] == 0
    census = op_census(tmp_path / "qattn.onnx")
    assert census["attention"] == 0 and census["ops"]["Softmax"] == 2
    agreement, cos_mean = _parity(qmodel, tmp_path / "qattn.onnx", torch.randn(32, 3, 32, 32), worst=0.99)
    assert agreement >= 0.95 and cos_mean >= 0.999


def test_w4a16_exports_int4_blocked_weights_that_ort_runs(tmp_path):
    _, qmodel, held = _quantized("w4a16", embed_dim=128)
    res = export_onnx(qmodel, tmp_path / "m.onnx", (3, 32, 32))
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert res.opset >= 21 and res.weights == {"int4-blocked": N_LINEARS}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert all(
        helper.get_attribute_value(next(a for a in n.attribute if a.name == "block_size")) in (64, 128)
        for n in dqs
    )
    int4 = [t for t in model.graph.initializer if t.data_type == TensorProto.INT4]
    assert len(int4) == 2 * N_LINEARS  # codes + zero-points
    assert op_census(tmp_path / "m.onnx")["int4_gemm"] == N_LINEARS
    # the lint counts INT4 weights (one per blocked Linear), not "has INT4" (it said 1) nor zero-points
    assert lint_model(model).stats["int4_tensors"] == res.weights["int4-blocked"] == N_LINEARS


def test_metadata_and_checker(w8a8):
    _, _, _, path, _ = w8a8
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["sardfq.scheme"] == "w8a8"
    assert json.loads(meta["sardfq.calibration"]) == {"method": "noise"}
    assert "torch" in json.loads(meta["sardfq.versions"])


def test_fp16_export_keeps_fp32_io(tmp_path):
    _, qmodel, held = _quantized("w8a8")
    res = export_onnx(qmodel, tmp_path / "m.onnx", (3, 32, 32), ExportConfig(fp16=True))
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert res.opset >= 19 and res.lint.passed
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    scales = [t for t in model.graph.initializer if t.name.endswith("weight_scale")]
    assert scales and all(t.data_type == TensorProto.FLOAT16 for t in scales)
    agreement, cos_mean = _parity(qmodel, tmp_path / "m.onnx", held, worst=0.99)
    assert agreement >= 0.95 and cos_mean >= 0.99  # FP16 rounding only


def test_research_scheme_is_refused(tmp_path):
    qmodel = calibrators.quantize_model(tiny_vit(), "research_w4a4_log2")
    with pytest.raises(UserInputError, match="research"):
        export_onnx(qmodel, tmp_path / "m.onnx", (3, 32, 32))
    assert not (tmp_path / "m.onnx").exists()


def test_polygraphy_runs_the_export(w8a8):
    import subprocess
    import sys

    _, _, _, path, _ = w8a8
    cli = "import sys; from polygraphy.tools import main; sys.exit(main())"
    proc = subprocess.run(
        [sys.executable, "-c", cli, "run", str(path), "--onnxrt", "--input-shapes", "input:[2,3,32,32]"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "PASSED" in proc.stdout + proc.stderr


# --- the linter on hand-made graphs ----------------------------------------------------------------


def _qdq_model(
    zero_point=0,
    act_scale=(0.1,),
    weight_type=TensorProto.INT8,
    block_size=None,
    opset=17,
    q_type=TensorProto.INT8,
):
    """x → Q → DQ → MatMul(·, DQ(W)) with knobs to break each rule."""
    w = np.ones((8, 4), np.int8)
    scale = np.full((1, 4) if block_size else (4,), 0.05, np.float32)
    if block_size:
        w = np.ones((128, 4), np.int8)
        scale = np.full((128 // block_size, 4), 0.05, np.float32)
    if weight_type == TensorProto.INT4:
        wt = helper.make_tensor("W", TensorProto.INT4, list(w.shape), w.ravel().tolist())
    else:
        wt = numpy_helper.from_array(w, "W")
    act_s = numpy_helper.from_array(
        np.array(act_scale, np.float32).reshape(() if len(act_scale) == 1 else (-1,)), "s"
    )
    zp_arr = np.array(zero_point, np.int8 if q_type == TensorProto.INT8 else np.uint8)
    zp = numpy_helper.from_array(
        zp_arr.reshape(() if len(act_scale) == 1 else (1,))
        .repeat(len(act_scale))
        .reshape(() if len(act_scale) == 1 else (-1,)),
        "zp",
    )
    inits = [wt, numpy_helper.from_array(scale, "ws"), act_s, zp]
    kw = {"axis": 0, "block_size": block_size} if block_size else {"axis": 1}
    k = w.shape[0]
    nodes = [
        helper.make_node(
            "QuantizeLinear",
            ["x", "s", "zp"],
            ["xq"],
            name="act_q",
            **({"axis": 2} if len(act_scale) > 1 else {}),
        ),
        helper.make_node(
            "DequantizeLinear",
            ["xq", "s", "zp"],
            ["xd"],
            name="act_dq",
            **({"axis": 2} if len(act_scale) > 1 else {}),
        ),
        helper.make_node("DequantizeLinear", ["W", "ws"], ["wd"], name="w_dq", **kw),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _rules(model) -> set[str]:
    return {v.rule for v in lint_model(model).violations}


def test_lint_accepts_a_clean_graph():
    assert lint_model(_qdq_model()).passed


def test_lint_names_each_broken_rule():
    assert "zero-point" in _rules(_qdq_model(zero_point=3))
    assert "scale-positive" in _rules(_qdq_model(act_scale=(-0.1,)))
    assert "per-channel-activation" in _rules(_qdq_model(act_scale=(0.1,) * 8))
    assert "opset" in _rules(_qdq_model(opset=13))
    assert "signed-int" in _rules(_qdq_model(q_type=TensorProto.UINT8))
    assert "block-type" in _rules(_qdq_model(block_size=64, opset=21))  # INT8 blocks
    assert "block-size" in _rules(_qdq_model(block_size=32, weight_type=TensorProto.INT4, opset=21))
    assert "opset-int4" in _rules(_qdq_model(block_size=64, weight_type=TensorProto.INT4, opset=17))
    assert lint_model(_qdq_model(block_size=64, weight_type=TensorProto.INT4, opset=21)).passed
    report = lint_model(_qdq_model(zero_point=3))
    assert any(v.node == "act_q" and "shiftIsAllZeros" in v.message for v in report.violations)


# --- one hand-made graph per lint rule (issue 10: every rule code must be seen to fire) -------------

_F32, _I8, _I4 = TensorProto.FLOAT, TensorProto.INT8, TensorProto.INT4


def _const(name, values, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(values, dtype), name)


def _int4(name, shape, value=1):
    return helper.make_tensor(name, _I4, list(shape), [value] * int(np.prod(shape, dtype=int)))


def _graph(nodes, inits, inputs, outputs=(("y", _F32, [1, 2, 4]),), opset=17):
    """A model from ``nodes``; ``inputs`` and ``outputs`` are (name, type, shape)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*o) for o in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _q(x="x", s="s", zp="zp", out="xq", name="act_q", **kw):
    return helper.make_node("QuantizeLinear", [x, s, zp] if zp else [x, s], [out], name=name, **kw)


def _dq(x="xq", s="s", zp="zp", out="xd", name="act_dq", **kw):
    return helper.make_node("DequantizeLinear", [x, s, zp] if zp else [x, s], [out], name=name, **kw)


def _mm(a="xd", b="wd", op="MatMul", **kw):
    return helper.make_node(op, [a, b], ["y"], name=op.lower(), **kw)


_ACT = [_const("s", 0.1), _const("zp", 0, np.int8)]  # per-tensor INT8 activation scale, zero-point
_W8 = [_const("W", np.ones((8, 4)), np.int8), _const("ws", np.full(4, 0.05))]  # (K, N), per channel
_X = [("x", _F32, [1, 2, 8])]
_W_DQ = _dq("W", "ws", None, "wd", "w_dq", axis=1)


def _scale_from_input():
    return _graph([_q(s="s_in"), _dq(s="s_in"), _W_DQ, _mm()], [_ACT[1], *_W8], [*_X, ("s_in", _F32, [])])


def _zero_point_from_input():
    nodes = [_q(zp="zp_in"), _dq(zp="zp_in"), _W_DQ, _mm()]
    return _graph(nodes, [_ACT[0], *_W8], [*_X, ("zp_in", _I8, [])])


def _no_zero_point():  # QuantizeLinear without a zero-point outputs UINT8
    return _graph([_q(zp=None), _dq(zp=None), _W_DQ, _mm()], [_ACT[0], *_W8], _X)


def _int4_activation():
    inits = [_ACT[0], _int4("zp", [], 0), _int4("W", (128, 4)), _const("ws", np.full((2, 4), 0.05))]
    nodes = [_q(), _dq(), _dq("W", "ws", None, "wd", "w_dq", axis=0, block_size=64), _mm()]
    return _graph(nodes, inits, [("x", _F32, [1, 2, 128])], opset=21)


def _blocked_matmul_axis1():  # INT4 weight (K=8, N=128) blocked along N instead of K
    inits = [*_ACT, _int4("W", (8, 128)), _const("ws", np.full((8, 2), 0.05))]
    nodes = [_q(), _dq(), _dq("W", "ws", None, "wd", "w_dq", axis=1, block_size=64), _mm()]
    return _graph(nodes, inits, _X, outputs=(("y", _F32, [1, 2, 128]),), opset=21)


def _blocked_gemm(axis):  # Gemm(transB=1): the weight is (N=128, K=64), its blocks belong on axis 1
    inits = [*_ACT, _int4("W", (128, 64)), _const("ws", np.full((2, 64) if axis == 0 else (128, 1), 0.05))]
    nodes = [_q(), _dq(), _dq("W", "ws", None, "wd", "w_dq", axis=axis, block_size=64)]
    nodes.append(_mm(op="Gemm", transB=1))
    return _graph(nodes, inits, [("x", _F32, [2, 64])], outputs=(("y", _F32, [2, 128]),), opset=21)


def _q_as_output():  # the quantized tensor leaves the graph with no DequantizeLinear
    return _graph([_q()], _ACT, _X, outputs=(("xq", _I8, [1, 2, 8]),))


def _q_into_relu():
    nodes = [_q(), helper.make_node("Relu", ["xq"], ["y"], name="relu")]
    return _graph(nodes, _ACT, _X, outputs=(("y", _I8, [1, 2, 8]),))


def _requantize_scale():
    return _graph([_q(), _dq(s="s2"), _W_DQ, _mm()], [*_ACT, _const("s2", 0.2), *_W8], _X)


def _requantize_axis():  # a float weight quantized per channel on axis 1, dequantized on axis 0
    inits = [
        *_ACT,
        _const("Wf", np.ones((8, 4))),
        _const("ws", np.full(4, 0.05)),
        _const("wzp", [0] * 4, np.int8),
    ]
    nodes = [
        _q(),
        _dq(),
        _q("Wf", "ws", "wzp", "wq", "w_q", axis=1),
        _dq("wq", "ws", "wzp", "wd", "w_dq", axis=0),
    ]
    return _graph([*nodes, _mm()], inits, _X)


def _dq_of_input():  # an INT8 graph input dequantized: no QuantizeLinear before it
    return _graph([_dq(), _W_DQ, _mm()], [*_ACT, *_W8], [("xq", _I8, [1, 2, 8])])


def _int4_per_channel():
    inits = [*_ACT, _int4("W", (8, 4)), _const("ws", np.full(4, 0.05))]
    return _graph([_q(), _dq(), _W_DQ, _mm()], inits, _X, opset=21)


def _qdq_into_layernorm():
    nodes = [_q(), _dq(), helper.make_node("LayerNormalization", ["xd", "g"], ["y"], name="ln", axis=-1)]
    return _graph(nodes, [*_ACT, _const("g", np.ones(8))], _X, outputs=(("y", _F32, [1, 2, 8]),))


def _weight_only_int8():
    return _graph([_W_DQ, _mm("x")], _W8, _X)


def _weight_only_int4():  # W4A16: INT4 weight, float activation; what TensorRT's INT4 GEMMs want
    inits = [_int4("W", (128, 4)), _const("ws", np.full((2, 4), 0.05))]
    nodes = [_dq("W", "ws", None, "wd", "w_dq", axis=0, block_size=64), _mm("x")]
    return _graph(nodes, inits, [("x", _F32, [1, 2, 128])], opset=21)


def _float_weight():
    return _graph([_q(), _dq(), _mm(b="Wf")], [*_ACT, _const("Wf", np.ones((8, 4)))], _X)


def _one_sided(quantized_side):
    if quantized_side == "a":
        return _graph([_q(), _dq(), _mm(b="x2")], _ACT, [*_X, ("x2", _F32, [1, 8, 4])])
    return _graph([_q(), _dq(), _mm("x2", "xd")], _ACT, [("x", _F32, [1, 8, 4]), ("x2", _F32, [1, 2, 8])])


def _scale_from_constant_node():  # a Constant node is as constant as an initializer
    nodes = [helper.make_node("Constant", [], ["s"], value=_const("sv", 0.1)), _q(), _dq(), _W_DQ, _mm()]
    return _graph(nodes, [_ACT[1], *_W8], _X)


def _case(rule, severity, make, exact=True, label=None):
    return pytest.param(rule, severity, make, exact, id=label or rule)


# The graph breaks exactly ``rule`` (no other error; no warning either, for a warning rule) unless
# ``exact`` is False.
LINT_CASES = [
    _case("opset", "error", lambda: _qdq_model(opset=13)),
    _case("opset-int4", "error", lambda: _qdq_model(block_size=64, weight_type=_I4, opset=17)),
    _case("scale-constant", "error", _scale_from_input),
    _case("scale-positive", "error", lambda: _qdq_model(act_scale=(-0.1,)), label="scale-negative"),
    _case("scale-positive", "error", lambda: _qdq_model(act_scale=(0.0,)), label="scale-zero"),
    _case("scale-positive", "error", lambda: _qdq_model(act_scale=(float("nan"),)), label="scale-nan"),
    _case("zero-point", "error", lambda: _qdq_model(zero_point=3), label="zero-point-nonzero"),
    _case("zero-point", "error", _zero_point_from_input, label="zero-point-not-constant"),
    _case("signed-int", "error", lambda: _qdq_model(q_type=TensorProto.UINT8), label="signed-int-uint8"),
    _case("signed-int", "error", _no_zero_point, label="signed-int-default-uint8"),
    _case("per-channel-activation", "error", lambda: _qdq_model(act_scale=(0.1,) * 8)),
    _case("int4-activation", "error", _int4_activation),  # (also warns int4-unblocked)
    _case("block-type", "error", lambda: _qdq_model(block_size=64, opset=21)),
    _case("block-size", "error", lambda: _qdq_model(block_size=32, weight_type=_I4, opset=21)),
    _case("block-axis", "error", _blocked_matmul_axis1, label="block-axis-matmul"),
    _case("block-axis", "error", lambda: _blocked_gemm(axis=0), label="block-axis-gemm-transB"),
    _case("q-without-dq", "error", _q_as_output, label="q-without-dq-output"),
    _case("q-without-dq", "error", _q_into_relu, label="q-without-dq-relu"),
    _case("requantize", "error", _requantize_scale, label="requantize-scale"),
    # Not exact: lint also calls the DQ of a quantized constant weight a per-channel activation.
    _case("requantize", "error", _requantize_axis, exact=False, label="requantize-axis"),
    _case("dq-without-q", "error", _dq_of_input),
    _case("int4-unblocked", "warning", _int4_per_channel),
    _case("unfused-qdq", "warning", _qdq_into_layernorm),
    _case("weight-only-int8", "warning", _weight_only_int8),
    _case("float-weight", "warning", _float_weight),
    _case("one-sided", "warning", lambda: _one_sided("a"), label="one-sided-activation"),
    _case("one-sided", "warning", lambda: _one_sided("b"), label="one-sided-weight"),
]


@pytest.mark.parametrize(("rule", "severity", "make", "exact"), LINT_CASES)
def test_lint_flags_each_rule(rule, severity, make, exact):
    model = make()
    if rule != "opset-int4":  # INT4 before opset 21 is itself invalid ONNX; the rest is valid ONNX
        onnx.checker.check_model(model, full_check=True)
    report = lint_model(model)
    errors = {v.rule for v in report.violations}
    warnings = {v.rule for v in report.warnings}
    found = errors if severity == "error" else warnings
    assert rule in found, report.to_json()
    if exact:
        assert found == {rule}, report.to_json()
    if severity == "warning":
        assert report.passed and not errors  # warnings never fail the lint
    named = {n.name for n in model.graph.node} | {"model"}
    hits = [v for v in report.violations + report.warnings if v.rule == rule]
    assert all(v.severity == severity and v.node in named and len(v.message) > 20 for v in hits)
    from sardfq_export.exporters.lint import format_report

    assert f"[{rule}]" in format_report(report)


@pytest.mark.parametrize(
    "make",
    [
        _qdq_model,
        lambda: _qdq_model(block_size=64, weight_type=_I4, opset=21),
        lambda: _blocked_gemm(axis=1),
        _weight_only_int4,
        _scale_from_constant_node,
    ],
    ids=["int8", "int4-matmul", "int4-gemm-transB", "w4a16", "constant-node-scale"],
)
def test_lint_passes_clean_graphs(make):
    model = make()
    onnx.checker.check_model(model, full_check=True)
    report = lint_model(model)
    assert report.passed and not report.warnings, report.to_json()
    assert report.stats["quantize_linear"] == sum(n.op_type == "QuantizeLinear" for n in model.graph.node)


def test_lint_cases_cover_every_rule():
    """Every rule code lint.py can emit has a graph above that fires it, with the right severity."""
    import ast
    import inspect

    from sardfq_export.exporters import lint

    emitted = {
        (call.args[0].value, "error" if call.func.attr == "error" else "warning")
        for call in ast.walk(ast.parse(inspect.getsource(lint)))
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr in ("error", "warn")
        and call.args
        and isinstance(call.args[0], ast.Constant)
    }
    assert emitted == {(case.values[0], case.values[1]) for case in LINT_CASES}


def test_lint_command_exit_codes(w8a8, tmp_path, capsys):
    _, _, _, path, _ = w8a8
    assert main(["lint", str(path)]) == 0
    assert "PASS" in capsys.readouterr().out
    bad = tmp_path / "bad.onnx"
    onnx.save(_qdq_model(zero_point=3), str(bad))
    assert main(["lint", str(bad), "--json"]) == 2
    out = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert out["passed"] is False and any("zero-point" in v for v in out["violations"])
    assert main(["lint", str(tmp_path / "missing.onnx")]) == 2


def test_lint_of_an_empty_or_non_onnx_file_is_one_line_naming_it(tmp_path, capsys):
    """A 0-byte file parses as an empty ModelProto: it was linted as "opset 0" (exit 2 on a violation)."""
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert main(["lint", str(empty)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and str(empty) in err[0] and "empty (0 bytes)" in err[0], err
    assert "opset" not in captured.out + captured.err and "Traceback" not in captured.err
    assert main(["lint", str(empty), "--json"]) == 2 and capsys.readouterr().out == ""
    # bytes protobuf also takes for an empty model (an unknown varint field): no graph, no opset
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x00")  # field 1 (ir_version) = 0
    assert main(["lint", str(junk)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(junk) in err[0] and "not an ONNX model" in err[0], err
    with pytest.raises(UserInputError, match="empty"):
        lint_model(empty)  # the API says the same


# --- TensorRT without TensorRT ------------------------------------------------------------------------


def test_tensorrt_fallback_writes_the_trtexec_command(w8a8, tmp_path, monkeypatch):
    import sardfq_export.exporters.tensorrt as trt_mod

    monkeypatch.setattr(trt_mod, "tensorrt_status", lambda: (False, "TensorRT is not installed"))
    _, _, _, path, _ = w8a8
    with pytest.raises(MissingComponentError) as err:
        trt_mod.build_engine(path, tmp_path / "model.engine", "input", (3, 32, 32))
    assert err.value.exit_code == 4 and "trtexec --onnx=" in str(err.value) and "\n" not in str(err.value)
    script = (tmp_path / "build_engine.sh").read_text()
    assert (
        "--saveEngine=" in script
        and "--minShapes=input:1x3x32x32" in script
        and "--timingCacheFile=" in script
    )


@pytest.mark.tensorrt
def test_tensorrt_engine_matches_fakequant(w8a8, tmp_path):
    from sardfq_export.exporters.tensorrt import build_engine
    from sardfq_export.validation.fidelity import compare_logits
    from sardfq_export.validation.runners import TensorRTRunner

    _, qmodel, held, path, _ = w8a8
    res = build_engine(path, tmp_path / "model.engine", "input", (3, 32, 32))
    runner = TensorRTRunner(str(res.engine))
    with torch.no_grad():
        want = qmodel(held)
    cmp = compare_logits(runner(held), want)
    assert cmp["agreement"] >= 0.99 and cmp["cosine"] >= 0.999


def test_quantized_patch_embed_and_head_export(tmp_path):
    """Conv (4-D) and 2-D Gemm weights get INT8 codes + DequantizeLinear too (schemes that opt in)."""
    scheme = calibrators.get_scheme("w8a8").with_options(
        name="w8a8_all", quantize_head=True, quantize_patch_embed=True
    )
    torch.manual_seed(0)
    qmodel = calibrators.quantize_model(tiny_vit(), scheme)
    calibrators.calibrate(qmodel, torch.randn(16, 3, 32, 32), progress=False)
    res = export_onnx(qmodel, tmp_path / "m.onnx", (3, 32, 32))
    assert res.weights == {"int8-per-channel": N_LINEARS + 2} and res.lint.passed
    agreement, cos_mean = _parity(qmodel, tmp_path / "m.onnx", torch.randn(32, 3, 32, 32), worst=0.99)
    assert agreement >= 0.95 and cos_mean >= 0.999
