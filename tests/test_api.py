"""The public API: the README's example runs as written, and the verbs take plain timm modules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import needs_fmnist, needs_reference, tiny_vit

import sardfq_export as sx

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_is_short_and_uses_public_names_only():
    code = readme_example()
    lines = [ln for ln in code.splitlines() if ln.strip()]
    assert len(lines) <= 6, code
    assert lines[0] == "import sardfq_export as sx"
    used = set(re.findall(r"\bsx\.(\w+)", code))
    assert used and used <= set(sx.__all__), used - set(sx.__all__)


@pytest.mark.slow
@needs_fmnist
@needs_reference
def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    top1 = float(re.search(r"deployed top-1 ([0-9.]+)", printed).group(1))
    # the reference model: 89.44% FP32; w8a8 from SARDFQ data deploys within half a point of it
    assert top1 > 0.889, printed
    assert "gates passed: True" in printed
    assert (tmp_path / "sardfq-api" / "model.onnx").is_file()


def test_synthesize_wraps_a_plain_timm_module():
    model = tiny_vit()
    calib = sx.synthesize(model, method="psaq", num_images=2, iters=2, batch_size=2, progress=False)
    assert calib.images.shape == (2, 3, 32, 32) and torch.isfinite(calib.images).all()
    assert calib.meta["method"] == "psaq"


def test_quantize_and_export_a_plain_module_from_a_tensor(tmp_path):
    model = tiny_vit()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q = sx.quantize(model, images, scheme="w8a8", progress=False)
    assert isinstance(q, sx.Quantized) and q.scheme.name == "w8a8" and q.config.range == "auto"
    assert q.summary["resolved"] == {"range": "minmax", "weight_range": "mse", "weight_rounding": "nearest"}
    res = sx.export(q, tmp_path / "m.onnx")
    assert res.lint.passed and res.path.is_file()


def test_quantize_calibrates_on_all_the_images_it_is_given_unless_told_fewer():
    """A caller who made 40 images means 40 (it used to keep the first 32 silently)."""
    model = tiny_vit()
    images = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q = sx.quantize(model, images, scheme="w4a16", progress=False)
    assert q.summary["calib"]["num_images"] == 40 and q.summary["gptq"]["tokens"] == 40 * 17
    q = sx.quantize(model, sx.CalibSet(images=images, meta={}), scheme="w8a8", num_images=24, progress=False)
    assert q.summary["calib"]["num_images"] == 24
    cal, held = sx.calibration_set(images, model, 30, holdout=1)
    assert len(cal) == 30 and len(held) == 10 and torch.equal(held.images, images[30:])


def test_unknown_setting_is_a_one_line_user_error():
    with pytest.raises(sx.UserInputError, match="QuantizeConfig has no setting schem"):
        sx.quantize(tiny_vit(), torch.zeros(1, 3, 32, 32), schem="w8a8")


def test_configs_are_frozen():
    cfg = sx.QuantizeConfig()
    with pytest.raises(AttributeError):
        cfg.scheme = "w4a4"  # type: ignore[misc]
    assert (cfg.scheme, cfg.range, cfg.weight_range, cfg.finetune) == ("w8a8", "auto", "mse", "none")
    assert cfg.weight_rounding == "auto"
