"""Synthesis core: explicit attention vs timm, losses, priors, methods, resume, NaN, CLI, samples."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import timm
import torch
from conftest import tiny_vit

from sardfq_export.cli import main
from sardfq_export.core.calibset import CalibSet
from sardfq_export.core.errors import UserInputError
from sardfq_export.models import LoadedModel
from sardfq_export.synthesis import (
    METHODS,
    SynthConfig,
    SynthesisDivergedError,
    checkpoint_path,
    losses,
    synthesize,
)
from sardfq_export.synthesis.attention import recording, swin_key_attention
from sardfq_export.synthesis.plan import (
    augmentation_table,
    draw_labels,
    draw_priors,
    initial_images,
    learning_rate,
)
from sardfq_export.synthesis.priors import generator, gmm_prior


def _loaded(model, family="vit", size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    cfg = {"input_size": (model.patch_embed.proj.in_channels, size, size), "mean": mean, "std": std}
    return LoadedModel(model, "tiny", cfg, family, "random-init")


def tiny_swin():
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=10,
        img_size=56,
        embed_dim=32,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=7,
    ).eval()


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_explicit_attention_matches_timm_and_is_removed(family):
    model = tiny_vit() if family == "vit" else tiny_swin()
    size = 32 if family == "vit" else 56
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        ref = model(x)
        with recording(model, family, want_attn=[0, 1], want_out=[0, 1], full_maps=True) as rec:
            got = model(x)
            probs = rec.attn[1]
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
        if family == "vit":  # the fast path: fused softmax·V plus the CLS row alone
            for fused in (True, False):
                with recording(model, family, want_attn=[0, 1], want_out=[0, 1], fused=fused) as fast:
                    assert torch.allclose(model(x), ref, atol=1e-5, rtol=1e-5)
                    assert fast.attn[1].shape == (3, probs.shape[1], 1, probs.shape[-1])
                    assert torch.allclose(fast.attn[1], probs[:, :, :1], atol=1e-6)
                    assert torch.allclose(fast.out[0], rec.out[0], atol=1e-5)
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
        assert rec.out[0].shape[:2] == probs.shape[:2]
        attn_type = type(model.blocks[0].attn if family == "vit" else model.layers[0].blocks[0].attn)
        assert attn_type.__module__.startswith("timm"), "original attention modules are put back"
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_patch_embedding_as_matmul_matches_the_convolution(family):
    """Synthesis runs the patchify convolution as one matmul: same logits and pixel gradients (up to
    float summation order), under bf16 autocast too, and the Conv2d is put back afterwards."""
    from sardfq_export.synthesis.patch_matmul import PatchMatmul, patch_matmul

    model = tiny_vit() if family == "vit" else tiny_swin()
    size = 32 if family == "vit" else 56
    x = torch.randn(3, 3, size, size, requires_grad=True)
    ref = model(x)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
    with patch_matmul(model) as swapped:
        assert swapped == 1 and isinstance(model.patch_embed.proj, PatchMatmul)
        got = model(x)
        (got_grad,) = torch.autograd.grad(got.square().sum(), x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_bf16 = model(x).float()
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got_grad, ref_grad, atol=1e-5, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_bf16 = model(x).float()
    assert (got_bf16 - ref_bf16).abs().max() <= 0.05 * ref_bf16.abs().max()  # bf16 rounding, not a bug
    assert type(model.patch_embed.proj) is torch.nn.Conv2d
    assert torch.equal(model(x), ref)


def test_swin_stitching_matches_brute_force():
    """Stitched query-averaged attention equals scattering each window token back to its grid cell."""
    from timm.models.swin_transformer import window_partition

    model = tiny_swin()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad(), recording(model, "swin", want_attn=[1]) as rec:
        model(x)
        got = swin_key_attention(rec, 1, 2)  # block 1 is the shifted one
        info = rec.blocks[1]
        assert any(info.shift)
        h, w = info.grid
        coords = torch.arange(h * w, dtype=torch.float32).view(1, h, w, 1)
        shifted = torch.roll(coords, shifts=(-info.shift[0], -info.shift[1]), dims=(1, 2))
        where = window_partition(shifted, info.window).reshape(-1, info.window[0] * info.window[1]).long()
        a = rec.attn[1].mean(-2)  # (B*nW, heads, N)
        nw = where.shape[0]
        want = torch.zeros(2, a.shape[1], h * w)
        for b in range(2):
            for wi in range(nw):
                want[b][:, where[wi]] = a[b * nw + wi]
    assert torch.allclose(got, want)


def test_gmm_priors_are_normalized_deterministic_and_scaled():
    p1 = gmm_prior(generator(0, 3, 3), 4, (7, 7))
    p2 = gmm_prior(generator(0, 3, 3), 4, (7, 7))
    assert torch.equal(p1, p2) and p1.shape == (4, 49)
    assert torch.allclose(p1.sum(-1), torch.ones(4))
    assert not torch.equal(p1, gmm_prior(generator(1, 3, 3), 4, (7, 7)))
    one = gmm_prior(generator(0, 0, 3), 1, (14, 14), k_max=1, std_range=(1.0, 1.0)).view(14, 14)
    peak = one.argmax()
    r, c = divmod(int(peak), 14)
    assert one[r, c] / one.sum() > 0.1  # std 1 patch: a sharp blob


def test_patch_similarity_entropy_matches_naive_kde():
    tok = torch.randn(2, 1, 5, 4)
    got = losses.patch_similarity_entropy(tok, bandwidth=0.3, points=10, eps=1e-4)
    t = torch.nn.functional.normalize(tok, dim=-1)
    sims = (t @ t.transpose(-1, -2)).reshape(2, -1).numpy().astype(np.float64)
    grid = np.linspace(sims.min(), sims.max(), 10)
    ents = []
    for s in sims:
        p = np.array(
            [np.mean(np.exp(-0.5 * ((g - s) / 0.3) ** 2)) / (0.3 * math.sqrt(2 * math.pi)) for g in grid]
        )
        ents.append(np.trapezoid(-p * np.log(p + 1e-4), grid))
    assert got.item() == pytest.approx(float(np.mean(ents)), rel=1e-4)


def test_tv_and_soft_cross_entropy():
    x = torch.zeros(1, 1, 4, 4)
    x[..., :, 2:] = 1.0  # one vertical edge: right diff 4 ones, diagonals 3 each
    assert losses.total_variation(x).item() == pytest.approx(2 + 0 + math.sqrt(3) * 2)
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    onehot = torch.tensor([[1.0, 0.0, 0.0]])
    assert losses.soft_cross_entropy(logits, onehot).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.tensor([0])).item()
    )


def test_tv_gradient_equals_autograds():
    """The written-out TV backward against autograd through the plain sliced formula; a constant
    image (every norm 0) gets a zero gradient, as torch's norm backward gives."""
    plain = losses.total_variation_autograd
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    got, (g_got,) = losses.total_variation(x), torch.autograd.grad(2.5 * losses.total_variation(x), x)
    want, (g_want,) = plain(x), torch.autograd.grad(2.5 * plain(x), x)
    assert got.item() == want.item()
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(losses.total_variation, (x,))
    flat = torch.ones(1, 3, 5, 5, requires_grad=True)
    (g_flat,) = torch.autograd.grad(losses.total_variation(flat), flat)
    assert losses.total_variation(flat).item() == 0.0 and not g_flat.any()


