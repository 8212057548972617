"""Real labelled data: streaming, timm's eval transform bit for bit, modes, splits, errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from sardfq_export.validation.evaluate import evaluate

from sardfq_export.core.errors import UserInputError
from sardfq_export.data import data_config_with, load_dataset

# The reference model's preprocessing: 1 channel, 28×28, bilinear, crop_pct 1.0.
REF_CFG = {"input_size": (1, 28, 28), "mean": (0.2860,), "std": (0.3530,), "interpolation": "bilinear",
           "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip
PLAIN_1CH = {
    "input_size": (1, 16, 16),
    "mean": (0.0,),
    "std": (1.0,),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
}
PLAIN_3CH = dict(PLAIN_1CH, input_size=(3, 16, 16), mean=(0.0,) * 3, std=(1.0,) * 3)


def _timm_transform(cfg: dict):
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: cfg[k] for k in keys if k in cfg}, is_training=False)


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _folder(root, files: dict[str, Image.Image]):
    """{"class/name.png": image} → an ImageNet-style folder at ``root``."""
    for rel, im in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(root / rel)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """scikit-image's bundled photos (different sizes and aspect ratios), one class each, as PNG."""
    skdata = pytest.importorskip("skimage.data")
    arrays = {n: getattr(skdata, n)() for n in ("chelsea", "coffee", "astronaut", "rocket")}
    root = tmp_path_factory.mktemp("photos")
    _folder(root, {f"{n}/{n}.png": Image.fromarray(a) for n, a in arrays.items()})
    return root, arrays


@pytest.fixture(scope="module")
def deit_cfg():
    import timm
    from timm.data import resolve_data_config

    return resolve_data_config(
        model=timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=0)
    )


def test_bit_exact_with_timm_eval_transform(photos, deit_cfg):
    root, arrays = photos
    assert deit_cfg["interpolation"] == "bicubic" and deit_cfg["crop_pct"] == 0.9
    configs = [
        deit_cfg,  # 3 channels, bicubic, crop 0.9, 224
        REF_CFG,  # 1 channel (RGB photos → L), bilinear, crop 1.0, 28
        data_config_with(
            deit_cfg, interpolation="bilinear", crop_pct=1.0, crop_mode="squash", mean=0.5, std=0.5
        ),
        data_config_with(deit_cfg, crop_mode="border", crop_pct=0.95),
    ]
    for cfg in configs:
        ds = load_dataset(root, cfg)
        mode = "L" if cfg["input_size"][0] == 1 else "RGB"
        want = _timm_transform(cfg)
        assert len(ds) == 4 and ds.classes == tuple(sorted(arrays))
        for i in range(len(ds)):
            x, label = ds[i]
            expected = want(Image.fromarray(arrays[ds.classes[label]]).convert(mode))
            assert x.shape == tuple(cfg["input_size"]) and torch.equal(x, expected), (cfg, ds.classes[label])
    ds = load_dataset(root, configs[2])
    assert ds.overrides == {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash",
                            "mean": (0.5,) * 3, "std": (0.5,) * 3}  # fmt: skip
    assert ds.preprocessing["crop_mode"] == "squash" and ds.preprocessing["mean"] == [0.5] * 3
    assert load_dataset(root, REF_CFG).conversion.startswith("to grayscale")


def test_overrides_are_checked():
    with pytest.raises(UserInputError, match="interpolation"):
        data_config_with(REF_CFG, interpolation="cubic")
    with pytest.raises(UserInputError, match=r"crop_pct"):
        data_config_with(REF_CFG, crop_pct=0)
    with pytest.raises(UserInputError, match="expected 1 or 3"):
        data_config_with(PLAIN_3CH, mean=(0.5, 0.5))
    with pytest.raises(TypeError):
        data_config_with(REF_CFG, input_size=(1, 32, 32))
    cfg = data_config_with(PLAIN_3CH, mean="0.4, 0.5,0.6", std=None)
    assert cfg["mean"] == (0.4, 0.5, 0.6) and cfg["std"] == PLAIN_3CH["std"] and "std" not in cfg["overrides"]
    assert "overrides" not in data_config_with(PLAIN_3CH, crop_pct=None)


