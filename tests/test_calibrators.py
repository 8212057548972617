"""calibrators: quantizer numerics, schemes, instrumentation structure, bit-exact identity, ranges."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from conftest import tiny_vit
from sardfq_export.calibrators.quantizer import TensorQuantizer

from sardfq_export import calibrators as C
from sardfq_export.core.errors import UserInputError

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10)


def tiny_swin(**kw):
    args = dict(img_size=56, window_size=7, depths=(2, 2), num_heads=(2, 4), embed_dim=64, num_classes=10)
    args.update(kw)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **args).eval()


def tiny_vit_small(**kw):
    """vit_small with LayerScale and register tokens (prefix tokens beyond CLS)."""
    args = dict(TINY, init_values=1e-2, reg_tokens=2, no_embed_class=True)
    args.update(kw)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **args).eval()


def tiny_deit_distilled():
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **TINY).eval()


# -- quantizer numerics --------------------------------------------------------------------------
def _manual_fq(x, s, bits):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x / s), lo, hi) * s  # torch.round = round-half-to-even


def test_8bit_per_tensor_matches_round_half_even_and_roundtrips_within_half_step():
    q = TensorQuantizer(8)
    q.set_scale(torch.tensor(0.5))
    ties = torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75])  # x/s = .5, 1.5, 2.5, -.5, -1.5
    assert torch.equal(q(ties), torch.tensor([0.0, 1.0, 1.0, -0.0, -1.0]))
    x = torch.randn(1000) * 20
    y = q(x)
    assert torch.allclose(y, _manual_fq(x, 0.5, 8))
    inside = x.abs() < 0.5 * 127
    assert ((y - x)[inside].abs() <= 0.25 + 1e-6).all()
    assert y.max() <= 63.5 and y.min() >= -64


def test_4bit_is_the_4bit_grid_inside_the_int8_container():
    q = TensorQuantizer(4)
    q.set_amax(torch.tensor(7.0))  # scale 1
    x = torch.linspace(-12, 12, 97)
    assert torch.equal(q(x), _manual_fq(x, 1.0, 4))
    assert q(x).min() == -8 and q(x).max() == 7


def test_per_channel_and_per_block_weight_quantizers():
    w = torch.randn(6, 128)
    qc = TensorQuantizer(4, C.PerChannel(0), shape=(6,), role="weight")
    C.calibrate_weight(qc, w)
    s = w.abs().amax(1) / 7
    assert torch.allclose(qc(w), _manual_fq(w, s[:, None], 4))
    qb = TensorQuantizer(4, C.PerBlock(64), shape=(6, 2), role="weight")
    C.calibrate_weight(qb, w)
    sb = w.view(6, 2, 64).abs().amax(-1) / 7
    assert torch.allclose(qb.scale, sb)
    expect = _manual_fq(w.view(6, 2, 64), sb[..., None], 4).view(6, 128)
    assert torch.allclose(qb(w), expect)


def test_weight_mse_beats_minmax_at_4_bits():
    w = torch.randn(32, 256)
    w[:, 0] *= 8  # an outlier column
    errs = {}
    for method in C.WEIGHT_METHODS:
        q = TensorQuantizer(4, C.PerChannel(0), shape=(32,), role="weight")
        C.calibrate_weight(q, w, method)
        errs[method] = ((q(w) - w) ** 2).sum()
    assert errs["mse"] < errs["minmax"]


def test_disabled_or_uncalibrated_quantizer_returns_its_input_object():
    x = torch.randn(4, 4)
    q = TensorQuantizer(8)
    assert q(x) is x and not q.is_calibrated
    q.set_scale(torch.tensor(0.1))
    assert q.is_calibrated and q(x) is not x
    q.enabled = False
    assert q(x) is x


def test_log2_quantizer_levels():
    q = TensorQuantizer(4, kind="log2")
    q.set_amax(torch.tensor(1.0))
    p = torch.tensor([1.0, 0.5, 0.3, 0.25, 2.0**-20, 0.0])
    assert torch.equal(q(p), torch.tensor([1.0, 0.5, 0.25, 0.25, 0.0, 0.0]))


# -- schemes ---------------------------------------------------------------------------------------
def test_scheme_registry_roundtrip_and_export_guard():
    assert set(C.SCHEMES) >= {"w8a8", "w4a16", "w4a8", "w4a4", "research_w4a4_log2"}
    assert C.get_scheme(None).name == "w8a8"
    for s in C.SCHEMES.values():
        assert C.Scheme.from_dict(s.to_dict()) == s and str(s)
    assert C.get_scheme("w4a16").w_granularity == C.PerBlock(128) and C.get_scheme("w4a16").a_bits is None
    with pytest.raises(UserInputError, match="w8a8"):
        C.get_scheme("w3a3")
    research = C.get_scheme("research_w4a4_log2")
    assert not research.exportable
    with pytest.raises(UserInputError, match="research"):
        research.assert_exportable()
    for name in ("w8a8", "w4a16", "w4a8", "w4a4"):
        C.get_scheme(name).assert_exportable()
    with pytest.raises(UserInputError):
        C.PerBlock(32)
    with pytest.raises(UserInputError):
        C.Scheme("bad", 8, C.PerBlock(64), 8)


# -- instrumentation -------------------------------------------------------------------------------
MODELS = {"deit_tiny": tiny_vit, "vit_small_ls_reg": tiny_vit_small, "swin_tiny": tiny_swin,
          "deit_tiny_distilled": tiny_deit_distilled}  # fmt: skip


def _input(model):
    return torch.randn(
        4,
        *model.pretrained_cfg["input_size"][:1],
        model.patch_embed.img_size[0],
        model.patch_embed.img_size[1],
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize("family", ["deit_tiny", "swin_tiny"])  # the two quantizer layouts (suite time)
def test_frozen_weights_give_bit_identical_logits_and_step_aside(family):
    from sardfq_export.calibrators.quantizer import frozen_weights

    model = MODELS[family]()
    x = _input(model)
    for scheme in C.SCHEMES:  # per-channel, per-block INT4 and 4-bit-in-INT8 weights
        qmodel = C.quantize_model(model, scheme)
        C.calibrate(qmodel, [x], method="minmax", progress=False)
        with torch.no_grad():
            ref = qmodel(x)
            with frozen_weights(qmodel):
                assert torch.equal(qmodel(x), ref), scheme
                C.set_quantizers_enabled(qmodel, False)  # disabled inside the block: the float weights
                float_out = qmodel(x)
                C.set_quantizers_enabled(qmodel, True)
            C.set_quantizers_enabled(qmodel, False)
            assert torch.equal(float_out, qmodel(x)) and not torch.equal(float_out, ref)
            C.set_quantizers_enabled(qmodel, True)
        q = next(m.weight_quantizer for m in qmodel.modules() if hasattr(m, "weight_quantizer"))
        with frozen_weights(qmodel):
            assert q._frozen is not None
            w = next(m.weight for m in qmodel.modules() if getattr(m, "weight_quantizer", None) is q)
            assert q(w).grad_fn is not None  # with grad (training) it is the live op, not the cache
        assert q._frozen is None


@pytest.mark.parametrize("bits", [8, 4])
def test_cpu_activation_fake_quant_equals_the_aten_op_bit_for_bit_and_keeps_its_gradient(bits):
    """Evaluation on a CPU computes the per-tensor fake-quant with vectorized ops (the ATen CPU
    kernel is scalar); every value must be the op's own, ties and the clip included, and with a
    gradient to carry the op itself runs (its straight-through mask)."""
    from sardfq_export.calibrators.quantizer import _fq_tensor

    gen = torch.Generator().manual_seed(0)
    for scale in (0.0123, 0.5, 3.7e-3, 1 / 3, 1.0):
        s = torch.tensor(scale)
        x = 3 * torch.randn(2, 65, 384, generator=gen)
        x[0, 0, :300] = (torch.arange(300) - 150 + 0.5) * s  # exact ties, and values past the clip
        x[1, 0, :5] = torch.tensor([float("nan"), -s / 4, -0.0, float("inf"), -float("inf")])
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        clipped = torch.clamp(x, min=s * lo, max=s * hi) if bits < 8 else x
        ref = torch.fake_quantize_per_tensor_affine(clipped, s, torch.zeros((), dtype=torch.int32), -128, 127)
        with torch.no_grad():
            fast = _fq_tensor(x, s, bits)
        # the same bits: ATen's NaN → -128·scale and +0.0 (not -0.0) for small negatives included
        assert torch.equal(fast.view(torch.int32), ref.view(torch.int32)), scale
        assert not fast[1, 0, 0].isnan() and not fast[1, 0, 1].signbit()
        xg, xa = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out = _fq_tensor(xg, s, bits)
        out.sum().backward()
        ca = torch.clamp(xa, min=s * lo, max=s * hi) if bits < 8 else xa
        torch.fake_quantize_per_tensor_affine(
            ca, s, torch.zeros((), dtype=torch.int32), -128, 127
        ).sum().backward()
        assert torch.equal(out.detach(), ref) and out.grad_fn is not None
        assert torch.equal(xg.grad, xa.grad) and 0 < xg.grad.sum() < xg.numel(), scale  # a real mask


def test_cpu_fake_quant_fast_path_is_taken_only_without_gradient_or_tracing(monkeypatch):
    """Evaluation skips ATen's op; a trace (the ONNX export) records the op itself (its Q/DQ)."""
    from sardfq_export.calibrators.quantizer import _fq_tensor

    s, x = torch.tensor(0.1), torch.randn(4, 8)
    expected = torch.fake_quantize_per_tensor_affine(x, s, torch.zeros((), dtype=torch.int32), -128, 127)
    traced = torch.jit.trace(lambda t: _fq_tensor(t, s, 8), (x,))
    assert "fake_quantize_per_tensor_affine" in str(traced.graph)
    assert torch.equal(traced(x), expected)

    def refuse(*args, **kwargs):
        raise AssertionError("ATen's fake-quant op ran in a plain evaluation")

    monkeypatch.setattr(torch, "fake_quantize_per_tensor_affine", refuse)
    with torch.no_grad():
        assert torch.equal(_fq_tensor(x, s, 8), expected)
    with pytest.raises(AssertionError, match="ATen's fake-quant op ran"):
        _fq_tensor(x.clone().requires_grad_(True), s, 8)


