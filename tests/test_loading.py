"""Model loading parity with timm's conventions: checkpoint forms, inference, EMA, resampling, safety."""

from __future__ import annotations

import argparse
import copy
import json
import pickle

import pytest
import timm
import torch
from conftest import needs_reference
from safetensors.torch import save_file

from sardfq_export.core.errors import UserInputError
from sardfq_export.models import loading
from sardfq_export.models.loading import ModelSettings, load_model, resolve_name

VIT = "vit_tiny_patch16_224"
VIT_ARGS = dict(img_size=64, num_classes=10, depth=2)
SWIN = "swin_tiny_patch4_window7_224"
SWIN_ARCH = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))
INFERRED = ("num_classes", "img_size", "in_chans")


def _inputs(size: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _build(name: str, seed: int, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kw).eval()


@pytest.fixture(scope="module")
def vit():
    """A tiny ViT (64 px, 10 classes, depth 2) and its 'EMA' twin with other weights."""
    model = _build(VIT, 1, **VIT_ARGS)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, ema


@pytest.fixture(scope="module")
def swin():
    return _build(SWIN, 2, img_size=64, num_classes=10, **SWIN_ARCH)


def _train_checkpoint(model, ema) -> dict:
    """What timm's train.py (CheckpointSaver) writes."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return {
        "epoch": 7,
        "arch": VIT,
        "optimizer": opt.state_dict(),
        "version": 2,
        "args": argparse.Namespace(model=VIT, lr=1e-3, input_size=None, model_kwargs={}, mean=(0.5,)),
        "state_dict": _state(model),
        "state_dict_ema": _state(ema),
        "metric": 71.25,
        "saver": {
            "checkpoint_files": [("checkpoint-6.pth.tar", 70.5)],
            "best_epoch": 6,
            "pending": (7, 71.25),
        },
    }


def _write(form: str, model, ema, tmp_path):
    """Save ``model`` in one of the forms people hand us; returns the file (or local-dir: name)."""
    state = _state(model)
    if form == "safetensors":
        save_file(state, tmp_path / "w.safetensors")
        return tmp_path / "w.safetensors"
    if form == "local-dir":
        timm.models.save_for_hf(model, tmp_path / "dir", safe_serialization=True)
        return f"local-dir:{tmp_path / 'dir'}"
    obj = {
        "torch": state,
        "train": _train_checkpoint(model, ema),
        "train-legacy": _train_checkpoint(model, ema),
        "deit": {"model": state, "model_ema": _state(ema), "args": argparse.Namespace(model=VIT)},
        "compiled": {f"_orig_mod.{k}": v for k, v in state.items()},
        "ddp": {f"module.{k}": v for k, v in state.items()},
        "ddp-compiled": {"state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}},
        "compiled-ddp": {f"_orig_mod.module.{k}": v for k, v in state.items()},
    }[form]
    # "train-legacy": torch's pre-1.6 (non-zip) serialization, as old checkpoints have it
    torch.save(obj, tmp_path / "w.pth.tar", _use_new_zipfile_serialization=form != "train-legacy")
    return tmp_path / "w.pth.tar"


FORMS = (
    "safetensors",
    "torch",
    "train",
    "train-legacy",
    "deit",
    "compiled",
    "ddp",
    "ddp-compiled",
    "compiled-ddp",
    "local-dir",
)


@pytest.mark.parametrize("form", FORMS)
def test_every_checkpoint_form_loads_bit_exact_with_shapes_inferred(form, vit, tmp_path):
    model, ema = vit
    f = _write(form, model, ema, tmp_path)
    if form == "local-dir":  # the folder's config.json carries the architecture
        loaded = load_model(f)
    else:  # no num_classes / img_size / in_chans: read off the checkpoint
        loaded = load_model(VIT, f, model_kwargs={"depth": 2})
    x = _inputs()
    assert torch.equal(loaded.model(x), model(x))
    s = loaded.settings
    assert (s.num_classes, s.img_size, s.in_chans) == (10, 64, 3)
    assert s.inferred == INFERRED and loaded.input_size == (3, 64, 64)
    assert (
        loaded.describe_inferred() == "inferred num_classes=10, img_size=64, in_chans=3 from the checkpoint"
    )
    assert loaded.family == "vit" and not any(p.requires_grad for p in loaded.model.parameters())


def test_settings_roundtrip_through_json_rebuild_the_same_model(vit, tmp_path):
    model, ema = vit
    f = _write("train", model, ema, tmp_path)
    loaded = load_model(VIT, f, model_kwargs={"depth": 2}, use_ema=True)
    s = loaded.settings
    back = ModelSettings.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and hash(back) == hash(s) and back.inferred == INFERRED
    again = load_model(**back.to_dict())
    assert again.settings == s and again.settings.inferred == ()  # all explicit now
    x = _inputs()
    assert torch.equal(again.model(x), loaded.model(x))
    assert s.checkpoint == str(f.resolve()) and s.pretrained is False and s.kwargs == {"depth": 2}
    with pytest.raises(UserInputError, match="not ModelSettings"):
        ModelSettings.from_dict({**s.to_dict(), "bogus": 1})


def test_use_ema_picks_the_ema_weights(vit, tmp_path):
    model, ema = vit
    x = _inputs()
    for form in ("train", "deit"):
        f = _write(form, model, ema, tmp_path)
        plain = load_model(VIT, f, model_kwargs={"depth": 2})
        averaged = load_model(VIT, f, model_kwargs={"depth": 2}, use_ema=True)
        assert torch.equal(plain.model(x), model(x))
        assert torch.equal(averaged.model(x), ema(x)) and not torch.equal(ema(x), model(x))
    f = _write("safetensors", model, ema, tmp_path)
    with pytest.raises(UserInputError, match="no EMA weights.*drop --use-ema"):
        load_model(VIT, f, model_kwargs={"depth": 2}, use_ema=True)
    with pytest.raises(UserInputError, match="--use-ema picks"):
        load_model(VIT, use_ema=True, pretrained=False)
    torch.save({"state_dict_ema": _state(ema)}, tmp_path / "ema_only.pth")
    with pytest.raises(UserInputError, match="only EMA weights: pass --use-ema"):
        load_model(VIT, tmp_path / "ema_only.pth", model_kwargs={"depth": 2})


def test_explicit_img_size_resamples_like_timm(vit, swin, tmp_path):
    from timm.models import swin_transformer, vision_transformer

    model, ema = vit
    f = _write("safetensors", model, ema, tmp_path)
    loaded = load_model(VIT, f, img_size=96, model_kwargs={"depth": 2})
    assert loaded.settings.img_size == 96 and loaded.settings.inferred == ("num_classes", "in_chans")
    assert loaded.input_size == (3, 96, 96)
    ref = timm.create_model(VIT, pretrained=False, img_size=96, num_classes=10, depth=2).eval()
    ref.load_state_dict(vision_transformer.checkpoint_filter_fn(_state(model), ref))
    x = _inputs(96)
    out = loaded.model(x)
    assert out.shape == (2, 10) and torch.equal(out, ref(x))

    save_file(_state(swin), tmp_path / "s.safetensors")
    loaded = load_model(SWIN, tmp_path / "s.safetensors", img_size=96, model_kwargs=SWIN_ARCH)
    ref = timm.create_model(SWIN, pretrained=False, img_size=96, num_classes=10, **SWIN_ARCH).eval()
    ref.load_state_dict(swin_transformer.checkpoint_filter_fn(_state(swin), ref))
    assert torch.equal(loaded.model(x), ref(x))


@pytest.mark.parametrize("form", ("safetensors", "compiled-ddp"))
def test_swin_checkpoints_load_with_size_read_off_clamped_windows(form, swin, tmp_path):
    f = _write(form, swin, swin, tmp_path)
    loaded = load_model(SWIN, f, model_kwargs=SWIN_ARCH)
    x = _inputs()
    assert torch.equal(loaded.model(x), swin(x)) and loaded.family == "swin"
    assert loaded.settings.img_size == 64 and loaded.settings.inferred == INFERRED


def test_swin_at_its_default_size_keeps_it_and_says_nothing_about_it(tmp_path):
    # A 224 Swin's weights have no trace of the image size (no window is clamped): not inferred.
    model = _build(SWIN, 3, num_classes=4, **SWIN_ARCH)
    save_file(_state(model), tmp_path / "s.safetensors")
    loaded = load_model(SWIN, tmp_path / "s.safetensors", model_kwargs=SWIN_ARCH)
    assert loaded.settings.inferred == ("num_classes", "in_chans") and loaded.settings.img_size is None
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.model(x), model(x))


class _Payload:
    """A pickle that creates a file when unpickled (what a malicious checkpoint does, harmlessly)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickles_never_run(vit, tmp_path):
    model, _ = vit
    live = tmp_path / "control"  # the payload is live: plain pickle runs it
    pickle.loads(pickle.dumps(_Payload(live)))
    assert live.exists()
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _state(model), "args": _Payload(marker)}, tmp_path / "args.pth")
    torch.save(
        {"state_dict": _state(model), "epoch": 1, "extra": [1, {"x": _Payload(marker)}]},
        tmp_path / "deep.pth",
    )
    torch.save(_Payload(marker), tmp_path / "whole.pth")
    with open(tmp_path / "legacy.pkl", "wb") as fh:
        pickle.dump({"state_dict": _Payload(marker)}, fh)
    for f in ("args.pth", "deep.pth", "whole.pth", "legacy.pkl"):
        with pytest.raises(UserInputError) as err:
            load_model(VIT, tmp_path / f, model_kwargs={"depth": 2})
        msg = str(err.value)
        assert "\n" not in msg and str(tmp_path / f) in msg, msg
        assert "refused" in msg or "cannot read" in msg, msg
        assert not marker.exists(), f"{f} ran its payload"


