"""Foundation: model loading, data loaders, the eval command and its errors."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from conftest import needs_fmnist, needs_reference

from sardfq_export.cli import main
from sardfq_export.core.errors import UserInputError
from sardfq_export.data import load_raw, preprocess, read_idx
from sardfq_export.models import ALIASES, load_model, resolve_name


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_aliases_resolve_to_timm_names():
    import timm

    for alias, name in ALIASES.items():
        assert resolve_name(alias) == name and timm.is_model(name)


def test_unknown_model_suggests_close_matches():
    with pytest.raises(UserInputError, match="deit_tiny_patch16_224"):
        resolve_name("deit_tiny_patch16_22")


def test_random_init_models_carry_their_preprocessing():
    loaded = load_model("deit_t", pretrained=False)
    assert loaded.family == "vit" and loaded.input_size == (3, 224, 224)
    assert loaded.data_config["mean"] == pytest.approx((0.485, 0.456, 0.406))
    swin = load_model("swin_t", pretrained=False)
    assert swin.family == "swin" and swin.input_size == (3, 224, 224)
    small = load_model(
        "deit_t", pretrained=False, img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2
    )
    assert small.input_size == (3, 32, 32)


def test_non_vit_model_is_refused():
    with pytest.raises(UserInputError, match="not a ViT"):
        load_model("resnet18", pretrained=False)


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    loaded = load_model(
        "deit_t", pretrained=False, img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2
    )
    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        again = load_model(
            "deit_t", tmp_path / f, img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2
        )
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(again.model(x), loaded.model(x))
    with pytest.raises(UserInputError, match="does not fit"):
        load_model(
            "deit_t",
            tmp_path / "w.safetensors",
            img_size=32,
            patch_size=8,
            depth=2,
            embed_dim=64,
            num_heads=2,
        )


def test_idx_reader_and_folder_loader(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (5, 8, 8))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5) % 3)
    assert np.array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), imgs)
    raw = load_raw(tmp_path, "test")
    assert raw.images.shape == (5, 8, 8, 1) and list(raw.labels) == [0, 1, 2, 0, 1]
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "folder" / c).mkdir(parents=True)
        Image.fromarray(np.full((40, 30, 3), 100, np.uint8)).save(tmp_path / "folder" / c / "a.png")
    raw = load_raw(tmp_path / "folder")
    assert raw.classes == ("cat", "dog") and len(raw) == 2
    x = preprocess(
        raw.images, {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
    )
    assert x.shape == (2, 3, 16, 16)
    assert torch.allclose(x, torch.full_like(x, (100 / 255 - 0.5) / 0.5), atol=1e-5)


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint at all")
    (tmp_path / "bad.pth").write_bytes(b"\x80\x04garbage")
    cases = [
        ["eval", "--model", "no_such_model", "--data", "fashion-mnist"],
        ["eval", "--model", "deit_t", "--random-init", "--data", str(tmp_path / "empty")],
        ["eval", "--checkpoint", str(tmp_path / "bad.safetensors"), "--data", "fashion-mnist"],
        ["eval", "--model", "deit_t", "--checkpoint", str(tmp_path / "bad.pth"), "--data", "fashion-mnist"],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


@needs_fmnist
@needs_reference
def test_reference_model_accuracy_on_real_test_set(capsys):
    assert main(["eval", "--data", "fashion-mnist", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 10000
    assert result["top1"] >= 0.88
    assert result["top5"] >= result["top1"]


def test_work_checkpoints_roundtrip_exactly_and_refuse_foreign_or_torn_files(tmp_path):
    from sardfq_export.core.checkpoint import curve_rows, load_checkpoint, save_checkpoint

    t = {"x": torch.randn(3, 4), "step": torch.tensor([7])}
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, t, {"batch": 2, "curves": [[1.5]]}, "fmt-a")
    got, state = load_checkpoint(path, "fmt-a", "synthesis checkpoint")
    assert state == {"batch": 2, "curves": [[1.5]]}
    assert all(torch.equal(got[k], t[k]) for k in t)
    with pytest.raises(UserInputError, match="is not a psaq2 checkpoint; delete it to start over"):
        load_checkpoint(path, "fmt-b", "psaq2 checkpoint")
    path.write_bytes(path.read_bytes()[:40])  # a crash in mid-copy (the writer itself is atomic)
    with pytest.raises(UserInputError, match="cannot read synthesis checkpoint"):
        load_checkpoint(path, "fmt-a", "synthesis checkpoint")
    # A calibration set reads through the same reader: a torn one is the same one-line refusal.
    from sardfq_export.core.calibset import CalibSet

    with pytest.raises(UserInputError, match=r"cannot read calibration set .*c\.safetensors"):
        CalibSet.load(path)
    assert curve_rows(0, 5) == [] and curve_rows(3, 5) == [0, 1, 2]
    assert curve_rows(10, 4) == [0, 3, 6, 9] and curve_rows(11, 4) == [0, 3, 6, 9, 10]