def _block_linears(model) -> list[nn.Module]:
    out = []
    for name in C.block_names(model):
        out += [m for m in model.get_submodule(name).modules() if isinstance(m, nn.Linear)]
    return out


@pytest.mark.parametrize("scheme", list(C.SCHEMES))
@pytest.mark.parametrize("family", list(MODELS))
def test_every_block_linear_is_quantized_as_the_scheme_says(family, scheme):
    torch.manual_seed(0)  # random-init weights: a fixed draw, so the closeness check is repeatable
    model = MODELS[family]()
    s = C.get_scheme(scheme)
    x = _input(model)
    ref = model(x)
    qmodel = C.quantize_model(model, s)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear)), (
        "float model touched"
    )
    linears = _block_linears(qmodel)
    n_blocks = len([n for n in C.block_names(qmodel) if "downsample" not in n])
    n_merge = len(C.block_names(qmodel)) - n_blocks
    assert len(linears) == 4 * n_blocks + n_merge  # qkv, proj, fc1, fc2 per block (+ PatchMerging)
    for m in linears:
        assert isinstance(m, C.QuantLinear)
        assert m.weight_quantizer.enabled and m.weight_quantizer.bits == s.w_bits
        assert m.input_quantizer.enabled == (s.a_bits is not None)
        if s.a_bits is not None:
            assert m.input_quantizer.bits == s.a_bits and m.input_quantizer.scale.shape == ()
        if isinstance(s.w_granularity, C.PerBlock):
            assert isinstance(m.weight_quantizer.granularity, C.PerBlock)
            assert m.weight_quantizer.scale.shape == (
                m.out_features,
                m.in_features // m.weight_quantizer.granularity.size,
            )
        else:
            assert m.weight_quantizer.scale.shape == (m.out_features,)
    summary = C.quant_summary(qmodel)
    n_heads = 2 if family == "deit_tiny_distilled" else 1
    assert summary["quant_linear"] == len(linears) + (n_heads if s.quantize_head else 0)
    assert summary["quant_conv"] == int(s.quantize_patch_embed)
    attn = [m for m in qmodel.modules() if isinstance(m, (C.QuantAttention, C.QuantWindowAttention))]
    assert len(attn) == n_blocks
    assert all(a.softmax_quantizer.enabled == s.quantize_attn_matmuls for a in attn)
    assert all(a.softmax_quantizer.kind == ("log2" if s.log2_softmax else "int") for a in attn)
    # uncalibrated → still the float model, bit for bit; calibrated → runs and stays close
    assert torch.equal(qmodel(x), ref)
    C.calibrate(qmodel, [x], method="minmax", progress=False)
    y = qmodel(x)
    assert y.shape == ref.shape and torch.isfinite(y).all()
    assert torch.nn.functional.cosine_similarity(y, ref).mean() > 0.8