def test_unfit_checkpoints_say_what_to_pass(vit, swin, tmp_path):
    model, ema = vit
    f = _write("train", model, ema, tmp_path)
    with pytest.raises(
        UserInputError, match=r"does not fit vit_tiny_patch16_224.*--model-kwargs depth=2"
    ) as err:
        load_model(VIT, f)  # the checkpoint has 2 blocks, the default model 12
    assert "\n" not in str(err.value)
    with pytest.raises(UserInputError, match="does not fit.*head.weight"):
        load_model(VIT, f, num_classes=5, model_kwargs={"depth": 2})
    with pytest.raises(UserInputError, match="embed_dim=192"):
        load_model("vit_small_patch16_224", f, model_kwargs={"depth": 2})
    save_file(_state(swin), tmp_path / "s.safetensors")
    with pytest.raises(UserInputError, match="does not fit"):
        load_model(VIT, tmp_path / "s.safetensors", model_kwargs={"depth": 2})
    patch8 = _build(VIT, 4, patch_size=8, **VIT_ARGS)
    save_file(_state(patch8), tmp_path / "p8.safetensors")
    with pytest.raises(UserInputError, match="patch_size=8"):
        load_model(VIT, tmp_path / "p8.safetensors", model_kwargs={"depth": 2})
    ok = load_model(VIT, tmp_path / "p8.safetensors", model_kwargs={"depth": 2, "patch_size": 8})
    assert torch.equal(ok.model(_inputs()), patch8(_inputs())) and ok.settings.img_size == 64
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserInputError, match="cannot read checkpoint"):
        load_model(VIT, tmp_path / "junk.pth")
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "empty.pth")
    with pytest.raises(UserInputError, match="does not hold a state dict"):
        load_model(VIT, tmp_path / "empty.pth")
    with pytest.raises(UserInputError, match="does not exist"):
        load_model(VIT, tmp_path / "missing.safetensors")


