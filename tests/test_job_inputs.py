"""The main job's inputs: how many images are held out (and from where), real calibration that never
touches the evaluated images, and a Swin model through the whole command line."""

from __future__ import annotations

import json

import onnx
import pytest
from PIL import Image

from sardfq_export import api
from sardfq_export.cli import main
from sardfq_export.core.calibset import CalibSet
from sardfq_export.core.device import bf16_native
from sardfq_export.core.errors import UserInputError
from sardfq_export.data import check_disjoint
from sardfq_export.job import REAL_FIDELITY_IMAGES, JobConfig, holdout_plan


def _folder(root, classes=("x", "y"), n=2, size=(40, 30)):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", size, (40 * i, 80, 120)).save(root / c / f"{i}.png")
    return root


def test_holdout_plan_no_longer_doubles_synthesis(tmp_path):
    assert holdout_plan(JobConfig(num_images=32)) == (8, "calib")  # 1.25x synthesis, not 2x
    assert holdout_plan(JobConfig(num_images=100)) == (25, "calib")
    assert holdout_plan(JobConfig(num_images=4)) == (8, "calib")  # never fewer than 8
    # real test images for fidelity when --data is there: no extra synthesis at all
    assert holdout_plan(JobConfig(num_images=32, data="fashion-mnist")) == (0, "data")
    # --auto-keep-fp chooses layers on its held-out images: never the test set
    auto = JobConfig(num_images=32, data="fashion-mnist", quantize=api.QuantizeConfig(auto_keep_fp=0.99))
    assert holdout_plan(auto) == (8, "calib")
    assert holdout_plan(JobConfig(num_images=32, calib="real:fashion-mnist")) == (
        32,
        "calib",
    )  # free to hold out
    assert holdout_plan(JobConfig(num_images=32, holdout=5)) == (5, "calib")
    assert JobConfig(num_images=32).run_settings()["holdout"] == 8
    assert REAL_FIDELITY_IMAGES >= 32


def test_real_calibration_never_reads_the_evaluated_images(tmp_path):
    both = tmp_path / "both"
    _folder(both / "train")
    _folder(both / "val")
    assert check_disjoint(both, both) == ((both / "train").resolve(), (both / "val").resolve())
    assert check_disjoint(both / "train", both)[0] == (both / "train").resolve()
    for calib, data in ((both / "train", both / "train"), (both, both / "train")):
        with pytest.raises(
            UserInputError, match="would calibrate on .* the images --data .* evaluates on"
        ) as err:
            check_disjoint(calib, data)
        assert "\n" not in str(err.value) and "train/ and val/" in str(err.value)
    plain = _folder(tmp_path / "plain")
    with pytest.raises(UserInputError, match="has no train/ split"):
        check_disjoint(plain, plain)


def test_job_refuses_calibrating_on_its_test_folder_in_one_line(tmp_path, capsys):
    train = _folder(tmp_path / "train")  # a folder named train/: calibration may read it, so may --data
    argv = ["--model", "deit_tiny_patch16_224", "--random-init", "--img-size", "32", "--model-kwargs", "depth=1",
            "--num-classes", "2", "--calib", f"real:{train}", "--data", str(train), "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --calib real:") and "evaluates on" in err and "\n" not in err
    assert not (tmp_path / "o" / "calib.safetensors").exists()


SWIN = ["--model", "swin_tiny_patch4_window7_224", "--random-init", "--img-size", "56", "--num-classes", "10",
        "--model-kwargs", "window_size=7", "--model-kwargs", "depths=(2,2)", "--model-kwargs", "num_heads=(2,4)",
        "--model-kwargs", "embed_dim=64"]  # fmt: skip


@pytest.mark.slow
def test_swin_through_the_main_job_with_preprocessing_overrides(tmp_path):
    out = tmp_path / "swin"
    code = main([*SWIN, "--calib", "noise", "--num-images", "8", "--range", "minmax", "--device", "cpu",
                 "--interpolation", "bilinear", "--crop-pct", "1.0", "--mean", "0.5", "--std", "0.5",
                 "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "swin_tiny_patch4_window7_224" and report["lint"]["passed"]
    assert report["op_census"]["int8_gemm"] >= 16  # 4 blocks x (qkv, proj, fc1, fc2)
    # held out: a quarter share, at least 8, of one synthesis run (not a second 8)
    assert report["calibration"]["holdout"] == 8 and report["fidelity"]["n"] == 8
    assert len(CalibSet.load(out / "calib.safetensors")) == 8
    assert report["fidelity"]["agreement_vs_fakequant"] >= 0.875
    # --precision auto: bf16 where this CPU computes it natively (AVX512-BF16/AMX), else fp32
    assert report["runtime"]["device"] == "cpu"
    assert report["runtime"]["precision"] == ("bf16" if bf16_native("cpu") else "fp32")
    want = {"interpolation": "bilinear", "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert report["preprocessing"]["overrides"] == want
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["sardfq.preprocessing"])["overrides"] == want
    readme = (out / "README.md").read_text()
    assert "interpolation='bilinear', crop_pct=1.0" in readme and "set at quantization" in readme
    settings = json.loads((out / "quantized" / "quantized.json").read_text())["base_model"]["settings"]
    assert settings["preprocessing"] == want and settings["model_kwargs"]["depths"] == [2, 2]