def test_idx_and_folder_give_the_same_tensors(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(6))
    _folder(tmp_path / "f", {f"0/{i}.png": Image.fromarray(a) for i, a in enumerate(imgs)})
    for cfg in (REF_CFG, dict(PLAIN_3CH, input_size=(3, 40, 40), interpolation="bicubic", crop_pct=0.9)):
        idx, folder = load_dataset(tmp_path, cfg), load_dataset(tmp_path / "f", cfg)
        assert torch.equal(idx.take(range(6))[0], folder.take(range(6))[0])
    idx = load_dataset(tmp_path, REF_CFG)
    # 28×28 into a 28×28 model: the transform is exactly (x/255 - mean)/std, as before streaming.
    direct = (torch.from_numpy(imgs).float()[:, None] / 255 - 0.2860) / 0.3530
    assert torch.equal(idx.take(range(6))[0], direct)
    assert idx.conversion == "none (grayscale)"
    assert load_dataset(tmp_path, PLAIN_3CH).conversion == "grayscale → RGB (replicated)"
    with pytest.raises(UserInputError, match="train-images-idx3-ubyte"):
        load_dataset(tmp_path, REF_CFG, split="train")


def test_16bit_png_scales_to_0_1(tmp_path):
    ramp = np.round(np.linspace(0, 65535, 16 * 16)).astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode == "I;16"
    _folder(tmp_path / "d", {"a/ramp.png": Image.open(tmp_path / "ramp.png")})
    # Documented mapping: rounded to 8 bits (v·255/65535, half up), then timm's ToTensor (/255).
    want8 = torch.from_numpy((ramp.astype(np.int64) * 255 + 32767) // 65535).float() / 255
    for cfg in (PLAIN_1CH, PLAIN_3CH):
        x, _ = load_dataset(tmp_path / "d", cfg)[0]
        assert torch.equal(x, want8.expand_as(x))
        assert torch.allclose(x, torch.from_numpy(ramp / 65535.0).float().expand_as(x), atol=0.5 / 255 + 1e-6)
        assert x.min() == 0 and x.max() == 1 and abs(x.mean() - 0.5) < 0.01  # not saturated


def test_alpha_and_palette(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = (255, 0, 0, 0)  # transparent red → white
    rgba[:, 8:] = (0, 0, 255, 255)  # opaque blue
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(0, (0, 0, 8, 16))
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0  # index 0 (red) transparent → white
    la = Image.fromarray(np.stack([np.full((16, 16), 40, np.uint8), rgba[..., 3]], -1), "LA")
    files = {
        "a/rgba.png": Image.fromarray(rgba, "RGBA"),
        "b/pal.png": pal,
        "c/pal_t.png": pal_t,
        "d/la.png": la,
    }
    ds = load_dataset(_folder(tmp_path, files), PLAIN_3CH)
    x = {ds.classes[label]: img for img, label in (ds[i] for i in range(len(ds)))}
    white, red, green, blue = (
        torch.tensor(v, dtype=torch.float32) for v in ((1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1))
    )
    assert torch.equal(x["a"][:, 0, 0], white) and torch.equal(x["a"][:, 0, 15], blue)
    assert torch.equal(x["b"][:, 0, 0], red) and torch.equal(x["b"][:, 0, 15], green)
    assert torch.equal(x["c"][:, 0, 0], white) and torch.equal(x["c"][:, 0, 15], green)
    assert torch.equal(x["d"][:, 0, 0], white) and torch.equal(x["d"][:, 0, 15], torch.full((3,), 40 / 255))
    gray = load_dataset(tmp_path, PLAIN_1CH)[0][0]  # rgba → over white → L (601-2 luma)
    assert gray[0, 0, 0] == 1 and gray[0, 0, 15] == round(255 * 0.114) / 255


def test_limit_decodes_only_the_images_it_keeps(tmp_path, monkeypatch):
    files = {f"{c}/{i}.png": Image.new("L", (8, 8), 10 * i) for c in ("a", "b", "c", "d") for i in range(5)}
    _folder(tmp_path, files)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    ds = load_dataset(tmp_path, PLAIN_1CH, limit=4)
    assert opened == [] and len(ds) == 4
    images, labels = next(iter(ds.loader(batch_size=8, num_workers=0)))
    assert len(opened) == 4 and images.shape == (4, 1, 16, 16)
    assert labels.tolist() == [0, 1, 2, 3]  # spread over the sorted list, not the first class only
    opened.clear()
    assert ds.take([2], num_workers=0)[1].tolist() == [2] and len(opened) == 1
    opened.clear()
    res = evaluate(lambda x: torch.eye(4)[torch.arange(len(x)) % 4], load_dataset(tmp_path, PLAIN_1CH),
                   batch_size=2, progress=False, num_workers=0, limit=2)  # fmt: skip
    assert len(opened) == 2 and res["n"] == 2 and res["top1"] == 0.5 and res["top5"] == 1.0
    assert set(res) >= {"dataset", "n", "top1", "top5", "predictions", "preprocessing"}
    assert res["predictions"].tolist() == [0, 1]


def test_several_runners_are_evaluated_in_one_pass_over_the_data(tmp_path, monkeypatch):
    """validate's float, fake-quant and deployed accuracies decode each image once, not once each."""
    from sardfq_export.validation.evaluate import evaluate_runners

    files = {
        f"{c}/{i}.png": Image.new("L", (8, 8), 10 * i + 3 * j) for j, c in enumerate("abcd") for i in range(5)
    }
    _folder(tmp_path, files)
    ds = load_dataset(tmp_path, PLAIN_1CH)
    weights = torch.randn(2, 256, 4, generator=torch.Generator().manual_seed(0))
    runners = {k: (lambda x, w=w: x.flatten(1) @ w) for k, w in zip(("a", "b"), weights, strict=True)}
    alone = {k: evaluate(r, ds, batch_size=3, progress=False, num_workers=0) for k, r in runners.items()}
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    both = evaluate_runners(runners, ds, batch_size=3, progress=False, num_workers=0)
    assert len(opened) == 20 and list(both) == ["a", "b"]
    for k in runners:
        assert both[k]["top1"] == alone[k]["top1"] and both[k]["top5"] == alone[k]["top5"]
        assert torch.equal(both[k]["predictions"], alone[k]["predictions"])
    assert both["a"]["predictions"].tolist() != both["b"]["predictions"].tolist()  # not one runner twice


def test_train_split_is_refused_on_a_test_folder(tmp_path):
    from sardfq_export.synthesis.sources import real_calibration

    one = {"x/0.png": Image.new("RGB", (8, 8)), "y/0.png": Image.new("RGB", (8, 8))}
    plain = _folder(tmp_path / "plain", one)
    with pytest.raises(UserInputError, match=r"has no train/ split: calibrating on it would use test images"):
        load_dataset(plain, PLAIN_3CH, split="train")
    with pytest.raises(UserInputError, match="pass real:TRAIN_DIR"):
        real_calibration(str(plain), PLAIN_3CH, n=1)
    both = tmp_path / "both"
    _folder(both / "train", {**one, "z/0.png": Image.new("RGB", (8, 8))})
    _folder(both / "val", one)
    train, test = load_dataset(both, PLAIN_3CH, split="train"), load_dataset(both, PLAIN_3CH)
    assert (len(train), train.classes, train.name) == (3, ("x", "y", "z"), str(both / "train"))
    assert (len(test), test.name) == (2, str(both / "val"))
    assert len(load_dataset(both / "train", PLAIN_3CH, split="train")) == 3  # a folder named train/
    assert len(real_calibration(str(both), PLAIN_3CH, n=2).images) == 2


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_names_its_path(tmp_path, workers):
    _folder(tmp_path, {"a/good.png": Image.new("RGB", (8, 8))})
    bad = tmp_path / "b" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    ds = load_dataset(tmp_path, PLAIN_3CH)
    with pytest.raises(UserInputError) as err:
        list(ds.batches(batch_size=1, num_workers=workers))
    msg = str(err.value)
    assert msg.startswith(f"cannot read image {bad}:") and "\n" not in msg and "Traceback" not in msg
    with pytest.raises(UserInputError, match="no images found"):
        (tmp_path / "empty" / "c").mkdir(parents=True)
        load_dataset(tmp_path / "empty", PLAIN_3CH)