def test_checkpoint_preprocessing_reaches_the_data_config(vit, tmp_path):
    model, _ = vit
    cfg = dict(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), interpolation="bilinear", crop_pct=1.0)
    timm.models.save_for_hf(model, tmp_path / "dir", safe_serialization=True, data_config=cfg)
    loaded = load_model(f"local-dir:{tmp_path / 'dir'}")
    torch.save({"state_dict": _state(model), "pretrained_cfg": cfg}, tmp_path / "w.pth")
    from_file = load_model(VIT, tmp_path / "w.pth", model_kwargs={"depth": 2})
    for dc in (loaded.data_config, from_file.data_config):
        assert dc["mean"] == pytest.approx(cfg["mean"]) and dc["std"] == pytest.approx(cfg["std"])
        assert dc["interpolation"] == "bilinear" and dc["crop_pct"] == 1.0 and dc["input_size"] == (3, 64, 64)
    plain = load_model(VIT, _write("safetensors", model, None, tmp_path), model_kwargs={"depth": 2})
    assert plain.data_config["mean"] == pytest.approx((0.5, 0.5, 0.5))  # timm's default for the name
    assert loaded.name == f"local-dir:{(tmp_path / 'dir').resolve()}" == loaded.settings.name


def test_prefixed_names_and_their_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserInputError, match=r"cannot fetch hf-hub:timm/x \(offline.*local-dir:DIR"):
        load_model("hf-hub:timm/x")
    with pytest.raises(UserInputError, match="no config.json"):
        load_model(f"local-dir:{tmp_path}")
    with pytest.raises(UserInputError, match="Unknown model source"):
        resolve_name("s3:bucket/model")
    with pytest.raises(UserInputError, match="local-dir:"):
        resolve_name(str(tmp_path))


