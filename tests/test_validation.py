"""Validation: fidelity metrics, latency, gates, report keys, manifest."""

from __future__ import annotations

import json
import time

import pytest
import torch
from sardfq_export.validation import latency
from sardfq_export.validation.fidelity import compare_logits, fidelity
from sardfq_export.validation.gates import GateSpec, enforce, evaluate_gates
from sardfq_export.validation.latency import compare, measure
from sardfq_export.validation.manifest import collect_artifacts, write_manifest
from sardfq_export.validation.report import REPORT_KEYS, build_report, render_markdown, write_report

from sardfq_export.core.errors import GateFailedError
from sardfq_export.core.io import sha256_file


class Table:
    """A runner with fixed logits: image ``i`` (its first pixel holds ``i``) gets row ``i``."""

    def __init__(self, rows: list[list[float]]):
        self.logits, self.device = torch.tensor(rows, dtype=torch.float32), "cpu"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[images.flatten(1)[:, 0].round().long()]


# Three runners with distinct logits, so that any two swapped arguments change the result.
# Top-1 per image: fp32 0 0 0 0, fake-quant 0 1 2 1, deployed 0 0 0 1; the 3-4-5 rows give exact
# cosines (0.8, 0.6, 0.64 = 16/25, 0.48 = 12/25).
FP32 = [[1, 0, 0]] * 4
FAKEQUANT = [[4, 0, 3], [0, 1, 0], [0, 3, 4], [0, 1, 0]]
DEPLOYED = [[4, 3, 0], [4, 3, 0], [4, 0, 3], [0, 1, 0]]


def test_compare_logits_known_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    same = compare_logits(a, a)
    assert same["agreement"] == 1.0 and same["cosine"] == pytest.approx(1.0) and same["max_abs_diff"] == 0
    flipped = compare_logits(a, a.flip(1))
    assert flipped["agreement"] == 0.0 and flipped["cosine"] == pytest.approx(0.0)
    dep, ref = torch.tensor(DEPLOYED, dtype=torch.float32), torch.tensor(FP32, dtype=torch.float32)
    assert compare_logits(dep, ref) == pytest.approx(
        # per-image cosines 0.8, 0.8, 0.8, 0; largest difference |4 - 1|
        {"n": 4, "agreement": 0.75, "cosine": 0.6, "cosine_min": 0.0, "max_abs_diff": 3.0}
    )
    with pytest.raises(ValueError, match="shapes differ"):
        compare_logits(dep, ref[:3])


def test_fidelity_keeps_the_three_runners_apart():
    images = torch.arange(4.0).view(4, 1, 1, 1)
    f = fidelity(Table(FP32), Table(FAKEQUANT), Table(DEPLOYED), images, batch_size=3)  # 2 batches
    # 1e-6 of input noise cannot move a table lookup: the fake-quant model agrees with itself
    assert f.pop("fakequant_noise_floor") == {
        "sigma": 1e-6,
        "agreement": 1.0,
        "cosine": 1.0,
        "cosine_min": 1.0,
    }
    assert f == pytest.approx(
        {
            "n": 4,
            "agreement_vs_fp32": 0.75,  # deployed vs fp32: 3 of 4 top-1 agree
            "agreement_vs_fakequant": 0.5,  # deployed vs fake-quant: images 0 and 3
            "cosine_vs_fakequant": 0.68,  # (0.64 + 0.6 + 0.48 + 1) / 4
            "cosine_vs_fakequant_min": 0.48,
            "cosine_vs_fp32": 0.6,  # (0.8 + 0.8 + 0.8 + 0) / 4
            "fakequant_agreement_vs_fp32": 0.25,
            "fakequant_cosine_vs_fp32": 0.2,  # (0.8 + 0 + 0 + 0) / 4
        }
    )


class Clock:
    """Stands in for ``time.perf_counter`` in validation.latency: only runners move it, so every
    timing is exact and the assertions hold on a machine under any load."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Sleeper:
    """A runner that takes a known time: ``ms`` per call plus ``ms_per_image`` per image, on the
    fake ``clock`` when given, else really sleeping. ``cold_ms`` is added to its first call after
    another runner's (a runtime whose threads the other one left spinning)."""

    last: Sleeper | None = None

    def __init__(self, ms=0.0, ms_per_image=0.0, name="sleeper", clock=None, cold_ms=0.0):
        self.ms, self.ms_per_image, self.name, self.device = ms, ms_per_image, name, "cpu"
        self.clock, self.cold_ms = clock, cold_ms
        self.inputs: list[torch.Tensor] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.inputs.append(images)
        ms = self.ms + self.ms_per_image * images.shape[0] + (self.cold_ms if Sleeper.last is not self else 0)
        Sleeper.last = self
        if self.clock is not None:
            self.clock.now += ms / 1000.0
        else:
            time.sleep(ms / 1000.0)
        return torch.zeros(images.shape[0], 2)


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(latency, "time", fake)  # latency reads only time.perf_counter
    return fake


