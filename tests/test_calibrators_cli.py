"""calibrators save/load, the quantize command, eval --model DIR, and fine-tuning."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit

from sardfq_export import calibrators as C
from sardfq_export.cli import main
from sardfq_export.core.calibset import CalibSet
from sardfq_export.core.errors import UserInputError


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def random_reference(tmp_path):
    """A random-init checkpoint of the reference architecture (28x28, 1 channel): fast and offline."""
    from safetensors.torch import save_file

    from sardfq_export.models.reference import build_reference

    torch.manual_seed(0)
    model = build_reference()
    path = tmp_path / "ref.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture
def idx_data(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "idx"
    folder.mkdir()
    for prefix, n in (("train", 40), ("t10k", 24)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return folder


def test_save_load_roundtrip_and_refusal(tmp_path):
    model = tiny_vit()
    x = torch.randn(8, 3, 32, 32)
    qmodel = C.quantize_model(model, "w4a8")
    C.calibrate(qmodel, x, method="mse", progress=False)
    C.reconstruct_blocks(qmodel, model, x, iters=3, progress=False)
    y = qmodel(x)
    folder = C.save_quantized(qmodel, tmp_path / "out", {"name": "tiny"})
    assert (folder / "scheme.json").is_file() and C.read_meta(tmp_path / "out")["base_model"][
        "name"
    ] == "tiny"
    again = C.load_quantized(tmp_path / "out", tiny_vit_same(model))
    assert again.scheme == qmodel.scheme and torch.equal(again(x), y)
    other = tiny_vit()  # same architecture, other weights
    with pytest.raises(UserInputError, match="fingerprint"):
        C.load_quantized(tmp_path / "out", other)
    with pytest.raises(UserInputError, match="architecture"):
        C.load_quantized(tmp_path / "out", tiny_vit(depth=3))
    with pytest.raises(UserInputError, match="no quantized model"):
        C.load_quantized(tmp_path, model)


def tiny_vit_same(model):
    import copy

    return copy.deepcopy(model)


def test_reconstruction_lowers_block_error_and_is_deterministic():
    model = tiny_vit()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    outs = []
    for _ in range(2):
        qmodel = C.quantize_model(model, "w4a4")
        C.calibrate(qmodel, x, method="minmax", progress=False)
        rep = C.reconstruct_blocks(qmodel, model, x, iters=20, lr=1e-3, batch_size=8, progress=False)
        outs.append(qmodel(x))
    assert rep["blocks"][-1]["mse_after"] < rep["blocks"][-1]["mse_before"]
    assert torch.equal(outs[0], outs[1])
    flags = [p.requires_grad for p in model.parameters()]
    assert [p.requires_grad for p in qmodel.parameters()] == flags  # restored after training
    assert all(type(m).__name__ != "QuantLinear" for m in model.modules())  # float model untouched


def test_reconstruction_learns_activation_steps_when_asked():
    """act_lr > 0: each block's per-tensor activation steps train with the weights (LSQ through
    torch's learnable fake-quant, which equals the frozen op bit for bit at the calibrated step); the
    learned factors are folded into the frozen scales, so the saved/exported model is the same
    kind of model. From min-max 4-bit ranges (too wide) the steps shrink and the error falls further."""
    from sardfq_export.calibrators.quantizer import TensorQuantizer

    model = tiny_vit()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    runs = {}
    for act_lr in (0.0, 0.02):
        qmodel = C.quantize_model(model, "w4a4")
        C.calibrate(qmodel, x, method="minmax", progress=False)
        before = {
            n: q.scale.clone() for n, q in C.iter_quantizers(qmodel) if q.role == "activation" and q.active
        }
        rep = C.reconstruct_blocks(
            qmodel, model, x, iters=20, lr=1e-3, batch_size=8, progress=False, act_lr=act_lr
        )
        runs[act_lr] = (qmodel, rep, before)
    frozen, learned = runs[0.0][1], runs[0.02][1]
    assert "step_factors" not in frozen["blocks"][0] and learned["act_lr"] == 0.02
    qmodel, _, before = runs[0.02]
    factors = {f"{b['block']}.{n}": f for b in learned["blocks"] for n, f in b["step_factors"].items()}
    assert set(factors) == set(before) and len(factors) > 0  # every per-tensor activation step (tiny_vit)
    for n, q in C.iter_quantizers(qmodel):
        if n in before:  # the factor is in the frozen scale; nothing is left learning
            assert q._gain is None and torch.allclose(q.scale, before[n] * factors[n], rtol=1e-6)
    assert sum(f < 1 for f in factors.values()) > len(factors) / 2  # min-max clips shrink
    assert learned["blocks"][-1]["mse_after"] < frozen["blocks"][-1]["mse_after"]
    q = TensorQuantizer(4)
    q.set_amax(torch.tensor(2.0))
    v = torch.randn(1000, generator=torch.Generator().manual_seed(3)) * 2
    frozen_out = q(v)
    q.learn_step()
    assert torch.equal(q(v), frozen_out)  # the learnable op at factor 1 is the same fake-quant
    with pytest.raises(ValueError, match="per-tensor"):
        TensorQuantizer(4, C.PerChannel(0), shape=(3,)).learn_step()


def test_dropped_quantization_leaves_a_seeded_half_of_the_activations_float():
    """QDrop's drop: inside the context each element is either the input itself or its exact
    fake-quant, about p of them the input, the same mask for the same seed; outside, every element
    is quantized again. Weight quantizers are never dropped."""
    from sardfq_export.calibrators.quantizer import TensorQuantizer, dropped_quantization

    q = TensorQuantizer(4)
    q.set_amax(torch.tensor(2.0))
    w = TensorQuantizer(4, role="weight")
    w.set_amax(torch.tensor(2.0))
    net = torch.nn.ModuleDict({"act": q, "weight": w})
    x = torch.randn(20000, generator=torch.Generator().manual_seed(3)) * 2
    fq = q.fake_quant(x)
    outs = []
    for _ in range(2):
        with dropped_quantization(net, 0.5, seed=7):
            outs.append((q(x), q(x)))
            assert torch.equal(w(x), fq)
    (a, b), (a2, _) = outs
    kept = a == x
    assert ((a == x) | (a == fq)).all() and abs(kept.float().mean().item() - 0.5) < 0.02
    assert torch.equal(a, a2) and not torch.equal(a, b)  # seeded; a fresh mask each call
    assert torch.equal(q(x), fq)  # hooks gone on exit
    with dropped_quantization(net, 0.0, seed=7):
        assert torch.equal(q(x), fq)
    with pytest.raises(ValueError, match="drop probability"):
        dropped_quantization(net, 1.0)


def test_reconstruction_under_qdrop_is_seeded_and_trains_other_weights():
    model = tiny_vit()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    weights = {}
    for key, drop in (("plain", 0.0), ("drop", 0.5), ("again", 0.5)):
        qmodel = C.quantize_model(model, "w4a4")
        C.calibrate(qmodel, x, progress=False)
        rep = C.reconstruct_blocks(
            qmodel, model, x, iters=10, lr=1e-3, batch_size=8, progress=False, drop=drop
        )
        assert rep["drop"] == drop and all(b["mse_after"] < b["mse_before"] for b in rep["blocks"])
        weights[key] = torch.cat(
            [p.detach().flatten() for n, p in qmodel.named_parameters() if "blocks" in n]
        )
    assert torch.equal(weights["drop"], weights["again"]) and not torch.equal(
        weights["drop"], weights["plain"]
    )


def test_distill_uses_soft_targets_and_marks_weights():
    model = tiny_vit()
    x = torch.randn(8, 3, 32, 32)
    cal = CalibSet(images=x, targets=torch.softmax(torch.randn(8, 10), -1))
    qmodel = C.quantize_model(model, "w4a4")
    C.calibrate(qmodel, x, progress=False)
    rep = C.distill(qmodel, model, cal, iters=5, progress=False)
    assert rep["soft_targets"] and qmodel.sardfq_quant["modified"]


def test_distill_on_crop_views_does_not_learn_the_calibration_images_by_heart(reference):
    """Plain KD on 16 real images learns those images (their KL falls 10x); KD on fresh crop views
    of the same 16 lowers the KL on 64 *other* test images as well (reference model, w4a8, 80 steps at
    lr 2e-5: held-out KL 0.74x plain, 0.72x views on a 2-core AVX512-BF16 EPYC) while the 16 images
    stay as far from the teacher as unseen ones. Deterministic for a seed on one CPU; the set's soft
    targets belong to the uncropped images, so views skip them. Float differences between the CPUs'
    kernels move these ratios: at lr 1e-5 the views' held-out KL fell to 0.74x (40 steps) on one
    AVX-512 host, 0.86x (40 steps) and 0.74x (80) on an AVX2 one, and only 0.85x (80; 0.88x at 120)
    on the AVX512-BF16 host, so the step is 2e-5, where the effect is clear of that spread."""
    from sardfq_export.core.calibset import CalibSet
    from sardfq_export.data import load_raw, preprocess

    loaded = reference
    x = preprocess(load_raw("fashion-mnist", "train").images[:16], loaded.data_config)
    held = preprocess(load_raw("fashion-mnist", "test").images[:64], loaded.data_config)
    cal = CalibSet(images=x, targets=torch.softmax(loaded.model(x), -1).detach())

    def kl(m, z):
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(m(z), -1), F.log_softmax(loaded.model(z), -1),
                                  reduction="batchmean", log_target=True))  # fmt: skip

    def student(augment):
        q = C.quantize_model(loaded.model, "w4a8")
        C.calibrate(q, x, progress=False)
        before = kl(q, held)
        rep = C.distill(
            q, loaded.model, cal, iters=80, lr=2e-5, batch_size=16, progress=False, augment=augment
        )
        return q, before, rep

    plain, before, rep_plain = student(False)
    views, _, rep_views = student(True)
    again, _, _ = student(True)
    assert rep_plain["soft_targets"] and not rep_views["soft_targets"] and rep_views["augment"]
    assert kl(plain, x) < before / 5  # the calibration images, learnt
    assert kl(plain, held) < 0.8 * before and kl(views, held) < 0.8 * before
    assert kl(views, x) > 5 * kl(plain, x)  # ... and with views, not by heart
    assert torch.equal(views(held), again(held))
    # the API's kd_views reaches it (the CLI's --kd-views: test_gptq's recipe_config test)
    import sardfq_export as sx

    q = sx.quantize(loaded, x, scheme="w4a8", finetune="kd", kd_views=True, iters=2, progress=False)
    assert q.summary["kd"]["augment"] and q.summary["kd"]["iters"] == 2


def test_distill_float_lr_trains_the_float_parameters_at_their_own_rate(reference, tmp_path):
    """``float_lr`` adds every 1-D parameter (biases, LayerNorm affines) in a group of its own: with
    the weights' lr at 0 the 4-bit weights stay bit-equal while the norms move and take the KL on 64
    other test images down (reference model, w4a8, 40 view steps at 3e-4 on an AMX-BF16 Xeon: 0.00190
    -> 0.00171; at 1e-4 0.00171, but at 1e-3 it rises to 0.00226 there, where an earlier host went
    0.00191 -> 0.00181 and rose only at 3e-3: the rate matters, and 1e-3 is at its edge); the moved
    norms are saved with the quantized state and reload equal."""
    from sardfq_export.data import load_raw, preprocess

    loaded = reference
    x = preprocess(load_raw("fashion-mnist", "train").images[:16], loaded.data_config)
    held = preprocess(load_raw("fashion-mnist", "test").images[:64], loaded.data_config)

    def kl(m, z):
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(m(z), -1), F.log_softmax(loaded.model(z), -1),
                                  reduction="batchmean", log_target=True))  # fmt: skip

    q = C.quantize_model(loaded.model, "w4a8")
    C.calibrate(q, x, progress=False)
    weights = {n: p.detach().clone() for n, p in q.named_parameters() if p.ndim > 1}
    norms = {n: p.detach().clone() for n, p in q.named_parameters() if "norm" in n}
    before = kl(q, held)
    rep = C.distill(q, loaded.model, x, iters=40, lr=0.0, float_lr=3e-4, batch_size=16, progress=False,
                    augment=True)  # fmt: skip
    assert rep["float_lr"] == 3e-4
    assert all(torch.equal(p, weights[n]) for n, p in q.named_parameters() if p.ndim > 1)
    moved = [n for n, p in q.named_parameters() if n in norms and not torch.equal(p, norms[n])]
    assert len(moved) == len(norms) and set(moved) <= q.sardfq_quant["modified"]
    assert kl(q, held) < 0.97 * before
    C.save_quantized(q, tmp_path / "q")
    again = C.load_quantized(tmp_path / "q", loaded.model)
    with torch.no_grad():
        assert torch.equal(again(held), q(held))
    # without float_lr the norms are not trained
    q2 = C.quantize_model(loaded.model, "w4a8")
    C.calibrate(q2, x, progress=False)
    C.distill(q2, loaded.model, x, iters=5, lr=1e-5, batch_size=16, progress=False)
    assert all(torch.equal(p, norms[n]) for n, p in q2.named_parameters() if n in norms)


def test_smoothquant_keeps_the_float_function_and_balances_every_folded_input():
    """At α = 0.5 SmoothQuant makes max|X_j| equal max|W_j| for every input channel j of each
    smoothed Linear (on the data it measured): qkv and fc1 via their LayerNorm, proj via V's rows
    of qkv. The float function stays the same."""
    model = tiny_vit()
    x = torch.randn(8, 3, 32, 32)
    qmodel = C.quantize_model(model, C.get_scheme("w8a8").with_options(smoothquant_alpha=0.5))
    C.calibrate(qmodel, x, progress=False)
    C.set_quantizers_enabled(qmodel, False)
    assert torch.allclose(qmodel(x), model(x), atol=1e-4)
    inputs = {}
    names = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1")]
    hooks = [qmodel.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: inputs.__setitem__(n, a[0].abs().reshape(-1, a[0].shape[-1]).amax(0)))
        for n in names]  # fmt: skip
    with torch.no_grad():
        qmodel(x)
    for h in hooks:
        h.remove()
    for n in names:
        w = qmodel.get_submodule(n).weight.abs().amax(0)
        assert torch.allclose(inputs[n], w, rtol=1e-4), n
    orig = model.blocks[0].attn.proj.weight.abs().amax(0)
    assert not torch.allclose(orig, qmodel.blocks[0].attn.proj.weight.abs().amax(0))  # it did fold


def test_quantize_command_then_eval_quantized_dir(tmp_path, random_reference, idx_data, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", "--model", "reference", "--checkpoint", str(random_reference), "--calib",
               f"real:{idx_data}", "--num-images", "16", "--scheme", "w4a8", "--range", "percentile",
               "--finetune", "recon", "--iters", "2", "--out", str(out), "--json"])  # fmt: skip
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["scheme"] == "w4a8" and res["num_images"] == 16 and res["quant"]["quant_linear"] == 24
    meta = C.read_meta(out)
    assert meta["calibration"]["method"] == "percentile" and meta["calib"]["split"] == "train"
    rc = main(["eval", "--model", str(out), "--data", str(idx_data), "--json"])
    assert rc == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["n"] == 24
    import sardfq_export as sx

    loaded = sx.load_model(out)  # the API also loads a quantized folder
    assert loaded.extra["runner_name"] == "torch-fakequant" and loaded.extra["scheme"] == "w4a8"
    assert isinstance(loaded.model.blocks[0].attn.qkv, C.QuantLinear)


def test_quantize_command_with_calib_file_and_errors(tmp_path, random_reference, capsys):
    cal = CalibSet(
        images=torch.randn(8, 1, 28, 28),
        targets=torch.softmax(torch.randn(8, 10), -1),
        meta={"method": "noise"},
    )
    cal.save(tmp_path / "calib.safetensors")
    base = ["quantize", "--model", "reference", "--checkpoint", str(random_reference), "--quiet"]
    rc = main(base + ["--calib", str(tmp_path / "calib.safetensors"), "--scheme", "w4a16", "--finetune", "kd",
                      "--iters", "2", "--out", str(tmp_path / "q")])  # fmt: skip
    assert rc == 0 and C.read_meta(tmp_path / "q")["scheme"]["name"] == "w4a16"
    assert main(base + ["--calib", "sardfq", "--out", str(tmp_path / "x")]) == 2
    assert (
        main(
            base
            + ["--calib", str(tmp_path / "calib.safetensors"), "--scheme", "w9", "--out", str(tmp_path / "x")]
        )
        == 2
    )
    bad = CalibSet(images=torch.randn(2, 3, 32, 32), meta={"method": "noise"})
    bad.save(tmp_path / "bad.safetensors")
    assert main(base + ["--calib", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "x")]) == 2
    assert "shape" in capsys.readouterr().err


# -- acceptance on the reference model (real data): slow, needs the trained weights + Fashion-MNIST ------
@pytest.mark.slow
def test_reference_model_acceptance(reference):
    from conftest import FASHION_MNIST_DIR

    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed")
    import sardfq_export as sx
    from sardfq_export.data import load_dataset

    cal, _ = sx.calibration_set("real:fashion-mnist", reference, 32)
    images, labels = load_dataset("fashion-mnist", reference.data_config, "test").take(range(10000))

    @torch.inference_mode()
    def logits(model):  # batches of 250: ~35% faster than 1000 on a CPU (measured, one thread)
        return torch.cat([model(c) for c in images.split(250)])

    def top1_of(z):
        return (z.argmax(1) == labels).sum().item() / 100

    def top1(model):
        return top1_of(logits(model))

    fp_logits = logits(reference.model)  # one pass per model: 10k images each
    fp = top1_of(fp_logits)
    qmodel = C.quantize_model(reference.model, "w8a8")
    C.set_quantizers_enabled(qmodel, False)
    with torch.inference_mode():  # quantizers off: the float model's logits, bit for bit
        assert torch.equal(qmodel(images[:1000]), reference.model(images[:1000]))
    drops = {}
    for scheme, limit in (("w8a8", 0.3), ("w4a8", 1.5), ("w4a16", 1.0)):
        qmodel = sx.quantize(reference, cal, scheme=scheme, progress=False).model
        drops[scheme] = fp - top1(qmodel)
        assert drops[scheme] <= limit, (scheme, drops)
    # Reconstruction improves a round-to-nearest model (measured 88.31 → 88.67). GPTQ rounding (the
    # default for 4-bit weights since the real-ViT issue) is judged on what it minimizes, the
    # model's error against FP32, not on top-1: this model is saturated, and GPTQ's top-1 against
    # round-to-nearest's moved with the CPU (88.52 vs 88.31 on one AVX-512 host, 88.33 vs 88.40 on
    # an AVX2 one, 7 images of 10k) while its logit KL to FP32 stayed lower (AVX2: 0.0286 vs 0.0308;
    # agreement with FP32 95.37% vs 95.05%).
    nearest = sx.quantize(reference, cal, scheme="w4a4", weight_rounding="nearest", progress=False).model
    nearest_logits = logits(nearest)
    plain = top1_of(nearest_logits)
    recon = sx.quantize(
        reference, cal, scheme="w4a4", weight_rounding="nearest", finetune="recon", progress=False
    )
    assert top1(recon.model) > plain
    gptq = sx.quantize(reference, cal, scheme="w4a4", progress=False).model
    fp_log = fp_logits.log_softmax(1)
    kl, agreement = {}, {}
    for name, z in (("gptq", logits(gptq)), ("nearest", nearest_logits)):
        log = z.log_softmax(1)
        kl[name] = F.kl_div(log, fp_log, log_target=True, reduction="batchmean").item()
        agreement[name] = (log.argmax(1) == fp_log.argmax(1)).float().mean().item()
    assert kl["gptq"] < kl["nearest"], kl
    assert agreement["gptq"] > agreement["nearest"], agreement