def test_keyword_settings_fold_and_conflicts():
    loaded = load_model(VIT, pretrained=False, img_size=32, depth=1, model_kwargs={"num_classes": 3})
    s = loaded.settings
    assert (s.num_classes, s.img_size, s.model_kwargs, s.inferred) == (3, 32, (("depth", 1),), ())
    assert loaded.source == "random-init" and loaded.input_size == (3, 32, 32)
    again = load_model(**s.to_dict())
    x = _inputs(32)
    assert torch.equal(again.model(x), loaded.model(x))  # seeded random init
    with pytest.raises(UserInputError, match="num_classes given twice"):
        load_model(VIT, pretrained=False, num_classes=4, model_kwargs={"num_classes": 3})
    with pytest.raises(UserInputError, match="does not take that setting"):
        load_model(VIT, pretrained=False, model_kwargs={"no_such_arg": 1})
    with pytest.raises(UserInputError, match="model_kwargs act"):
        load_model(VIT, pretrained=False, model_kwargs={"act": {"a": 1}})


def test_zoo_hook(vit, monkeypatch, tmp_path):
    model, _ = vit
    calls = []

    def fake(img_size):
        calls.append(img_size)
        return copy.deepcopy(model), {"input_size": (3, 64, 64), "mean": (0.5,) * 3, "std": (0.5,) * 3}, "zoo"

    monkeypatch.setitem(loading.ZOO, "tiny_zoo", fake)
    assert resolve_name("tiny_zoo") == "tiny_zoo"
    loaded = load_model("tiny_zoo")
    assert loaded.name == "tiny_zoo" and loaded.source == "zoo" and loaded.settings.name == "tiny_zoo"
    assert calls == [None] and torch.equal(loaded.model(_inputs()), model(_inputs()))
    save_file(_state(model), tmp_path / "w.safetensors")
    assert load_model("tiny_zoo", tmp_path / "w.safetensors").settings.checkpoint is not None
    with pytest.raises(UserInputError, match="fixed model"):
        load_model("tiny_zoo", num_classes=3)


@needs_reference
def test_reference_model_keeps_its_behaviour(tmp_path):
    loaded = load_model()
    assert loaded.name == "reference" and loaded.extra["synthesis_iters"] > 0
    assert loaded.settings == ModelSettings("reference") and loaded.source.startswith("embedded")
    again = load_model(**loaded.settings.to_dict())
    x = torch.randn(2, *loaded.input_size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.model(x), loaded.model(x))
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in _state(loaded.model).items()}}, tmp_path / "r.pth"
    )
    mine = load_model("reference", tmp_path / "r.pth")
    assert torch.equal(mine.model(x), loaded.model(x)) and mine.settings.checkpoint == str(tmp_path / "r.pth")
    with pytest.raises(UserInputError, match="fixed model"):
        load_model(num_classes=3)


@pytest.mark.parametrize("form", ["train", "compiled", "local-dir"])
def test_the_cli_loads_each_form_and_its_artifacts_rebuild_the_model(form, vit, tmp_path, capsys):
    """Through the command line: eval infers the shapes (and says so); a quantized folder made from
    the checkpoint records the loader's settings and rebuilds the same float model."""
    import json

    import numpy as np
    from sardfq_export.calibrators import load_quantized_model
    from test_pipeline import _write_idx

    from sardfq_export.cli import main

    model, ema = vit
    f = _write(form, model, ema, tmp_path)
    data = tmp_path / "idx"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split in ("t10k", "train"):
        _write_idx(data / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (40, 28, 28)))
        _write_idx(data / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, 40))
    args = ["--model", str(f)] if form == "local-dir" else ["--model", VIT, "--checkpoint", str(f)]
    args += [] if form == "local-dir" else ["--model-kwargs", "depth=2"]
    assert main(["eval", *args, "--data", str(data), "--json"]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out.strip().splitlines()[-1])
    # the same images through the saved model itself
    from sardfq_export.data import load_dataset

    direct = load_model(VIT, model_kwargs=VIT_ARGS | {"depth": 2}, pretrained=False)
    images, labels = load_dataset(str(data), direct.data_config, split="test").take(range(40))
    with torch.no_grad():
        want = float((model(images).argmax(1) == labels).double().mean())
    assert got["n"] == 40 and got["top1"] == want
    out = tmp_path / "q"
    q = ["quantize", *args, "--calib", f"real:{data}", "--num-images", "8", "--out", str(out), "--quiet"]
    assert main(q) == 0
    loaded, _ = load_quantized_model(out)
    x = _inputs()
    assert torch.equal(loaded.model(x), model(x)) and loaded.settings.num_classes == 10