def test_measure_times_the_runner(clock):
    x = torch.randn(4, 3, 8, 8)
    runner = Sleeper(ms=20, clock=clock)
    m = measure(runner, x, warmup=2, iters=5)
    assert len(runner.inputs) == 2 + 5 and m["iters"] == 5
    assert m == pytest.approx(
        {"p50_ms": 20.0, "p95_ms": 20.0, "mean_ms": 20.0, "throughput_ips": 200.0, "iters": 5}  # 4 / 20 ms
    )


def test_measure_percentiles_of_known_times(clock):
    steps = [50.0, 50.0] + [float(ms) for ms in range(1, 20)] + [100.0]  # 2 warm-up calls, then 20 timed

    def runner(images):
        clock.now += steps.pop(0) / 1000.0
        return torch.zeros(images.shape[0], 2)

    m = measure(runner, torch.randn(2, 3, 8, 8), warmup=2, iters=20)
    assert not steps
    assert m == pytest.approx(
        # 1, 2, …, 19, 100 ms: median 10.5, mean 290 / 20, p95 19 + 0.05 × (100 - 19) (linear)
        {"p50_ms": 10.5, "p95_ms": 23.05, "mean_ms": 14.5, "throughput_ips": 2 / 0.0105, "iters": 20}
    )


def test_compare_speedup_is_the_known_ratio(clock):
    x = torch.randn(4, 3, 8, 8)
    ref, dep = Sleeper(ms=20, name="ref", clock=clock), Sleeper(ms=5, name="dep", clock=clock)
    lat = compare(ref, dep, x, batches=(1, 6), warmup=1, iters=5)
    assert lat["batch"] == 1 and set(lat["by_batch"]) == {"1", "6"}
    assert lat["reference"]["runtime"] == "ref" and lat["deployed"]["runtime"] == "dep"
    assert lat["reference"] == lat["by_batch"]["1"]["reference"]
    assert lat["deployed"] == lat["by_batch"]["1"]["deployed"]
    for b, row in ((1, lat["by_batch"]["1"]), (6, lat["by_batch"]["6"])):
        assert row["speedup"] == pytest.approx(4.0)  # 20 ms vs 5 ms
        assert row["reference"]["p50_ms"] == pytest.approx(20.0) and row["deployed"][
            "p50_ms"
        ] == pytest.approx(5.0)
        assert row["reference"]["throughput_ips"] == pytest.approx(b / 0.020)
        assert row["deployed"]["throughput_ips"] == pytest.approx(b / 0.005)
        assert row["reference"]["iters"] == row["deployed"]["iters"] >= 5
    assert lat["speedup"] == lat["by_batch"]["1"]["speedup"]


def test_compare_per_batch_size(clock):
    """Reference 5 ms per image, deployed 10 ms per call: 0.5x at batch 1, 3x at batch 6."""
    x = torch.randn(4, 3, 8, 8)
    ref = Sleeper(ms_per_image=5, name="ref", clock=clock)
    dep = Sleeper(ms=10, name="dep", clock=clock)
    lat = compare(ref, dep, x, batches=(6, 1), warmup=1, iters=5)
    one, six = lat["by_batch"]["1"], lat["by_batch"]["6"]
    assert lat["batch"] == 6 and lat["speedup"] == six["speedup"]  # the first batch size listed
    assert one["speedup"] == pytest.approx(0.5) and six["speedup"] == pytest.approx(3.0)
    assert one["reference"]["throughput_ips"] == pytest.approx(200.0)  # 1 / 5 ms
    assert six["reference"]["throughput_ips"] == pytest.approx(200.0)  # 6 / 30 ms
    assert one["deployed"]["throughput_ips"] == pytest.approx(100.0)  # 1 / 10 ms
    assert six["deployed"]["throughput_ips"] == pytest.approx(600.0)  # 6 / 10 ms
    assert {len(t) for t in ref.inputs} == {1, 6}
    assert torch.equal(dep.inputs[0], torch.cat([x, x[:2]]))  # the sample repeated up to the batch


