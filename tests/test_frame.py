"""The calibration frame (calibrators.frame, QuantizeConfig.calib_frame, --calib-frame)."""

import pytest
import torch

import sardfq_export as sx
from sardfq_export import calibrators as C
from sardfq_export.core.errors import UserInputError


def test_frame_sets_the_band_to_one_normalized_grey_per_image_and_keeps_the_inside():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = C.frame(x, 0.25, mean, std, seed=3)
    assert torch.equal(out[..., 4:12, 4:12], x[..., 4:12, 4:12])  # the inside, untouched
    grey = torch.rand(4, generator=torch.Generator().manual_seed(3))  # the seed's greys, in pixel space
    for i in range(4):
        for ch in range(3):
            band = out[i, ch].clone()
            band[4:12, 4:12] = float("nan")
            kept = band[~band.isnan()]
            assert kept.numel() == 16 * 16 - 8 * 8
            want = (grey[i] - mean[ch]) / std[ch]
            assert torch.equal(kept, torch.full_like(kept, want.item()))
    # the same grey in every channel once the normalization is undone: a grey, not a colour
    pixel = out[:, :, 0, 0] * torch.tensor(std) + torch.tensor(mean)
    assert torch.allclose(pixel, grey[:, None].expand(4, 3), atol=1e-6)
    assert torch.equal(C.frame(x, 0.25, mean, std, seed=3), out)  # seeded
    assert not torch.equal(C.frame(x, 0.25, mean, std, seed=4), out)
    assert C.frame(x, 0.0, mean, std) is x
    for bad in (0.5, -0.1, 0.7):
        with pytest.raises(UserInputError, match="fraction of the side"):
            C.frame(x, bad, mean, std)
    for bad in (0.5, -0.1, True):
        with pytest.raises(UserInputError, match="calib_frame"):
            sx.QuantizeConfig(calib_frame=bad)


def test_quantize_with_calib_frame_is_quantize_on_the_framed_images(reference):
    """Through the API the option is exactly the frame applied first (bit-equal logits), seeded by the
    config's seed, and the summary and the resolved config say so."""
    from sardfq_export.core.calibset import CalibSet
    from sardfq_export.data import load_raw, preprocess

    x = preprocess(load_raw("fashion-mnist", "train").images[:8], reference.data_config)
    cal = CalibSet(images=x, targets=torch.softmax(reference.model(x), -1).detach())
    dc = reference.data_config
    kw = dict(scheme="w4a16", weight_rounding="gptq", seed=1, progress=False)
    a = sx.quantize(reference, cal, calib_frame=0.25, **kw)
    b = sx.quantize(reference, C.frame(x, 0.25, dc["mean"], dc["std"], seed=1), **kw)
    plain = sx.quantize(reference, cal, **kw)
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))
        assert not torch.equal(a.model(x), plain.model(x))
    assert a.summary["calib"]["frame"] == 0.25 and plain.summary["calib"]["frame"] == 0.0
    assert a.config.calib_frame == 0.25 and plain.config.calib_frame == 0.0  # unset: the model's, 0


def test_recon_images_original_fits_reconstruction_on_the_unframed_set(reference, monkeypatch):
    """recon_images="original": ranges and GPTQ see the framed images, reconstruction the set as given
    (exactly those tensors); "calib" (the fallback) reconstructs on the framed ones."""
    from sardfq_export import calibrators
    from sardfq_export.data import load_raw, preprocess

    x = preprocess(load_raw("fashion-mnist", "train").images[:8], reference.data_config)
    dc = reference.data_config
    framed = C.frame(x, 0.25, dc["mean"], dc["std"], seed=1)
    seen = []
    real = calibrators.reconstruct_blocks

    def spy(qmodel, float_model, images, **kw):
        seen.append(images.clone())
        return real(qmodel, float_model, images, **{**kw, "iters": 2})

    monkeypatch.setattr(calibrators, "reconstruct_blocks", spy)
    kw = dict(scheme="w4a4", calib_frame=0.25, finetune="recon", seed=1, progress=False)
    orig = sx.quantize(reference, x, recon_images="original", **kw)
    calib = sx.quantize(reference, x, **kw)
    assert torch.equal(seen[0], x) and torch.equal(seen[1], framed)
    assert orig.summary["recon"]["images"] == "original" and calib.summary["recon"]["images"] == "calib"
    assert orig.config.recon_images == "original" and calib.config.recon_images == "calib"
    with torch.no_grad():  # the same ranges and rounding, another fine-tuning: other weights
        assert not torch.equal(orig.model(x), calib.model(x))
    # with KD after reconstruction, only reconstruction takes the originals: KD distils on the framed set
    distilled = []
    real_kd = calibrators.distill

    def spy_kd(qmodel, float_model, data, **kw):
        distilled.append(data.images.clone())
        return real_kd(qmodel, float_model, data, **{**kw, "iters": 2})

    monkeypatch.setattr(calibrators, "distill", spy_kd)
    sx.quantize(reference, x, recon_images="original", **{**kw, "finetune": "recon+kd"})
    assert torch.equal(seen[2], x) and torch.equal(distilled[0], framed)
    with pytest.raises(UserInputError, match="recon_images"):
        sx.QuantizeConfig(recon_images="framed")