@pytest.mark.parametrize("family", list(MODELS))
def test_all_quantizers_disabled_is_the_float_model_bit_for_bit(family):
    model = MODELS[family]()
    x = _input(model)
    ref = model(x)
    for i, scheme in enumerate(C.SCHEMES):
        qmodel = C.quantize_model(model, scheme)
        C.calibrate(qmodel, [x], method="mse" if i == 0 else "minmax", progress=False)
        assert not torch.equal(qmodel(x), ref)
        C.set_quantizers_enabled(qmodel, False)
        assert torch.equal(qmodel(x), ref), scheme
        C.set_quantizers_enabled(qmodel, True)
        assert not torch.equal(qmodel(x), ref)


@pytest.mark.parametrize("family", ["deit_tiny", "swin_tiny"])
def test_explicit_attention_matches_timm_fused_attention(family):
    model = MODELS[family]()
    x = _input(model)
    ref = model(x)
    qmodel = C.quantize_model(model, "w8a8")
    C.set_explicit_attention(qmodel, True)
    assert torch.allclose(qmodel(x), ref, atol=1e-5, rtol=1e-5)
    # against timm's own non-fused path the explicit one is the same ops: bit for bit
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    assert torch.equal(qmodel(x), model(x))


def test_real_size_counts():
    for name, linears in (("deit_tiny_patch16_224", 48), ("swin_tiny_patch4_window7_224", 51)):
        model = timm.create_model(name, pretrained=False).eval()
        qmodel = C.quantize_model(model, "w8a8")
        assert C.quant_summary(qmodel) == {
            "quant_linear": linears,
            "quant_conv": 0,
            "float_linear": 1,
            "enabled_activation": linears,
            "enabled_weight": linears,
        }