def test_compare_does_not_time_the_settle_call(clock):
    """The first call after the other runner's is slow (its threads still spin): not timed."""
    x = torch.randn(2, 3, 8, 8)
    ref = Sleeper(ms=10, name="ref", clock=clock, cold_ms=40)
    dep = Sleeper(ms=5, name="dep", clock=clock, cold_ms=40)
    lat = compare(ref, dep, x, batches=(2,), warmup=2, iters=10)
    assert lat["reference"]["p95_ms"] == pytest.approx(10.0) and lat["deployed"]["p95_ms"] == pytest.approx(
        5.0
    )
    assert lat["speedup"] == pytest.approx(2.0)


def test_compare_stops_at_max_seconds(clock):
    x = torch.randn(2, 3, 8, 8)
    ref, dep = Sleeper(ms=10, clock=clock), Sleeper(ms=10, clock=clock)
    lat = compare(ref, dep, x, batches=(2,), warmup=0, iters=10_000, max_seconds=0.2, run_length=5)
    # each round is 2 × (1 untimed + 5 timed) calls of 10 ms: 0.12 s, so the second one ends it
    assert lat["reference"]["iters"] == lat["deployed"]["iters"] == 10
    assert clock.now == pytest.approx(0.24)


def test_compare_with_real_sleeps():
    """The same on the real clock: sleep never returns early, and the band leaves room for a loaded
    2-core machine (wake-ups late by tens of milliseconds)."""
    x = torch.randn(2, 3, 8, 8)
    lat = compare(Sleeper(ms=80), Sleeper(ms=20), x, batches=(2,), warmup=0, iters=5)
    assert lat["reference"]["p50_ms"] >= 79.9 and lat["deployed"]["p50_ms"] >= 19.9
    assert 2.0 <= lat["speedup"] <= 6.0  # 4x without delays
    for side in ("reference", "deployed"):
        assert lat[side]["throughput_ips"] == pytest.approx(2 * 1000.0 / lat[side]["p50_ms"])


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


# SHA-256 test vectors (FIPS 180-2 for b"abc"), computed once with hashlib / sha256sum.
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
SHA256_SARDFQ = "f945f5a6e7b9b2306895cdb6c4e57eb73bb88eee315025e22615d6cd29a32b89"
SHA256_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_sha256_file_known_digests(tmp_path):
    (tmp_path / "a").write_bytes(b"sardfq")
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "a") == SHA256_SARDFQ
    assert sha256_file(tmp_path / "a", chunk=4) == SHA256_SARDFQ  # read across chunk boundaries
    assert sha256_file(tmp_path / "empty") == SHA256_EMPTY


def test_manifest_and_report_files(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"abc")
    (tmp_path / "quantized").mkdir()
    (tmp_path / "quantized" / "scheme.json").write_text("{}")
    arts = collect_artifacts(
        tmp_path, {"model.onnx": "model.onnx", "quantized": "quantized", "gone": "nothing"}
    )
    assert arts["model.onnx"] == {"path": "model.onnx", "sha256": SHA256_ABC, "bytes": 3}
    assert arts["quantized/scheme.json"] == {
        "path": "quantized/scheme.json",
        "sha256": "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",  # of b"{}"
        "bytes": 2,
    }
    assert set(arts) == {"model.onnx", "quantized/scheme.json"}  # "gone" does not exist
    write_manifest(tmp_path, arts, command=["sardfq-export", "--bits", "8"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["command"] == ["sardfq-export", "--bits", "8"] and manifest["versions"]["torch"]
    assert manifest["artifacts"] == arts
    write_report(tmp_path, _report())
    assert json.loads((tmp_path / "report.json").read_text())["scheme"] == "w8a8"
    assert (tmp_path / "report.md").read_text().startswith("# sardfq-export report")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_noise_floor_counts_the_images_on_a_rounding_boundary():
    """Logits (x, 0.5): images with x = 0.5 sit on the decision boundary; noise moves them."""
    from sardfq_export.validation.fidelity import NOISE_FLOOR_SIGMA, noise_floor

    def runner(images):
        x = images.flatten(1)[:, 0]
        return torch.stack([x, torch.full_like(x, 0.5)], 1)

    images = torch.tensor([0.5, 0.5, 0.5, 3.0, -3.0, 2.0, -1.0, 0.0]).view(8, 1, 1, 1)
    floor = noise_floor(runner, images, runner(images), batch_size=3)
    noise = NOISE_FLOOR_SIGMA * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    # a tie goes to index 0; negative noise on a boundary image turns it to index 1
    flips = int((noise.flatten()[:3] < 0).sum())
    assert 0 < flips < 3  # the seed gives both directions: the test can fail either way
    assert floor["agreement"] == (8 - flips) / 8 and floor["sigma"] == NOISE_FLOOR_SIGMA
