"""Activation-aware scaling of 4-bit weights (calibrators.awq)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit
from test_gptq import _exports_lints_runs_and_reloads

from sardfq_export import calibrators


def _with_outliers():
    """A tiny ViT whose LayerNorm outputs have a few channels 30× the rest, as DINOv2's do (seeded:
    tiny_vit is a random init)."""
    torch.manual_seed(0)
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[0].norm1.weight[3] *= 30
        model.blocks[1].norm2.weight[7] *= 30
    return model


def _logit_error(q, model, x):
    with torch.no_grad():
        ref = model(x)
        return float((q(x) - ref).pow(2).sum() / ref.pow(2).sum())


def test_awq_keeps_the_float_function_and_never_searches_worse_than_nearest():
    model = _with_outliers()
    gen = torch.Generator().manual_seed(3)
    cal, held = torch.randn(16, 3, 32, 32, generator=gen), torch.randn(8, 3, 32, 32, generator=gen)
    q = calibrators.quantize_model(model, calibrators.get_scheme("w4a16").with_options(awq=True))
    summary = calibrators.calibrate(q, cal, weight_method="mse", progress=False)["awq"]
    assert summary["scaled"] == 8  # 2 blocks × (qkv, proj, fc1, fc2)
    assert {r["name"] for r in summary["layers"]} == {
        f"blocks.{b}.{n}" for b in (0, 1) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    # α = 0 (plain rounding) is a candidate, so the chosen factors are never worse on the search data
    assert all(r["error_vs_nearest"] <= 1.0 for r in summary["layers"])
    outlier = {r["name"]: r for r in summary["layers"]}["blocks.0.attn.qkv"]
    assert outlier["alpha"] > 0 and outlier["error_vs_nearest"] < 0.5
    fc2 = q.blocks[0].mlp.fc2
    assert not torch.equal(fc2.input_smooth, torch.ones(fc2.in_features))  # fc2 via the explicit Mul
    calibrators.set_quantizers_enabled(q, False)  # the folds alone keep the float function
    with torch.no_grad():
        torch.testing.assert_close(q(held), model(held), rtol=1e-4, atol=1e-4)
    assert "awq" in str(q.scheme)


def test_awq_lowers_the_held_out_error_of_4_bit_weights_and_exports(tmp_path):
    model = _with_outliers()
    gen = torch.Generator().manual_seed(4)
    cal, held = torch.randn(16, 3, 32, 32, generator=gen), torch.randn(8, 3, 32, 32, generator=gen)
    errors, outlier = {}, {}
    for awq in (False, True):
        q = calibrators.quantize_model(model, calibrators.get_scheme("w4a16").with_options(awq=awq or None))
        calibrators.calibrate(q, cal, weight_method="mse", progress=False)
        errors[awq] = _logit_error(q, model, held)
        layers = calibrators.layer_sensitivity(q, held)["layers"]  # each Linear quantized alone
        outlier[awq] = {r["name"]: r["rel_error"] for r in layers}["blocks.0.attn.qkv"]
    # on images the search never saw: the outlier-fed layer's error, and the whole model's
    assert outlier[True] < 0.5 * outlier[False], outlier
    assert errors[True] < errors[False], errors
    _exports_lints_runs_and_reloads(q, model, held, tmp_path, deployment_graph=True)


def test_awq_with_quantized_activations_keeps_the_function_and_exports(tmp_path):
    """w4a8 (DINOv2's recipe: AWQ, then nearest): fc2's factors go through its explicit Mul *before*
    its INT8 input quantizer, so ONNX Runtime's integer graph must compute what the fake-quant does."""
    model = _with_outliers()
    gen = torch.Generator().manual_seed(5)
    cal, held = torch.randn(16, 3, 32, 32, generator=gen), torch.randn(8, 3, 32, 32, generator=gen)
    q = calibrators.quantize_model(model, calibrators.get_scheme("w4a8").with_options(awq=True))
    summary = calibrators.calibrate(q, cal, weight_method="mse", progress=False)["awq"]
    assert summary["scaled"] == 8 and any(r["alpha"] > 0 for r in summary["layers"])
    fc2 = q.blocks[1].mlp.fc2
    assert not torch.equal(fc2.input_smooth, torch.ones(fc2.in_features))
    calibrators.set_quantizers_enabled(q, False)  # the folds alone keep the float function
    with torch.no_grad():
        torch.testing.assert_close(q(held), model(held), rtol=1e-4, atol=1e-4)
    calibrators.set_quantizers_enabled(q, True)
    _exports_lints_runs_and_reloads(q, model, held, tmp_path, deployment_graph=True)


def test_awq_is_for_4_bit_weights_a_recipe_option_and_a_cli_flag():
    from click.testing import CliRunner

    import sardfq_export as sx
    from sardfq_export.cli.app import cli
    from sardfq_export.models import LoadedModel

    with pytest.raises(sx.UserInputError, match="awq scales 4-bit weights"):
        calibrators.get_scheme("w8a8").with_options(awq=True)
    with pytest.raises(sx.UserInputError, match="choose one"):
        calibrators.get_scheme("w4a16").with_options(awq=True, smoothquant_alpha=0.5)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    q = sx.quantize(_with_outliers(), images, scheme="w4a16", awq=True, progress=False)  # then GPTQ
    assert q.scheme.awq and q.summary["calibration"]["awq"]["scaled"] == 8 and "gptq" in q.summary
    own = LoadedModel(_with_outliers(), "tiny", {"input_size": (3, 32, 32)}, "vit", "random-init",
                      extra={"quantize": {"awq": True}})  # fmt: skip
    assert sx.quantize(own, images, scheme="w4a16", progress=False).scheme.awq  # the model's default
    assert not sx.quantize(own, images, scheme="w8a8", progress=False).scheme.awq  # only for 4-bit weights
    for argv in (["--help"], ["quantize", "--help"]):
        assert "--awq" in CliRunner().invoke(cli, argv).output