def test_unknown_block_type_fails_naming_it():
    from timm.models.vision_transformer import ResPostBlock

    model = tiny_vit()
    model.blocks[1] = ResPostBlock(64, 2)
    with pytest.raises(C.UnsupportedModelError, match="ResPostBlock"):
        C.quantize_model(model)

    class Weird(nn.Module):
        def forward(self, x):
            return x

    model = tiny_vit()
    model.blocks[0].mlp.act = nn.Sequential(nn.Conv1d(1, 1, 1))
    with pytest.raises(C.UnsupportedModelError, match="Conv1d"):
        C.quantize_model(model)
    model = tiny_vit()
    model.blocks[0].attn = Weird()
    with pytest.raises(C.UnsupportedModelError, match="Weird"):
        C.quantize_model(model)
    with pytest.raises(C.UnsupportedModelError, match="Sequential"):
        C.quantize_model(nn.Sequential(nn.Linear(2, 2)))


# -- range calibration -----------------------------------------------------------------------------
def test_histogram_collector_doubles_range_exactly_and_methods_order():
    col = C.HistogramCollector(num_bins=64)
    a, b = torch.randn(10000), torch.randn(10000) * 5
    col.collect(a)
    col.collect(b)
    assert col.hist.sum() == 20000 and col.range >= float(b.abs().max())
    assert col.amax == torch.maximum(a.abs().max(), b.abs().max())
    q = TensorQuantizer(8)
    mm = col.compute_amax("minmax", q)
    pc = col.compute_amax("percentile", q, 99.0)
    ms = col.compute_amax("mse", TensorQuantizer(4))
    assert pc < mm and ms < mm