def test_draws_do_not_depend_on_batching():
    cfg = SynthConfig(num_images=6, iters=20).resolve("vit")
    a = initial_images(cfg, range(0, 6), (3, 8, 8))
    b = initial_images(cfg, range(4, 6), (3, 8, 8))
    assert torch.equal(a[4:], b)
    oa, fa = augmentation_table(cfg, range(0, 6), (28, 28))
    ob, fb = augmentation_table(cfg, range(4, 6), (28, 28))
    assert torch.equal(oa[4:], ob) and torch.equal(fa[4:], fb)
    assert oa[:, :10].abs().max() <= 2 and oa.abs().max() <= 4  # 15 / 30 px at 224 -> 2 / 4 at 28
    pa = draw_priors(cfg, range(0, 6), {3: (2, (7, 7))})[3]
    pb = draw_priors(cfg, range(4, 6), {3: (2, (7, 7))})[3]
    assert torch.equal(pa[4:], pb)


def test_soft_labels_and_regions():
    cfg = SynthConfig(num_images=16).resolve("vit")
    lab = draw_labels(cfg, 10, (28, 28), msr=True, soft=True)
    assert torch.allclose(lab.targets.sum(-1), torch.ones(16))
    used = lab.region_labels >= 0
    assert used.any(1).all() and used.sum(1).max() <= 4
    for i in range(16):
        relevant = set([int(lab.labels[i])] + lab.region_labels[i][used[i]].tolist())
        top = set(lab.targets[i].topk(len(relevant)).indices.tolist())
        assert top == relevant  # logits U(5, 10) on relevant classes, 0 elsewhere
        boxes = lab.regions[i][used[i]]
        assert len({tuple(b.tolist()) for b in boxes}) == len(boxes)  # non-overlapping cells
    hard = draw_labels(cfg, 10, (28, 28), msr=False, soft=False)
    assert torch.equal(hard.targets.argmax(-1), hard.labels) and hard.targets.max() == 1


