"""PSAQ-ViT V2 (``--calib psaq2``): calibrators.adaptive + the synthesis prior, through the API and the job.

Tiny random-init DeiT / Swin for structure (runs, shapes, what is recorded, the student reloads),
the discrepancy's direction in each phase, determinism, interrupted-and-resumed == uninterrupted
(Ctrl-C and SIGTERM, before and after the student is calibrated), and the main job on the
embedded reference model exporting and validating the distilled student.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import timm
import torch
from conftest import needs_fmnist, needs_reference, tiny_vit
from sardfq_export.calibrators.adaptive import AdaptiveConfig, discrepancy, schedule

import sardfq_export as sx
from sardfq_export import calibrators
from sardfq_export.cli import Terminated, main, sigterm_raises
from sardfq_export.core.errors import UserInputError
from sardfq_export.models import LoadedModel
from sardfq_export.synthesis import SynthConfig

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# 2 batches of 2 images: warm-up 2 steps each, then 2 rounds of (2 image + 2 student) steps per batch
SMALL = AdaptiveConfig(rounds=2, warmup_iters=2, image_steps=2, student_steps=2, batch_size=2)


def _loaded(model, size=32):
    cfg = {"input_size": (3, size, size), "mean": MEAN, "std": STD}
    return LoadedModel(model, "tiny", cfg, "vit" if size == 32 else "swin", "random-init")


def tiny_swin():
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=56,
                             embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7).eval()  # fmt: skip


def _run(loaded, tmp_path=None, name="a", **kw):
    kw.setdefault("adaptive", SMALL)
    out = tmp_path / f"{name}.safetensors" if tmp_path is not None else None
    return sx.psaq2(loaded, scheme="w4a8", num_images=4, progress=False, out=out, **kw)


def _state(q) -> dict:
    return {k: v.clone() for k, v in q.model.state_dict().items()}


def _assert_same(a, b):
    assert torch.equal(a.calib.images, b.calib.images)
    sa, sb = _state(a.quantized), _state(b.quantized)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.calib.meta["loss_curve"] == b.calib.meta["loss_curve"]


def test_schedule_order_and_config():
    steps = schedule(SMALL, 2, True)
    assert steps[:4] == [(0, 0, -1, 0), (0, 0, -1, 1), (0, 1, -1, 0), (0, 1, -1, 1)]
    assert steps[4:8] == [(1, 0, 0, 0), (1, 0, 0, 1), (2, 0, 0, 0), (2, 0, 0, 1)]
    assert len(steps) == 4 + 2 * 2 * 4 and len(schedule(SMALL, 2, False)) == 4
    assert (
        AdaptiveConfig().resolve("vit").image_lr == 0.2 and AdaptiveConfig().resolve("swin").image_lr == 0.25
    )
    # unset student lr / discrepancy weight: the model's own (measured on it), else the module's
    plain = AdaptiveConfig().resolve("vit")
    assert (plain.student_lr, plain.disc_weight) == (1e-5, 1.0)
    own = AdaptiveConfig().resolve("vit", {"student_lr": 3e-7, "disc_weight": 0.5})
    assert (own.student_lr, own.disc_weight, own.image_lr) == (3e-7, 0.5, 0.2)
    assert AdaptiveConfig(student_lr=2e-5).resolve("vit", {"student_lr": 3e-7}).student_lr == 2e-5
    with pytest.raises(ValueError, match="rounds"):
        AdaptiveConfig().resolve("vit", {"rounds": 3})  # a model may not change the schedule's shape
    with pytest.raises(UserInputError, match="rounds"):
        AdaptiveConfig(rounds=-1).resolve("vit")
    cfg = AdaptiveConfig(rounds=3)
    assert AdaptiveConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    t, s = torch.randn(3, 5), torch.randn(3, 5)
    assert discrepancy(t, t, 2.0).abs() < 1e-6 and discrepancy(t, s, 1.0) > 0


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_runs_records_its_schedule_and_the_student_reloads(family, tmp_path):
    loaded = _loaded(tiny_vit()) if family == "vit" else _loaded(tiny_swin(), 56)
    res = _run(loaded, holdout=2)
    size = 32 if family == "vit" else 56
    assert res.calib.images.shape == (4, 3, size, size) and res.holdout.images.shape == (2, 3, size, size)
    assert torch.allclose(res.calib.targets.sum(-1), torch.ones(4), atol=1e-5)
    assert res.calib.labels.shape == (4,)
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (res.calib.images.amin((0, 2, 3)) >= lo - 1e-6).all()
    meta = res.calib.meta
    assert meta["method"] == "psaq2" and meta["iters"] == 2 and meta["num_images"] == 4
    assert meta["config"] == {**SMALL.to_dict(), "image_lr": 0.2 if family == "vit" else 0.25, "student_lr": 1e-5,
                              "disc_weight": 1.0}  # fmt: skip
    assert meta["prior"]["pse_weight"] == 1.0 and meta["prior"]["tv_weight"] == 0.05
    assert meta["loss_curve"]["phase"].count(2) == 8 and all(
        torch.isfinite(torch.tensor(meta["loss_curve"]["loss"]))
    )
    assert res.holdout.meta["steps"] == 2 and "prior" in res.holdout.meta["holdout"]
    q = res.quantized
    assert q.summary["psaq2"]["student_steps_total"] == 8 and q.summary["calibration"]["num_images"] == 4
    assert all(qz.is_calibrated for _, qz in calibrators.iter_quantizers(q.model) if qz.enabled)
    # The distilled weights and frozen scales are the saved state: a reload computes the same logits.
    folder = q.save(tmp_path)
    saved = json.loads((folder / "quantized.json").read_text())
    assert saved["calibration"]["finetune"][-1]["method"] == "psaq2"
    assert saved["calibration"]["finetune"][-1]["config"]["rounds"] == 2
    base = tiny_vit() if family == "vit" else tiny_swin()
    again = calibrators.load_quantized(folder, base)
    x = res.holdout.images
    with torch.no_grad():
        assert torch.equal(again(x), q.model(x))


def test_discrepancy_rises_in_image_steps_and_falls_in_student_steps():
    torch.manual_seed(0)
    model = tiny_vit()
    with torch.no_grad():
        model.head.weight.mul_(10)  # random init: near-uniform logits; make the discrepancy visible
    # Weight-only INT4 (w4a16): the student is smooth in its input, so a small image step follows
    # the discrepancy's gradient (4-bit activation rounding makes a random-init toy's surface jagged);
    # the discrepancy alone drives the images (the prior would add its own direction).
    cfg = AdaptiveConfig(rounds=2, warmup_iters=0, image_steps=4, student_steps=4, batch_size=4, image_lr=0.005,
                         student_lr=3e-5)  # fmt: skip
    res = sx.psaq2(_loaded(model), scheme="w4a16", num_images=4, adaptive=cfg, progress=False,
                   synth=SynthConfig(pse_weight=0.0, tv_weight=0.0))  # fmt: skip
    rounds = res.calib.meta["rounds"]
    assert len(rounds) == 2
    for r in rounds:
        assert r["image_last"] > r["image_first"], rounds
        assert r["student_last"] < r["student_first"], rounds
    curve = res.calib.meta["loss_curve"]
    assert curve["phase"] == [1] * 4 + [2] * 4 + [1] * 4 + [2] * 4
    assert curve["loss"][:4] == [-d for d in curve["disc"][:4]]  # image loss = prior (off) - discrepancy


def test_same_seed_same_bytes_other_seed_other_images():
    loaded = _loaded(tiny_vit())
    a, b = _run(loaded), _run(loaded)
    _assert_same(a, b)
    c = _run(loaded, seed=1)
    assert not torch.equal(a.calib.images, c.calib.images)


# steps 1-4 warm-up, 5-12 round 1, 13-20 round 2: stop in the warm-up (student not yet calibrated),
# at an image step of round 1 (second batch), at a student step of round 2
@pytest.mark.parametrize("stop_at", [3, 9, 18])
def test_interrupted_and_resumed_equals_uninterrupted(stop_at, tmp_path):
    loaded = _loaded(tiny_vit())
    full = _run(loaded, tmp_path, "full", holdout=2)

    def interrupt(done):
        if done == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(loaded, tmp_path, "b", holdout=2, callback=interrupt)
    ckpt, held_ckpt = tmp_path / "b.safetensors.ckpt", tmp_path / "b.safetensors.holdout.ckpt"
    assert ckpt.exists() and held_ckpt.exists()  # the held-out run (first) finished: kept, not redone
    resumed = _run(loaded, tmp_path, "b", holdout=2, resume=True)
    _assert_same(resumed, full)
    assert torch.equal(resumed.holdout.images, full.holdout.images)
    assert not ckpt.exists() and not held_ckpt.exists()
    with pytest.raises(KeyboardInterrupt):
        _run(loaded, tmp_path, "c", callback=interrupt)
    with pytest.raises(UserInputError, match="other settings"):
        _run(loaded, tmp_path, "c", resume=True, adaptive=AdaptiveConfig(**{**SMALL.to_dict(), "rounds": 3}))


def test_sigterm_saves_at_the_step_end_and_resume_is_bit_exact(tmp_path):
    loaded = _loaded(tiny_swin(), 56)
    full = _run(loaded, tmp_path, "full")

    def terminate(done):
        if done == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with sigterm_raises(), pytest.raises(Terminated):
        _run(loaded, tmp_path, "b", callback=terminate)
    assert signal.getsignal(signal.SIGTERM) is before
    from safetensors import safe_open

    with safe_open(str(tmp_path / "b.safetensors.ckpt"), "pt") as fh:
        state = json.loads(fh.metadata()["state"])
    assert state["done"] == 10 and state["prepared"]
    _assert_same(_run(loaded, tmp_path, "b", resume=True), full)


def test_quantize_takes_psaq2_and_synthesis_refuses_it(tmp_path):
    loaded = _loaded(tiny_vit())
    q = sx.quantize(loaded, "psaq2", scheme="w8a8", num_images=2, progress=False, adaptive=SMALL)
    assert q.summary["psaq2"]["method"] == "psaq2" and q.summary["calib"]["method"] == "psaq2"
    with pytest.raises(UserInputError, match="trains the quantized model"):
        sx.calibration_set("psaq2", loaded, 2)
    with pytest.raises(UserInputError, match="psaq2"):
        sx.calibration_set("psaq3", loaded, 2)
    with pytest.raises(UserInputError, match="auto-keep-fp"):
        sx.psaq2(loaded, auto_keep_fp=0.9, num_images=2, progress=False)
    # the quantize command refuses it: the main job saves and resumes the images and the model
    assert main(["quantize", "--calib", "psaq2", "--out", str(tmp_path / "q"), "--quiet"]) == 2


@pytest.mark.slow
@needs_reference
@needs_fmnist
def test_main_job_with_psaq2_exports_and_validates_the_distilled_student(tmp_path, capsys):
    out = tmp_path / "job"
    args = ["--calib", "psaq2", "--iters", "2", "--psaq2", "warmup_iters=10", "--psaq2", "image_steps=2",
            "--num-images", "8", "--data", "fashion-mnist", "--limit", "200", "--out", str(out), "--json"]  # fmt: skip
    assert main([*args[:-1], "--psaq2", "warmup=3"]) == 2  # a typo in a schedule name: one line, exit 2
    assert "warmup" in capsys.readouterr().err
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["method"] == "psaq2" and report["calibration"]["iters"] == 2
    assert report["quantize"]["psaq2"]["config"]["rounds"] == 2
    assert report["quantize"]["psaq2"]["config"]["warmup_iters"] == 10
    assert report["lint"]["passed"] and report["fidelity"]["agreement_vs_fakequant"] >= 0.99
    assert report["accuracy"]["n"] == 200 and report["accuracy"]["top1_drop"] < 5
    assert report["op_census"]["int8_gemm"] == 24
    saved = json.loads((out / "quantized" / "quantized.json").read_text())
    assert saved["calibration"]["finetune"][-1]["method"] == "psaq2" and saved["modified"]
    calib = json.loads((out / "calib.json").read_text())
    assert calib["method"] == "psaq2" and calib["config"]["student_steps"] == 5  # the default, recorded
    assert calib["config"]["image_steps"] == 2 and calib["prior"]["pse_weight"] == 1.0
    assert not list(out.glob("*.ckpt"))
    assert main(args[:-1] + ["--quiet"]) == 0  # a rerun reuses every stage
    assert "synthesize: up to date" in capsys.readouterr().err


def test_the_distilled_int4_student_exports_as_plain_qdq_blocks(tmp_path):
    """w4a16 (TensorRT's INT4 weight-only blocks): the distilled weights export as INT4 blocks, lint
    clean, and ONNX Runtime computes the fake-quant student (test_export's parity criterion)."""
    import torch.nn.functional as F
    from sardfq_export.exporters.ort import create_session

    loaded = _loaded(tiny_vit())
    res = sx.psaq2(loaded, scheme="w4a16", num_images=4, adaptive=SMALL, progress=False)
    assert res.quantized.summary["psaq2"]["student_steps_total"] == 8
    exported = sx.export(res.quantized, tmp_path / "model.onnx", target="onnxruntime")
    assert exported.lint.passed and exported.weights == {"int4-blocked": 8}  # 2 blocks x qkv, proj, fc1, fc2
    sess = create_session(tmp_path / "model.onnx")
    x = res.calib.images
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        want = res.quantized.model(x)
    assert float(F.cosine_similarity(got.double(), want.double(), dim=1).min()) >= 0.999
