"""4-bit weight blocks nested on each channel's INT8 step (``PerBlock(nested=True)``, ``--weight-block``
on w4a8/w4a4): every block scale is m × the channel's step, m = 1..15, so the weight exports as INT8
per channel (codes q·m) and runs on the INT8 GEMM beside INT8 activations, bit for bit the fake-quant."""

from __future__ import annotations

from dataclasses import replace

import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from onnx import numpy_helper
from sardfq_export.calibrators import PerBlock, PerChannel
from sardfq_export.calibrators.calibrate import NEST_MULTIPLES, calibrate_weight
from sardfq_export.calibrators.quantizer import TensorQuantizer
from sardfq_export.exporters.onnx_export import export_onnx
from sardfq_export.exporters.ort import create_session, op_census

import sardfq_export as sx
from sardfq_export import calibrators


def _two_scale_weight() -> torch.Tensor:
    """Rows of 128 inputs whose second block of 64 is 20× smaller than the first."""
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    w[:, 64:] *= 0.05
    return w


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_nested_scales_are_channel_step_multiples_and_keep_small_blocks(method):
    w = _two_scale_weight()
    nested = TensorQuantizer(4, PerBlock(64, nested=True), shape=(8, 2), role="weight")
    plain = TensorQuantizer(4, PerChannel(0), shape=(8,), role="weight")
    calibrate_weight(nested, w, method)
    calibrate_weight(plain, w, method)
    step = nested.scale.amax(1) / NEST_MULTIPLES
    m = nested.scale / step[:, None]
    # exact multiples 1..15, the large block at all 15 steps, the small one far fewer
    assert NEST_MULTIPLES == 15 and torch.equal(m, m.round()) and torch.equal(m[:, 0], torch.full((8,), 15.0))
    assert int(m[:, 1].max()) <= 3
    # every m × step exact in float32: the significand of the step has 20 bits at most
    mant, _ = torch.frexp(step)
    assert torch.equal(mant * 2**20, (mant * 2**20).round())
    if method == "minmax":  # min-max clips nothing: the 4-bit grid reaches each block's max |w|
        assert bool((w.reshape(16, 64).abs().amax(1) <= 7 * nested.scale.reshape(-1) * (1 + 1e-6)).all())
    # the small block keeps its values: per channel most of them round to zero
    err_nested = (nested(w) - w)[:, 64:].pow(2).sum()
    err_plain = (plain(w) - w)[:, 64:].pow(2).sum()
    assert float(err_nested) < 0.05 * float(err_plain)
    assert float((plain(w)[:, 64:] == 0).float().mean()) > 0.9


@pytest.mark.parametrize("scheme_name", ["w4a8", "w4a4"])
def test_nested_blocks_export_as_int8_per_channel_bit_exact(scheme_name, tmp_path):
    torch.manual_seed(0)
    model = tiny_vit(embed_dim=128)  # qkv/proj/fc1: 128 inputs (1 block), fc2: 512 (4 blocks)
    scheme = replace(calibrators.get_scheme(scheme_name), w_granularity=PerBlock(128, nested=True))
    qmodel = calibrators.quantize_model(model, scheme)
    gen = torch.Generator().manual_seed(0)
    calibrators.calibrate(
        qmodel, torch.randn(32, 3, 32, 32, generator=gen), weight_method="mse", progress=False
    )
    held = torch.randn(64, 3, 32, 32, generator=gen)
    path = tmp_path / "m.onnx"
    res = export_onnx(qmodel, path, (3, 32, 32))
    assert res.lint.passed, res.lint.violations
    assert res.weights == {"int4-block128-in-int8-per-channel": 8}
    assert op_census(path)["int8_gemm"] == 8  # the GEMMs stay INT8

    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    fc2 = qmodel.blocks[0].mlp.fc2
    codes = torch.from_numpy(inits["blocks/0/mlp/fc2/weight_int8"].astype("float32"))
    step = torch.from_numpy(inits["blocks/0/mlp/fc2/weight_scale"])
    with torch.no_grad():
        fq = fc2.weight_quantizer(fc2.weight)
    assert torch.equal(codes * step[:, None], fq)  # bit for bit
    m = (fc2.weight_quantizer.scale / step[:, None]).repeat_interleave(128, dim=1)
    q = codes / m
    assert torch.equal(q, q.round()) and q.min() >= -8 and q.max() <= 7  # 4-bit codes in every block
    assert codes.abs().max() > 8 and codes.min() >= -127  # on the channel's INT8 steps, in the narrow range

    sess = create_session(path)
    got = torch.from_numpy(sess.run(None, {"input": held.numpy()})[0])
    with torch.no_grad():
        want = qmodel(held)
        # the fake-quant model against itself under a relative 1e-6 input change: its own floor. At
        # 4-bit activations a float kernel's last bits move activation codes across rounding
        # boundaries (measured on a 2-core AVX2 EPYC, w4a4: ONNX Runtime's worst cosine 0.9920,
        # the floor's 0.9916; on AVX-512 hosts ONNX Runtime stayed above 0.999): the export cannot
        # be asked to agree better than that.
        noise = torch.randn(held.shape, generator=torch.Generator().manual_seed(1))
        floor = F.cosine_similarity(qmodel(held * (1 + 1e-6 * noise)).double(), want.double(), dim=1)
    cos = F.cosine_similarity(got.double(), want.double(), dim=1)
    assert float((got.argmax(1) == want.argmax(1)).double().mean()) == 1.0
    assert float(cos.min()) >= min(0.999, float(floor.min()))


def test_weight_block_nests_with_activations_and_blocks_int4_without(tmp_path):
    from sardfq_export.models import LoadedModel

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loaded = LoadedModel(tiny_vit(), "tiny", {"input_size": (3, 32, 32)}, "vit", "random-init", extra={})

    def quant(**kw):
        return sx.quantize(loaded, images, weight_rounding="nearest", progress=False, **kw)

    w4a8 = quant(scheme="w4a8", weight_block=128)
    assert w4a8.scheme.w_granularity == PerBlock(128, nested=True)
    assert calibrators.Scheme.from_dict(w4a8.scheme.to_dict()) == w4a8.scheme  # saved with the scheme
    assert "block128 on INT8 channel steps" in str(w4a8.scheme)
    assert quant(scheme="w4a8").scheme.w_granularity == PerChannel(0)  # the scheme's own: per channel
    assert quant(scheme="w4a16", weight_block=64).scheme.w_granularity == PerBlock(64)
    with pytest.raises(sx.UserInputError, match="8-bit weights"):
        quant(scheme="w8a8", weight_block=64)
    res = sx.export(w4a8, tmp_path / "m.onnx")
    # fc2's 256 inputs take blocks of 128, the other Linears' 64 inputs one block of 64; no INT4 type
    assert res.lint.passed and res.opset < 21
    assert res.weights == {"int4-block64-in-int8-per-channel": 6, "int4-block128-in-int8-per-channel": 2}
    # a scheme of free blocks with INT8 activations would need a float GEMM: refused at export
    free = replace(w4a8.scheme, w_granularity=PerBlock(128))
    assert any("weight-only" in p for p in free.export_problems())
    assert not w4a8.scheme.export_problems()