def test_the_range_search_error_exponent_widens_the_clip_on_a_heavy_tail():
    """p > 2 weighs the clipped tail more: on a Laplace sample each larger p clips no narrower,
    and p = 2 is exactly the squared error's clip, recomputed here by brute force."""
    gen = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (20000,), generator=gen) * 2 - 1
    col = C.HistogramCollector(num_bins=512)
    col.collect(torch.empty(20000).exponential_(generator=gen) * sign)  # Laplace(0, 1)
    q4 = TensorQuantizer(4)
    clips = [float(col.compute_amax("mse", q4, norm=p)) for p in (1.0, 2.0, 3.0, 4.0)]
    assert clips == sorted(clips) and clips[0] < clips[-1] < float(col.amax)
    v, n = col.centers(), col.hist
    cands = float(col.amax) * torch.linspace(0.02, 1.0, 200, dtype=torch.float64)
    err = [float((((v - (v / (c / 7)).round().clamp(-8, 7) * (c / 7)) ** 2) * n).sum()) for c in cands]
    assert clips[1] == float(cands[err.index(min(err))].float())


def test_calibrate_accepts_loops_tensors_and_iterables():
    model = tiny_vit()
    x = _input(model)
    scales = []
    for data in ([x[:2], x[2:]], x, ((x, None),), lambda m: m(x)):
        qmodel = C.quantize_model(model, "w8a8")
        C.calibrate(qmodel, data, method="minmax", progress=False)
        assert all(q.is_calibrated for _, q in C.iter_quantizers(qmodel) if q.enabled)
        scales.append(
            torch.stack([q.scale for n, q in C.iter_quantizers(qmodel) if n.endswith("input_quantizer")])
        )
    assert all(torch.equal(s, scales[0]) for s in scales)
    with pytest.raises(UserInputError, match="empty"):
        C.calibrate(C.quantize_model(model), [], progress=False)
    with pytest.raises(UserInputError, match="range method"):
        C.calibrate(C.quantize_model(model), [x], method="kl", progress=False)


def test_bias_correction_measures_each_linear_in_the_folded_models_units(monkeypatch):
    # SmoothQuant's V → proj fold divides qkv's V rows by its factors: the reference each Linear's
    # output is corrected towards must be in those units (on DINOv2, correcting towards the float
    # model's own qkv outputs left 25% top-1 at w8a8 with SmoothQuant α 0.5).
    import copy

    import sardfq_export as sx

    model = tiny_vit_small()
    cal = sx.synthesize(model, method="noise", num_images=8, progress=False)
    seen = {}
    real = C.correct_biases

    def spy(qmodel, float_model, data, progress=False):
        seen["q"], seen["ref"] = copy.deepcopy(qmodel), float_model
        return real(qmodel, float_model, data, progress=progress)

    monkeypatch.setattr(C, "correct_biases", spy)
    sx.quantize(model, cal, scheme="w8a8", smoothquant=0.5, bias_correct=True, progress=False)
    folded = seen["q"]
    C.set_quantizers_enabled(folded, False)
    outs = {}
    for tag, m in (("folded", folded), ("ref", seen["ref"]), ("float", model)):
        h = m.blocks[0].attn.qkv.register_forward_hook(lambda mod, a, o, t=tag: outs.__setitem__(t, o))
        with torch.no_grad():
            m(cal.images)
        h.remove()
    assert torch.allclose(outs["ref"], outs["folded"], atol=1e-5)
    assert not torch.allclose(outs["float"], outs["folded"], atol=1e-2)  # the fold did rescale V