def test_schedule_restarts_every_round():
    cfg = SynthConfig(method="psaq", iters=1000).resolve("vit")
    assert learning_rate(cfg, 0) == pytest.approx(0.2 / 100)
    assert learning_rate(cfg, 99) == pytest.approx(0.2)
    assert learning_rate(cfg, 499) < 1e-4 and learning_rate(cfg, 500) == pytest.approx(0.2 / 100)
    assert SynthConfig(method="psaq").resolve("swin").lr == 0.25
    assert SynthConfig(apa_weight=7.0).resolve("vit").apa_weight == 7.0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_produce_a_calibset(method, tmp_path):
    loaded = _loaded(tiny_vit())
    out = tmp_path / "calib.safetensors"
    calib = synthesize(loaded, SynthConfig(method=method, num_images=4, iters=4), out, progress=False)
    again = CalibSet.load(out)
    assert torch.equal(again.images, calib.images) and calib.images.shape == (4, 3, 32, 32)
    assert torch.allclose(calib.targets.sum(-1), torch.ones(4), atol=1e-5) and calib.labels.shape == (4,)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (
        meta["method"] == method
        and meta["seed"] == 0
        and "wall_time_s" in meta
        and meta["config"]["lr"] == 0.2
    )
    if method == "noise":
        return
    lo = (0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert (calib.images.amin((0, 2, 3)) >= lo - 1e-6).all()
    curve = meta["loss_curve"][0]
    assert curve["iteration"] == [1, 2, 3, 4] and all(math.isfinite(v) for v in curve["total"])
    if method == "sardfq":
        assert calib.regions.shape == (4, 4, 4) and (calib.region_labels >= 0).any()
        assert meta["apa_blocks"] == [1, 2] and curve["apa"][0] > 0
    else:
        assert calib.regions is None and curve["pse"][0] != 0


def test_sardfq_takes_the_patch_similarity_entropy_only_when_weighted(tmp_path):
    loaded = _loaded(tiny_vit())
    curves = {}
    for w in (None, 1.0):
        cal = synthesize(
            loaded, SynthConfig(method="sardfq", num_images=2, iters=2, pse_weight=w), progress=False
        )
        curves[w] = cal.meta["loss_curve"][0]
    assert curves[None]["pse"] == [0.0, 0.0] and all(v != 0 for v in curves[1.0]["pse"])
    assert curves[1.0]["apa"][0] > 0  # still SARDFQ


def _interrupt_at_batch1_iter3(batch, it):
    """A synthesis callback that stops the run as Ctrl-C would, inside the second batch."""
    if batch == 1 and it == 3:
        raise KeyboardInterrupt


def test_resume_after_interrupt_is_bit_exact(tmp_path):
    loaded = _loaded(tiny_vit())
    cfg = SynthConfig(method="sardfq", num_images=4, batch_size=2, iters=6)
    full = synthesize(loaded, cfg, tmp_path / "a.safetensors", progress=False, checkpoint_every=2)

    out = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        synthesize(loaded, cfg, out, progress=False, checkpoint_every=2, callback=_interrupt_at_batch1_iter3)
    assert checkpoint_path(out).exists() and not out.exists()
    resumed = synthesize(loaded, cfg, out, progress=False, checkpoint_every=2, resume=True)
    assert torch.equal(resumed.images, full.images)
    assert resumed.meta["loss_curve"] == full.meta["loss_curve"]
    assert not checkpoint_path(out).exists()
    with pytest.raises(KeyboardInterrupt):
        synthesize(loaded, cfg, out, progress=False, callback=_interrupt_at_batch1_iter3)
    with pytest.raises(Exception, match="other settings"):
        synthesize(
            loaded,
            SynthConfig(method="sardfq", num_images=4, batch_size=2, iters=7),
            out,
            resume=True,
            progress=False,
        )


def test_image_scale_optimizes_a_coarse_grid_and_resumes_bit_exact(tmp_path):
    loaded = _loaded(tiny_vit())
    # noise (nothing optimized): the images are exactly the coarse start draws, upsampled
    cal = synthesize(loaded, SynthConfig(method="noise", num_images=2, image_scale=0.5), progress=False)
    coarse = initial_images(SynthConfig(method="noise", image_scale=0.5), range(2), (3, 16, 16))
    up = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    assert cal.images.shape == (2, 3, 32, 32) and torch.equal(cal.images, up)
    # SARDFQ: optimized on the 16x16 grid, so every image is a bilinear upsample of one (its
    # 2x2-average downsample upsamples back to itself only if no finer detail exists) and clipped
    cfg = SynthConfig(method="sardfq", num_images=4, batch_size=2, iters=6, image_scale=0.5)
    full = synthesize(loaded, cfg, tmp_path / "a.safetensors", progress=False, checkpoint_every=2)
    plain = synthesize(
        loaded, SynthConfig(method="sardfq", num_images=4, batch_size=2, iters=6), progress=False
    )
    x = full.images

    def detail(z):
        down = torch.nn.functional.avg_pool2d(z, 2)
        inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
        back = torch.nn.functional.interpolate(down, size=(32, 32), mode="bilinear", align_corners=False)
        return float((back - z)[inner].abs().mean() / z[inner].abs().mean())

    assert detail(x) < 0.5 * detail(plain.images)
    lo = (0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert (x.amin((0, 2, 3)) >= lo - 1e-6).all()
    assert full.meta["config"]["image_scale"] == 0.5

    out = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        synthesize(loaded, cfg, out, progress=False, checkpoint_every=2, callback=_interrupt_at_batch1_iter3)
    resumed = synthesize(loaded, cfg, out, progress=False, checkpoint_every=2, resume=True)
    assert torch.equal(resumed.images, full.images)
    for bad in (0.0, 1.5):
        with pytest.raises(UserInputError, match="image_scale must be in"):
            synthesize(loaded, SynthConfig(num_images=2, iters=2, image_scale=bad), progress=False)
    from sardfq_export.synthesis.prior import PatchSimilarityTeacher

    with pytest.raises(UserInputError, match="V2 optimizes full-resolution pixels"):
        PatchSimilarityTeacher(loaded, SynthConfig(image_scale=0.5))


def test_grey_gives_every_channel_one_pixel_value_and_stays_in_range():
    loaded = _loaded(tiny_vit())
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    # noise: one start draw per pixel, normalized by the channels' mean mean/std, through each
    # channel's own mean/std; exact up to float rounding
    cal = synthesize(loaded, SynthConfig(method="noise", num_images=2, grey=True), progress=False)
    g = initial_images(SynthConfig(method="noise"), range(2), (1, 32, 32))
    want = ((mean.mean() + std.mean() * g) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(cal.images, want, rtol=0, atol=1e-6)
    # SARDFQ, grey on the half grid: the pixel values agree across channels and lie in [0, 1]
    cfg = SynthConfig(method="sardfq", num_images=2, iters=6, image_scale=0.5, grey=True)
    x = synthesize(loaded, cfg, progress=False).images
    pixels = x * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    assert float((pixels - pixels[:, :1]).abs().max()) < 1e-5
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5
    assert float(pixels.std()) > 0.05  # optimized, not flat
    from sardfq_export.synthesis.prior import PatchSimilarityTeacher

    with pytest.raises(UserInputError, match="leave grey off"):
        PatchSimilarityTeacher(loaded, SynthConfig(grey=True))


def test_frame_optimizes_only_the_inside_of_a_flat_grey_band_and_resumes_bit_exact(tmp_path):
    from sardfq_export.synthesis.plan import frame_greys
    from sardfq_export.synthesis.prior import PatchSimilarityTeacher

    loaded = _loaded(tiny_vit())
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    cfg = SynthConfig(method="sardfq", num_images=4, batch_size=2, iters=6, frame=0.25)
    full = synthesize(loaded, cfg, tmp_path / "a.safetensors", progress=False, checkpoint_every=2)
    pixels = full.images * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    band = torch.ones(32, 32, dtype=torch.bool)
    band[8:24, 8:24] = False  # a quarter of the 32-px side on each edge
    greys = frame_greys(cfg, range(4))
    for i in range(4):  # the band: the image's own grey in every channel; the inside: optimized
        torch.testing.assert_close(pixels[i][:, band], greys[i].expand(3, int(band.sum())), rtol=0, atol=1e-6)
        assert float(pixels[i][:, ~band].std()) > 0.05
    assert len(set(greys.tolist())) == 4 and float(greys.min()) >= 0 and float(greys.max()) <= 1
    # the loss sees the band, so the inside becomes other than the unframed run's (same start draws)
    plain = synthesize(
        loaded, SynthConfig(method="sardfq", num_images=4, batch_size=2, iters=6), progress=False
    )
    assert float((plain.images - full.images)[:, :, ~band].abs().max()) > 0
    out = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        synthesize(loaded, cfg, out, progress=False, checkpoint_every=2, callback=_interrupt_at_batch1_iter3)
    resumed = synthesize(loaded, cfg, out, progress=False, checkpoint_every=2, resume=True)
    assert torch.equal(resumed.images, full.images)
    assert full.meta["config"]["frame"] == 0.25
    for bad in (-0.1, 0.5):
        with pytest.raises(UserInputError, match="frame must be a fraction"):
            synthesize(loaded, SynthConfig(num_images=2, iters=2, frame=bad), progress=False)
    with pytest.raises(UserInputError, match="leave frame at 0"):
        PatchSimilarityTeacher(loaded, SynthConfig(frame=0.25))


def test_frame_jitter_gives_each_image_a_window_of_its_own_with_the_unjittered_greys():
    from sardfq_export.synthesis.plan import frame_bands, frame_greys

    loaded = _loaded(tiny_vit())
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    cfg = SynthConfig(method="sardfq", num_images=4, batch_size=2, iters=4, frame=0.2, frame_jitter=1.0)
    bands = frame_bands(cfg, range(4), (32, 32))
    # each edge's width drawn in 0.2 · 32 · [0, 2] = [0, 12.8] px, rounded; the windows differ
    assert bands.shape == (4, 4) and int(bands.min()) >= 0 and int(bands.max()) <= 13
    assert len({tuple(b) for b in bands.tolist()}) == 4
    torch.testing.assert_close(
        frame_bands(SynthConfig(frame=0.25), range(3), (32, 32)), torch.full((3, 4), 8)
    )  # no jitter: the centred band of a quarter of the side, as band_inside draws it
    x = synthesize(loaded, cfg, progress=False).images
    pixels = x * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    greys = frame_greys(cfg, range(4))
    torch.testing.assert_close(greys, frame_greys(SynthConfig(frame=0.2), range(4)), rtol=0, atol=0)
    for i, (top, bottom, left, right) in enumerate(bands.tolist()):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[top : 32 - bottom, left : 32 - right] = True
        flat = pixels[i][:, ~inside]
        torch.testing.assert_close(flat, greys[i].expand_as(flat), rtol=0, atol=1e-6)
        assert float(pixels[i][:, inside].std()) > 0.05  # optimized inside its own window
    assert synthesize(loaded, cfg, progress=False).meta["config"]["frame_jitter"] == 1.0
    for bad, match in ((SynthConfig(frame=0.2, frame_jitter=1.5), "frame_jitter must be"),
                       (SynthConfig(frame=0.3, frame_jitter=1.0), "widest band"),
                       (SynthConfig(frame=0.0, frame_jitter=0.5), "widest band")):  # fmt: skip
        with pytest.raises(UserInputError, match=match):
            synthesize(loaded, dataclasses.replace(bad, num_images=2, iters=2), progress=False)


def test_a_models_synthesis_defaults_fill_only_unset_fields():
    extra = {"synthesis_iters": 100, "synthesis_image_scale": 0.25, "synthesis_grey": True,
             "synthesis_frame": 0.125}  # fmt: skip
    cfg = SynthConfig().with_model_defaults(extra)
    assert (cfg.iters, cfg.image_scale, cfg.grey, cfg.frame) == (100, 0.25, True, 0.125)
    mine = SynthConfig(iters=7, image_scale=1.0, grey=False, frame=0.0).with_model_defaults(extra)
    assert (mine.iters, mine.image_scale, mine.grey, mine.frame) == (7, 1.0, False, 0.0)
    plain = SynthConfig().with_model_defaults({}).resolve("vit")
    assert (plain.iters, plain.image_scale, plain.grey, plain.frame) == (1000, 1.0, False, 0.0)


def test_nan_loss_is_caught_and_last_good_checkpoint_kept(tmp_path):
    model = tiny_vit()
    calls = {"n": 0}

    def poison(_mod, _inp, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 5 else output

    model.head.register_forward_hook(poison)
    out = tmp_path / "c.safetensors"
    with pytest.raises(SynthesisDivergedError, match="iteration 6 of batch 1/1") as err:
        synthesize(
            _loaded(model),
            SynthConfig(method="psaq", num_images=2, iters=10),
            out,
            progress=False,
            checkpoint_every=2,
        )
    assert "checkpoint" in str(err.value) and err.value.exit_code == 1
    from safetensors import safe_open

    with safe_open(str(checkpoint_path(out)), "pt") as fh:
        state = json.loads(fh.metadata()["state"])
        assert state["iteration"] == 4 and torch.isfinite(fh.get_tensor("x")).all()


def test_samples_png_shows_attention_next_to_prior(tmp_path):
    from PIL import Image

    from sardfq_export.synthesis.samples import save_samples

    loaded = _loaded(tiny_vit())
    calib = synthesize(loaded, SynthConfig(num_images=3, iters=2), None, progress=False)
    with_attn = Image.open(save_samples(tmp_path / "s.png", calib, loaded))
    plain = Image.open(save_samples(tmp_path / "p.png", calib))
    assert with_attn.size[0] > plain.size[0]


def test_samples_png_captions_each_image_with_its_class(tmp_path):
    import numpy as np
    from PIL import Image

    from sardfq_export.core.calibset import CalibSet
    from sardfq_export.synthesis.samples import captions, save_samples

    model = tiny_vit()
    names = tuple(f"name{i}" for i in range(10))
    loaded = _loaded(model)
    loaded.data_config["label_names"] = names
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top1 = model(images).argmax(-1)
    other = (top1[1] + 1) % 10
    labels = torch.stack([top1[0], other, top1[2], top1[3]])  # image 1 synthesized for another class
    calib = CalibSet(images=images, labels=labels, meta={"method": "sardfq", "seed": 0})
    caps = captions(calib, loaded)
    assert caps[0] == (f"{int(top1[0])} name{int(top1[0])}", True)
    assert caps[1] == (f"{int(other)} name{int(other)} (top-1 {int(top1[1])} name{int(top1[1])})", False)
    # no model names: the class index; no labels: the teacher's top-1
    assert captions(calib, _loaded(model))[2] == (f"class {int(top1[2])}", True)
    unlabelled = CalibSet(images=images, meta={"method": "noise"})
    assert captions(unlabelled, loaded)[3] == (f"top-1 {int(top1[3])} name{int(top1[3])}", True)
    # drawn: a caption strip under each image (dark text pixels there, red for the mismatch)
    png = Image.open(save_samples(tmp_path / "s.png", calib, loaded, cell=84)).convert("RGB")
    pix = np.asarray(png)
    strip = pix[30 + 84 + 1 : 30 + 84 + 13, 4 : 4 + 84]  # under the first image
    assert (strip.sum(-1) < 300).any()
    strip1 = pix[30 + 84 + 1 : 30 + 84 + 13, 4 + 89 : 4 + 89 + 84]  # under the second: red text
    assert (strip1[..., 0].astype(int) - strip1[..., 1] > 80).any()


def test_cli_synthesize_deit_tiny_224_and_refuses_overwrite(tmp_path):
    out = tmp_path / "calib.safetensors"
    args = [
        "synthesize",
        "--model",
        "deit_t",
        "--random-init",
        "--num-images",
        "2",
        "--iters",
        "2",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    calib = CalibSet.load(out)
    assert calib.images.shape == (2, 3, 224, 224) and (tmp_path / "samples.png").exists()
    assert main(args) == 2  # exists: refused
    assert main(args + ["--resume"]) == 0  # same settings: reused
    assert main(args + ["--overwrite", "--no-samples", "--method", "psaq"]) == 0
    assert (
        main(args + ["--overwrite", "--no-samples", "--image-scale", "0.25", "--grey", "--frame", "0.125"])
        == 0
    )
    grey = CalibSet.load(out)
    assert grey.meta["config"]["image_scale"] == 0.25 and grey.meta["config"]["grey"] is True
    assert grey.meta["config"]["frame"] == 0.125
    assert float(grey.images[:, :, :28].std((2, 3)).max()) < 1e-5  # the top band (28 px): one grey each
    assert calib.meta["config"]["grey"] is False
    assert main(args + ["--overwrite", "--image-scale", "0"]) == 2  # outside (0, 1]: one line, exit 2
    assert main(args + ["--overwrite", "--frame", "0.5"]) == 2  # outside [0, 0.5)
    assert main(args + ["--overwrite", "--no-samples", "--frame", "0.125", "--frame-jitter", "1"]) == 0
    assert CalibSet.load(out).meta["config"]["frame_jitter"] == 1.0
    assert main(args + ["--overwrite", "--frame", "0.3", "--frame-jitter", "1"]) == 2  # band past half


def test_cli_synthesize_swin_tiny(tmp_path):
    out = tmp_path / "swin.safetensors"
    assert (
        main(
            [
                "synthesize",
                "--model",
                "swin_t",
                "--random-init",
                "--num-images",
                "1",
                "--iters",
                "2",
                "--out",
                str(out),
                "--quiet",
                "--json",
            ]
        )
        == 0
    )
    meta = CalibSet.load(out).meta
    assert (
        meta["config"]["lr"] == 0.25 and meta["apa_blocks"][0] == 6 and meta["config"]["apa_weight"] == 100.0
    )
