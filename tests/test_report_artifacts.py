"""The report people look at and the report CI reads, checked against the files they describe.

One small main job on the embedded reference model (SARDFQ synthesis for 3 iterations, a tiny IDX
data set, a shortened latency measurement), then the same folder at w4a16 and at another target:

- report.md embeds its PNG plots (latency, accuracy per stage, synthesis loss, per-layer
  sensitivity), each a real PNG next to it and in the manifest;
- every report field that describes an artifact agrees with it (lint counts vs the ONNX, the op
  census settings vs the runtime settings, sizes and digests vs the files);
- switching ``--target`` with ``--overwrite`` removes the earlier run's artifacts from the disk,
  the report and the manifest, and switching back rebuilds them.
"""

from __future__ import annotations

import json
import re
import shutil
import struct

import numpy as np
import onnx
import pytest
from conftest import needs_reference
from onnx import TensorProto
from test_pipeline import _write_idx

from sardfq_export.cli import main
from sardfq_export.core.calibset import CalibSet
from sardfq_export.core.io import sha256_file

pytestmark = needs_reference

PLOTS = {"latency": "latency.png", "accuracy": "accuracy.png", "synthesis_loss": "synthesis_loss.png",
         "sensitivity": "sensitivity.png"}  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """``(args, out)`` of one finished w8a8 job (built once per module, never modified)."""
    root = tmp_path_factory.mktemp("rep")
    data = root / "idx"
    data.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(data / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (48, 28, 28)))
    _write_idx(data / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 48))
    # random images and labels: the top-1 drop means nothing here, its gate is opened explicitly
    args = ["--num-images", "8", "--iters", "3", "--data", str(data), "--max-top1-drop", "100", "--quiet"]
    out = root / "J"
    with pytest.MonkeyPatch.context() as mp:
        _shorten_latency(mp)
        assert main([*args, "--out", str(out)]) == 0
    return args, out


def _shorten_latency(mp) -> None:
    """The job's latency measurement with its batches (1 and 32) and runners, far fewer timed calls."""
    from sardfq_export.validation import latency

    compare = latency.compare

    def short(r, d, s, b, **k):
        return compare(r, d, s, b, warmup=1, iters=3, max_seconds=0.0, extras=k.get("extras"))

    mp.setattr(latency, "compare", short)


@pytest.fixture
def fast(monkeypatch):
    _shorten_latency(monkeypatch)


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_report_md_embeds_every_plot_next_to_it(base):
    from PIL import Image

    _, out = base
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert report["plots"] == PLOTS  # synthesis ran, --data gave accuracies, latency measured
    for name in PLOTS.values():
        path = out / name
        w, h = _png_size(path)
        assert 400 <= w <= 2500 and 250 <= h <= 2500, (name, w, h)
        with Image.open(path) as im:
            im.verify()  # a complete, valid PNG (CRCs), not only a header
        assert f"]({name})" in md, name  # embedded with a relative path
        assert (
            manifest["artifacts"][name]["sha256"] == sha256_file(path) == report["artifacts"][name]["sha256"]
        )
    # each picture sits in its section
    for section, name in (("## Accuracy", "accuracy.png"), ("## Latency", "latency.png"),
                          ("## Per-layer sensitivity", "sensitivity.png")):  # fmt: skip
        start = md.index(section)
        nxt = md.find("\n## ", start + 1)
        assert f"]({name})" in md[start : nxt if nxt > 0 else None], name
    assert md.index("](synthesis_loss.png)") < md.index("## ")  # under the calibration line


def test_samples_png_is_captioned_with_class_names(base):
    from sardfq_export.models import load_model
    from sardfq_export.synthesis.samples import captions

    _, out = base
    cal = CalibSet.load(out / "calib.safetensors")
    loaded = load_model()
    names = loaded.model.pretrained_cfg["label_names"]  # Fashion-MNIST's, e.g. "T-shirt/top"
    caps = captions(cal, loaded)
    assert [c.split(" (")[0] for c, _ in caps] == [f"{int(c)} {names[int(c)]}" for c in cal.labels]
    w, h = _png_size(out / "samples.png")
    assert w >= 300 and h >= 100


def _int4_weights(model: onnx.ModelProto) -> int:
    inits = {t.name: t for t in model.graph.initializer}
    return sum(
        1
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and inits[n.input[0]].data_type == TensorProto.INT4
    )


