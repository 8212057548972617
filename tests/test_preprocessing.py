"""Preprocessing overrides (``--interpolation/--crop-pct/--crop-mode/--mean/--std``, timm validate.py's)
through the command line: the tensors equal timm's transform with the same overrides bit for bit,
they win over a checkpoint's ``pretrained_cfg``, and they travel into every artifact."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from conftest import tiny_vit
from PIL import Image

from sardfq_export.cli import main
from sardfq_export.core.calibset import CalibSet

ARCH = ["--model", "deit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "--model-kwargs", "depth=2",
        "--model-kwargs", "embed_dim=64", "--model-kwargs", "num_heads=2"]  # fmt: skip
CKPT_CFG = {"interpolation": "bicubic", "crop_pct": 0.9, "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
OVERRIDES = ["--interpolation", "bilinear", "--crop-pct", "0.75", "--mean", "0.5", "--std", "0.25,0.3,0.35"]
EXPECTED = {"interpolation": "bilinear", "crop_pct": 0.75, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.3, 0.35]}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos of different sizes (scikit-image's), one class folder each."""
    skdata = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "coffee", "astronaut"):
        (root / name).mkdir()
        Image.fromarray(getattr(skdata, name)()).save(root / name / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny ViT's timm-style torch checkpoint carrying its own preprocessing (pretrained_cfg)."""
    path = tmp_path_factory.mktemp("ckpt") / "w.pth"
    torch.save({"state_dict": tiny_vit().state_dict(), "pretrained_cfg": CKPT_CFG}, path)
    return path


def _evaluated_dataset(monkeypatch, argv):
    """Run ``eval`` through the CLI and return the dataset it evaluated."""
    import sardfq_export.validation.evaluate as ev

    seen = {}

    def spy(runner, dataset, batch_size, **kw):
        seen["ds"] = dataset
        return {"dataset": dataset.name, "n": len(dataset), "top1": 0.0, "top5": 0.0}

    monkeypatch.setattr(ev, "evaluate", spy)
    assert main(["eval", *argv, "--quiet"]) == 0
    return seen["ds"]


def test_cli_overrides_give_timm_transform_bit_for_bit(photos, checkpoint, monkeypatch):
    from timm.data import create_transform

    ds = _evaluated_dataset(monkeypatch, [*ARCH, "--checkpoint", str(checkpoint), "--data", str(photos),
                                          *OVERRIDES, "--crop-mode", "border"])  # fmt: skip
    want = create_transform(input_size=(3, 32, 32), interpolation="bilinear", crop_pct=0.75, crop_mode="border",
                            mean=(0.5, 0.5, 0.5), std=(0.25, 0.3, 0.35), is_training=False)  # fmt: skip
    ckpt_only = create_transform(input_size=(3, 32, 32), is_training=False, **CKPT_CFG)
    differs = 0
    for i in range(len(ds)):
        x, _ = ds[i]
        image = Image.open(ds.path(i)).convert("RGB")
        assert torch.equal(x, want(image)), ds.path(i)
        differs += not torch.equal(x, ckpt_only(image))
    assert len(ds) == 3 and differs == 3  # the overrides did change every image
    assert ds.overrides == {"interpolation": "bilinear", "crop_pct": 0.75, "crop_mode": "border",
                            "mean": (0.5,) * 3, "std": (0.25, 0.3, 0.35)}  # fmt: skip


def test_checkpoint_pretrained_cfg_applies_where_no_override_is_given(photos, checkpoint, monkeypatch):
    ds = _evaluated_dataset(monkeypatch, [*ARCH, "--checkpoint", str(checkpoint), "--data", str(photos),
                                          "--crop-pct", "1.0"])  # fmt: skip
    cfg = ds.data_config
    assert cfg["interpolation"] == "bicubic" and cfg["mean"] == pytest.approx(
        CKPT_CFG["mean"]
    )  # checkpoint's
    assert cfg["crop_pct"] == 1.0 and ds.overrides == {"crop_pct": 1.0}  # the command line's


def test_bad_override_is_one_line_exit_2(photos, checkpoint, capsys):
    assert (
        main(["eval", *ARCH, "--checkpoint", str(checkpoint), "--data", str(photos), "--mean", "0.5,0.5"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "expected 1 or 3" in err and "\n" not in err


def test_overrides_travel_into_quantized_state_onnx_and_later_stages(
    photos, checkpoint, tmp_path, monkeypatch
):
    calib = tmp_path / "calib.safetensors"
    CalibSet(images=torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
             meta={"method": "tensor"}).save(calib)  # fmt: skip
    q = tmp_path / "q"
    assert main(["quantize", *ARCH, "--checkpoint", str(checkpoint), "--calib", str(calib), "--num-images", "4",
                 "--range", "minmax", "--out", str(q), "--device", "cpu", *OVERRIDES, "--quiet"]) == 0  # fmt: skip
    saved = json.loads((q / "quantized" / "quantized.json").read_text())
    assert saved["base_model"]["settings"]["preprocessing"] == EXPECTED
    # export, with no preprocessing options: the folder's preprocessing is what the ONNX records
    assert main(["export", "--quantized", str(q), "--out", str(tmp_path / "m.onnx"), "--quiet"]) == 0
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    pre = json.loads(props["sardfq.preprocessing"])
    assert {k: pre[k] for k in EXPECTED} == EXPECTED and pre["overrides"] == EXPECTED
    assert pre["input_size"] == [3, 32, 32]
    # evaluating the quantized folder reads its images the way it was quantized
    ds = _evaluated_dataset(monkeypatch, ["--model", str(q), "--data", str(photos)])
    assert {k: ds.preprocessing[k] for k in EXPECTED} == EXPECTED
