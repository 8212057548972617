"""Validation: fidelity metrics, latency, gates, report keys, manifest."""

from __future__ import annotations

import json

import pytest
import torch

from sardfq_export.errors import GateFailedError
from validation.fidelity import compare_logits, fidelity
from validation.gates import GateSpec, enforce, evaluate_gates
from validation.latency import compare, measure
from validation.manifest import collect_artifacts, sha256_file, write_manifest
from validation.report import REPORT_KEYS, build_report, render_markdown, write_report


class Affine:
    """A toy runner: logits = images summed per channel, scaled."""

    def __init__(self, scale: float = 1.0, name: str = "toy"):
        self.scale, self.name, self.device = scale, name, "cpu"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(2).sum(-1) * self.scale


def test_compare_logits_and_fidelity():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    same = compare_logits(a, a)
    assert same["agreement"] == 1.0 and same["cosine"] == pytest.approx(1.0)
    flipped = compare_logits(a, a.flip(1))
    assert flipped["agreement"] == 0.0 and flipped["cosine"] == pytest.approx(0.0)
    x = torch.randn(10, 3, 4, 4)
    f = fidelity(Affine(), Affine(), Affine(2.0), x, batch_size=3)
    assert f["n"] == 10 and f["agreement_vs_fp32"] == 1.0 and f["cosine_vs_fakequant"] == pytest.approx(1.0)


def test_latency_reports_percentiles_and_speedup():
    x = torch.randn(4, 3, 8, 8)
    m = measure(Affine(), x, warmup=1, iters=5)
    assert m["p50_ms"] <= m["p95_ms"] and m["throughput_ips"] > 0 and m["iters"] == 5
    lat = compare(Affine(name="ref"), Affine(name="dep"), x, batches=(1, 6), warmup=1, iters=4)
    assert lat["batch"] == 1 and set(lat["by_batch"]) == {"1", "6"}
    assert lat["reference"]["runtime"] == "ref" and lat["deployed"]["runtime"] == "dep" and lat["speedup"] > 0


def _report(**over):
    base = dict(
        model="m", scheme="w8a8", target="onnxruntime",
        calibration={"method": "noise", "num_images": 8, "iters": 0, "seed": 0},
        accuracy={"dataset": "d", "n": 10, "fp32_top1": 0.9, "fakequant_top1": 0.89, "deployed_top1": 0.89,
                  "top1_drop": 1.0},
        fidelity={"n": 8, "agreement_vs_fp32": 0.99, "agreement_vs_fakequant": 1.0, "cosine_vs_fakequant": 0.99999},
        latency={"device": "cpu", "batch": 1, "reference": {"runtime": "torch", "p50_ms": 2.0, "p95_ms": 3.0},
                 "deployed": {"runtime": "ort", "p50_ms": 1.0, "p95_ms": 1.5}, "speedup": 2.0},
        lint={"passed": True, "violations": []}, gates=None, artifacts=None,
    )  # fmt: skip
    base.update(over)
    return build_report(**base)


def test_report_has_exactly_the_design_keys_in_order():
    report = _report(extra_field=1)
    assert tuple(report)[: len(REPORT_KEYS)] == REPORT_KEYS
    assert set(report["calibration"]) >= {"method", "num_images", "iters", "seed"}
    md = render_markdown(report)
    assert "Top-1 drop" in md and "Latency" in md


def test_gates_pass_fail_and_unmeasured():
    report = _report()
    ok = evaluate_gates(report, GateSpec(max_top1_drop=1.5, min_agreement=0.995, min_speedup=1.5))
    assert ok["passed"] and {c["name"] for c in ok["checks"]} == {
        "max_top1_drop",
        "min_agreement",
        "min_speedup",
        "lint",
    }
    enforce(ok)
    bad = evaluate_gates(report, GateSpec(max_top1_drop=0.5, min_speedup=3.0))
    assert not bad["passed"]
    with pytest.raises(GateFailedError, match="max_top1_drop") as err:
        enforce(bad)
    assert err.value.exit_code == 3
    unmeasured = evaluate_gates(_report(accuracy=None), GateSpec(max_top1_drop=0.5))
    assert not unmeasured["passed"] and "pass --data" in unmeasured["checks"][0]["note"]
    lint_bad = evaluate_gates(_report(lint={"passed": False, "violations": ["x"]}), GateSpec())
    assert not lint_bad["passed"]


def test_manifest_and_report_files(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"abc")
    (tmp_path / "quantized").mkdir()
    (tmp_path / "quantized" / "scheme.json").write_text("{}")
    arts = collect_artifacts(
        tmp_path, {"model.onnx": "model.onnx", "quantized": "quantized", "gone": "nothing"}
    )
    assert arts["model.onnx"] == {
        "path": "model.onnx",
        "sha256": sha256_file(tmp_path / "model.onnx"),
        "bytes": 3,
    }
    assert "quantized/scheme.json" in arts and "gone" not in arts
    write_manifest(tmp_path, arts, command=["sardfq-export", "--bits", "8"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["command"] == ["sardfq-export", "--bits", "8"] and manifest["versions"]["torch"]
    write_report(tmp_path, _report())
    assert json.loads((tmp_path / "report.json").read_text())["scheme"] == "w8a8"
    assert (tmp_path / "report.md").read_text().startswith("# sardfq-export report")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