def _cross_check(out, scheme: str) -> dict:
    """Every report field that describes an artifact, against the artifact."""
    from sardfq_export.job import ARTIFACTS

    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    model = onnx.load(str(out / "model.onnx"))
    nodes = [n.op_type for n in model.graph.node]
    meta = {p.key: p.value for p in model.metadata_props}
    assert report["scheme"] == meta["sardfq.scheme"] == scheme
    lint = report["lint"]["stats"]
    assert lint["quantize_linear"] == nodes.count("QuantizeLinear")
    assert lint["dequantize_linear"] == nodes.count("DequantizeLinear")
    assert lint["opset"] == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert lint["int4_tensors"] == _int4_weights(model)
    assert json.loads(meta["sardfq.weights"]) == report["export"]["weights"]
    census = report["op_census"]
    assert census["settings"] == report["runtime_settings"]  # fuse_attention said false vs true before
    assert census["settings"]["fuse_attention"] is True and census["attention"] == 6  # and it did fuse
    deployed = onnx.load(str(out / report["deployed_model"]))
    assert sum(n.op_type == "MultiHeadAttention" for n in deployed.graph.node) == census["attention"]
    cal, held = CalibSet.load(out / "calib.safetensors"), CalibSet.load(out / "holdout.safetensors")
    assert report["calibration"]["num_images"] == len(cal) and report["fidelity"]["n"] == len(held)
    assert report["calibration"]["holdout"] == len(held)
    # artifacts: every listed file is there with that digest; every artifact on disk is listed
    for name, entry in report["artifacts"].items():
        assert (
            entry["sha256"] == sha256_file(out / entry["path"])
            and entry["bytes"] == (out / entry["path"]).stat().st_size
        )
        assert manifest["artifacts"][name] == entry, name
    on_disk = {n for n in ARTIFACTS if (out / n).is_file()} | {n for n in ARTIFACTS if (out / n).is_dir()}
    listed = {k.split("/")[0] for k in manifest["artifacts"]}
    assert on_disk <= listed and listed - {"report.json", "report.md"} <= on_disk
    # nothing else is left in the folder but the manifest and the stage cache's state
    assert {p.name for p in out.iterdir()} - listed == {"manifest.json", ".sardfq-state.json"}
    for name in report["plots"].values():
        assert (out / name).is_file()
    return report


def test_report_fields_agree_with_the_artifacts_w8a8_and_w4a16(base, tmp_path, fast):
    args, src = base
    report = _cross_check(src, "w8a8")
    assert report["lint"]["stats"]["int4_tensors"] == 0 and report["op_census"]["int8_gemm"] == 24
    out = tmp_path / "J"
    shutil.copytree(src, out)
    assert main([*args, "--out", str(out), "--bits", "4", "--overwrite"]) == 0
    report = _cross_check(out, "w4a16")
    # 6 blocks x (qkv, proj, fc1, fc2) INT4-blocked weights: the lint said "int4_tensors: 1"
    assert report["lint"]["stats"]["int4_tensors"] == 24 == report["op_census"]["int4_gemm"]
    assert report["export"]["weights"] == {"int4-blocked": 24}


def test_switching_target_removes_stale_artifacts_and_switching_back_rebuilds_them(base, tmp_path, fast, monkeypatch,
                                                                                   capsys):  # fmt: skip
    import sardfq_export.exporters.tensorrt as trt_mod

    args, src = base
    out = tmp_path / "J"
    shutil.copytree(src, out)
    ort_only = ("model.ort.onnx", "model.fp32.onnx", "latency.png", "accuracy.png")
    existed = [n for n in ort_only if (out / n).is_file()]
    assert "model.ort.onnx" in existed
    monkeypatch.setattr(trt_mod, "tensorrt_status", lambda: (False, "TensorRT is not installed"))
    assert main([*args, "--out", str(out), "--target", "tensorrt", "--overwrite"]) == 4
    # The defect first (model.ort.onnx left on disk, in the report and the manifest), then
    # the files that came later (the float baseline, the plots) the same way.
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert not (out / "model.ort.onnx").exists()
    assert "model.ort.onnx" not in json.dumps(report["artifacts"]) + json.dumps(manifest["artifacts"])
    assert existed == list(ort_only)
    assert re.search(r"removed model\.ort\.onnx, model\.fp32\.onnx.*earlier run", capsys.readouterr().err)
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    md = (out / "report.md").read_text()
    for name in ort_only:  # gone from the disk, the report, the manifest and report.md
        assert not (out / name).exists(), name
        assert name not in report["artifacts"] and name not in manifest["artifacts"], name
        assert name not in md, name
    assert report["deployed_model"] is None and report["target"] == "tensorrt"
    assert "build_engine.sh" in manifest["artifacts"] and set(report["plots"]) == {
        "synthesis_loss",
        "sensitivity",
    }
    # and back: the earlier validation is not reused without its files; build_engine.sh goes
    assert main([*args, "--out", str(out), "--target", "onnxruntime", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "validate: running" in err and "removed build_engine.sh" in err
    assert all((out / n).is_file() for n in ort_only) and not (out / "build_engine.sh").exists()
    _cross_check(out, "w8a8")
