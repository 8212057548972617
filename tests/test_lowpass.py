"""The calibration low-pass (calibrators.lowpass, QuantizeConfig.calib_lowpass, --calib-lowpass)."""

import math

import pytest
import torch

import sardfq_export as sx
from sardfq_export import calibrators as C
from sardfq_export.core.errors import UserInputError


def test_lowpass_removes_pixel_detail_and_keeps_smooth_content():
    h = 64
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(h), indexing="ij")
    checker = ((yy + xx) % 2 * 2 - 1).float().expand(2, 3, h, h)  # the highest frequency there is
    smooth = torch.cos(2 * math.pi * xx / 32).float().expand(2, 3, h, h)  # two periods across
    flat = torch.full((2, 3, h, h), 0.7)
    out = C.lowpass(checker, 0.5)
    assert out[..., 3:-3, 3:-3].abs().max() == 0 and out.abs().max() < 0.025  # averaged away; corners 0.02
    assert (C.lowpass(smooth, 0.5) - smooth).abs().max() < 0.05
    assert torch.allclose(C.lowpass(flat, 0.5), flat, atol=1e-6)
    assert C.lowpass(checker, 1.0) is checker
    for bad in (0.0, 1.5, -0.5):
        with pytest.raises(UserInputError, match="fraction of the image size"):
            C.lowpass(checker, bad)
    with pytest.raises(UserInputError, match="calib_lowpass"):
        sx.QuantizeConfig(calib_lowpass=0.0)


def test_quantize_with_calib_lowpass_is_quantize_on_the_low_passed_images(reference):
    """Through the API the option is exactly the low-pass applied first (GPTQ at w4a16 on the
    reference model: bit-equal logits) and the summary and the resolved config say so."""
    from sardfq_export.core.calibset import CalibSet
    from sardfq_export.data import load_raw, preprocess

    x = preprocess(load_raw("fashion-mnist", "train").images[:8], reference.data_config)
    cal = CalibSet(images=x, targets=torch.softmax(reference.model(x), -1).detach())
    kw = dict(scheme="w4a16", weight_rounding="gptq", progress=False)
    a = sx.quantize(reference, cal, calib_lowpass=0.5, **kw)
    b = sx.quantize(reference, C.lowpass(x, 0.5), **kw)
    plain = sx.quantize(reference, cal, **kw)
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))
        assert not torch.equal(a.model(x), plain.model(x))
    assert a.summary["calib"]["lowpass"] == 0.5 and plain.summary["calib"]["lowpass"] == 1.0
    assert a.config.calib_lowpass == 0.5 and plain.config.calib_lowpass == 1.0  # unset: the model's, 1
