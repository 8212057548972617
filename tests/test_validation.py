"""Validation: fidelity metrics, latency, gates, report keys, manifest."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from sardfq_export.validation import latency
from sardfq_export.validation.fidelity import compare_logits, fidelity
from sardfq_export.validation.gates import GateSpec, enforce, evaluate_gates, speedup_check
from sardfq_export.validation.latency import compare, confidence, measure, median_interval
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
        "where": "input",
        "n": 4,
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
        {"min_ms": 20.0, "p50_ms": 20.0, "p95_ms": 20.0, "mean_ms": 20.0, "dispersion": 1.0,
         "throughput_ips": 200.0, "iters": 5}  # 4 / 20 ms
    )  # fmt: skip


def test_measure_percentiles_of_known_times(clock):
    steps = [50.0, 50.0] + [float(ms) for ms in range(1, 20)] + [100.0]  # 2 warm-up calls, then 20 timed

    def runner(images):
        clock.now += steps.pop(0) / 1000.0
        return torch.zeros(images.shape[0], 2)

    m = measure(runner, torch.randn(2, 3, 8, 8), warmup=2, iters=20)
    assert not steps
    assert m == pytest.approx(
        # 1, 2, …, 19, 100 ms: median 10.5, mean 290 / 20, p95 19 + 0.05 × (100 - 19) (linear)
        {"min_ms": 1.0, "p50_ms": 10.5, "p95_ms": 23.05, "mean_ms": 14.5, "dispersion": 23.05 / 10.5,
         "throughput_ips": 2 / 0.0105, "iters": 20}
    )  # fmt: skip


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
    # each round is 2 × (1 untimed + 5 timed) calls of 10 ms: 0.12 s; the second one passes 0.2 s,
    # but at least 3 rounds run
    assert lat["reference"]["iters"] == lat["deployed"]["iters"] == 15 and lat["rounds"] == 3
    assert clock.now == pytest.approx(0.36)
    lat = compare(ref, dep, x, batches=(2,), warmup=0, iters=0, max_seconds=0.5, run_length=5)
    assert lat["rounds"] == 5 and lat["confidence"] == pytest.approx(1 - 2 / 2**5)  # 0.6 s > 0.5 s


def test_compare_with_real_sleeps():
    """The same on the real clock: sleep never returns early, and the band leaves room for a loaded
    2-core machine (wake-ups late by tens of milliseconds)."""
    x = torch.randn(2, 3, 8, 8)
    lat = compare(Sleeper(ms=80), Sleeper(ms=20), x, batches=(2,), warmup=0, iters=5, rounds=3)
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


@pytest.mark.parametrize("where", ["activations", "input"])
def test_report_says_where_the_noise_floor_noise_was_put(where):
    floor = {"sigma": 1e-6, "where": where, "n": 8, "agreement": 0.875, "cosine": 0.999, "cosine_min": 0.99}
    fidelity = {"n": 8, "agreement_vs_fp32": 0.99, "agreement_vs_fakequant": 1.0, "cosine_vs_fakequant": 0.99999,
                "fakequant_noise_floor": floor}  # fmt: skip
    md = render_markdown(_report(fidelity=fidelity))
    line = next(ln for ln in md.splitlines() if ln.startswith("Noise floor"))
    assert "87.50%" in line
    if where == "activations":  # relative noise inside the model
        assert "every activation quantizer's input moves by a relative 1e-06" in line
    else:  # absolute noise on the image (reports written before "where" existed read the same)
        assert "the input image moves by 1e-06" in line and "relative" not in line


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


def test_activation_noise_floor_moves_exactly_the_values_on_a_rounding_boundary():
    """perturbed_activations multiplies each activation quantizer's input by (1 + 1e-6·ε): a value
    on a rounding boundary ((k + ½)·scale) goes to the step its ε's sign says, every other value
    stays, weights are untouched; the noise floor run inside it sees those flips and only those."""
    from sardfq_export.calibrators.quantizer import TensorQuantizer, perturbed_activations
    from sardfq_export.validation.fidelity import noise_floor

    act, wq = TensorQuantizer(8), TensorQuantizer(8, role="weight")
    act.set_scale(torch.tensor(0.25))
    wq.set_scale(torch.tensor(0.25))
    model = torch.nn.ModuleDict({"act": act, "w": wq})
    x = torch.tensor([[0.125, 0.375, 0.2, 1.0, -0.625, 0.0]])  # boundaries: 0.125, 0.375, -0.625
    weight = x.clone()
    with perturbed_activations(model, seed=27):
        y, w = act(x), wq(weight)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(27))
    on_boundary = torch.tensor([[True, True, False, False, True, False]])
    # x·(1 + 1e-6·ε) leaves a tie towards |x| larger when ε > 0; without noise: round half to even
    expected = torch.where(on_boundary, x + 0.125 * (eps * x).sign(), act(x))
    assert torch.equal(y, expected) and torch.equal(w, wq(weight))
    assert torch.equal(act(x), torch.tensor([[0.0, 0.5, 0.25, 1.0, -0.5, 0.0]]))
    assert (y != act(x)).sum() == 3  # seed 27 (|ε| > 0.5 on each tie) moves all three off their even step
    assert not act._forward_pre_hooks and not wq._forward_pre_hooks  # hooks only inside the block
    other = TensorQuantizer(8)  # names: only those quantizers move (bench/dinov2_agreement_probe.py)
    other.set_scale(torch.tensor(0.25))
    both = torch.nn.ModuleDict({"act": act, "other": other})
    with perturbed_activations(both, seed=27, names={"other"}):
        assert torch.equal(act(x), torch.tensor([[0.0, 0.5, 0.25, 1.0, -0.5, 0.0]]))
        assert torch.equal(other(x), expected)

    # Logits (q, 0.3) of one value per image: class 0 iff the quantized value is above 0.3.
    def runner(imgs):
        q = act(imgs.flatten(1))
        return torch.cat([q, torch.full_like(q, 0.3)], 1)

    images = torch.tensor([0.125, 0.2, 0.375, 1.0]).view(4, 1)
    floor = noise_floor(runner, images, runner(images), perturb=lambda: perturbed_activations(model, seed=0))
    e0 = torch.randn(4, 1, generator=torch.Generator().manual_seed(0)).flatten()
    # only 0.375 (0.5 unperturbed) can cross 0.3, to 0.25, when its ε < 0; 0.125 goes 0 → 0 or 0.25
    assert e0[2] < 0  # (the seed makes the flip happen: the test can fail)
    assert floor["where"] == "activations" and floor["agreement"] == 0.75


# --- latency against the float runtime: rounds, spread, noisy flag, the speed-up gate -------------


def test_compare_median_round_ratio_with_real_sleeps():
    """Runners that really sleep 30 / 10 / 20 ms: the headline (median of the round ratios) is the
    true 3x within 15%, the extra runner has its own ratio (2x), and all of it is in the report."""
    x = torch.randn(2, 3, 8, 8)
    ref, dep = Sleeper(ms=30, name="ort-fp32"), Sleeper(ms=10, name="ort-int8")
    eager = Sleeper(ms=20, name="torch-fp32")
    lat = compare(ref, dep, x, batches=(1,), warmup=1, run_length=3, extras={"torch_fp32": eager})
    row = lat["by_batch"]["1"]
    assert lat["speedup"] == row["speedup"] and abs(lat["speedup"] / 3.0 - 1) <= 0.15
    assert abs(row["torch_fp32"]["speedup"] / 2.0 - 1) <= 0.15 and lat["torch_fp32"] == row["torch_fp32"]
    assert row["torch_fp32"]["runtime"] == "torch-fp32" and row["reference"]["runtime"] == "ort-fp32"
    assert row["rounds"] >= 7 and len(row["round_ratios"]) == row["rounds"]
    assert row["confidence"] == pytest.approx(confidence(row["rounds"])) and row["confidence"] >= 0.95
    lo, hi = row["speedup_spread"]
    assert lo <= row["speedup_ci"][0] <= row["speedup"] <= row["speedup_ci"][1] <= hi
    assert lo <= row["speedup"] <= hi and row["dispersion"] == pytest.approx((hi - lo) / row["speedup"])
    for side in ("reference", "deployed", "torch_fp32"):
        r = row[side]
        assert r["min_ms"] <= r["p50_ms"] <= r["p95_ms"] and r["dispersion"] == pytest.approx(
            r["p95_ms"] / r["p50_ms"]
        )
        assert r["iters"] == 3 * row["rounds"] and len(r["round_p50_ms"]) == row["rounds"]
    for key in ("device", "threads", "batch", "reference", "deployed", "speedup", "by_batch"):
        assert key in lat  # the keys other code reads stay
    json.dumps(lat, allow_nan=False)  # plain JSON


class Flaky:
    """A runner of ``fast`` ms in even rounds and ``slow`` ms in odd ones (on the fake clock): each
    round is exactly ``per_round`` calls (1 settle + run_length) when there is no warm-up."""

    def __init__(self, clock, fast, slow, per_round=6, name="flaky"):
        self.clock, self.fast, self.slow, self.per_round = clock, fast, slow, per_round
        self.calls, self.name, self.device = 0, name, "cpu"

    def __call__(self, images):
        slow = (self.calls // self.per_round) % 2 == 1
        self.calls += 1
        self.clock.now += (self.slow if slow else self.fast) / 1000.0
        return torch.zeros(images.shape[0], 2)


def test_compare_flags_noisy_and_remeasures(clock):
    x = torch.randn(2, 3, 8, 8)
    ref, dep = Sleeper(ms=20, name="ref", clock=clock), Flaky(clock, fast=5, slow=20)
    lat = compare(ref, dep, x, batches=(1,), warmup=0, remeasure=False)
    assert lat["noisy"] and not lat["remeasured"] and lat["rounds"] == 7
    assert lat["round_ratios"] == pytest.approx([4, 1, 4, 1, 4, 1, 4])
    assert lat["speedup"] == pytest.approx(4.0) and lat["speedup_spread"] == pytest.approx([1.0, 4.0])
    assert lat["dispersion"] == pytest.approx(0.75) and lat["noisy_batches"] == [1]
    lat = compare(ref, Flaky(clock, fast=5, slow=20), x, batches=(1,), warmup=0)
    assert lat["remeasured"] and lat["rounds"] == 14 and lat["noisy"]  # still noisy: kept, and said
    assert lat["first_measurement"]["speedup_spread"] == pytest.approx([1.0, 4.0])
    steady = compare(ref, Sleeper(ms=5, clock=clock), x, batches=(1,), warmup=0)
    assert not steady["noisy"] and not steady["remeasured"] and steady["dispersion"] == 0.0


def _latency(speedup, lo, hi, noisy):
    return {"device": "cpu", "batch": 1, "speedup": speedup, "speedup_spread": [lo, hi], "noisy": noisy,
            "reference": {"runtime": "onnxruntime-fp32", "p50_ms": 2.0, "p95_ms": 2.2},
            "deployed": {"runtime": "onnxruntime", "p50_ms": 1.0, "p95_ms": 1.1}}  # fmt: skip


@pytest.mark.parametrize(
    "lat, threshold, passed, note",
    [
        (_latency(2.0, 1.9, 2.1, False), 1.8, True, None),  # steady, above
        (_latency(2.0, 1.9, 2.1, False), 2.05, False, None),  # steady: the median decides
        (_latency(3.0, 2.0, 4.0, True), 1.5, True, "robustly above"),  # noisy, robustly above
        (_latency(1.0, 0.6, 1.4, True), 1.5, False, "robustly below"),  # noisy, robustly below
        (_latency(2.0, 1.2, 2.8, True), 1.5, False, "too noisy to decide (round ratios 1.2–2.8 straddle"),
    ],
)
def test_min_speedup_gate_pass_fail_and_too_noisy(lat, threshold, passed, note):
    gates = evaluate_gates(_report(latency=lat), GateSpec(min_speedup=threshold))
    (check,) = [c for c in gates["checks"] if c["name"] == "min_speedup"]
    assert check["passed"] is passed and gates["passed"] is passed
    assert check["spread"] == [lat["speedup_spread"][0], lat["speedup_spread"][1]]
    assert check["decided"] is (note is None or "too noisy" not in note)
    if note is None:
        assert "note" not in check
    else:
        assert note in check["note"]
    if not passed:
        with pytest.raises(GateFailedError) as err:
            enforce(gates)
        assert "\n" not in str(err.value) and "min_speedup" in str(err.value)
        if note and "too noisy" in note:
            assert str(err.value).endswith("re-run on a quieter machine)")


def test_median_interval_is_the_order_statistic_interval_with_exact_binomial_confidence():
    # k-th smallest to k-th largest misses the median with probability 2·P(Binomial(n, 1/2) < k)
    assert median_interval([3, 1, 2]) == (1.0, 3.0, 0.75)  # too few rounds for 95%: [min, max]
    assert median_interval(range(7)) == (0.0, 6.0, pytest.approx(1 - 2 / 128))
    assert median_interval(range(14)) == (2.0, 11.0, pytest.approx(1 - 2 * (1 + 14 + 91) / 2**14))
    assert median_interval(range(20)) == (5.0, 14.0, pytest.approx(1 - 2 * 21700 / 2**20))  # 95.86%
    assert confidence(7) == pytest.approx(0.984375) and confidence(3) == 0.75


def test_one_load_spike_leaves_the_interval_and_the_noisy_gate_decides():
    """14 rounds at 1.6× with one stalled deployed round (0.5×) and one stalled float round (5×):
    noisy by (max - min) / median, yet the median's 98.7% interval [3rd, 12th] is 1.6–1.6, so a
    1.5× threshold passes robustly; [min, max] alone (older reports) cannot decide."""
    ratios = [1.6] * 6 + [0.5] + [1.6] * 6 + [5.0]
    lo, hi, level = median_interval(ratios)
    lat = {**_latency(1.6, 0.5, 5.0, True), "speedup_ci": [lo, hi], "confidence": level}
    check = speedup_check(lat, 1.5)
    assert check["passed"] and check["decided"] and check["interval"] == [1.6, 1.6]
    assert "robustly above" in check["note"] and "98.7% interval" in check["note"]
    assert not speedup_check(_latency(1.6, 0.5, 5.0, True), 1.5)["decided"]


def test_min_speedup_gate_from_a_noisy_measurement(clock):
    """The gate reads compare()'s own output: ratios 1–4 straddle 2 (too noisy), all ≥ 0.9 (pass)."""
    x = torch.randn(2, 3, 8, 8)
    lat = compare(
        Sleeper(ms=20, clock=clock), Flaky(clock, 5, 20), x, batches=(1,), warmup=0, remeasure=False
    )
    checks = evaluate_gates(_report(latency=lat), GateSpec(min_speedup=2.0))["checks"]
    (too_noisy,) = [c for c in checks if c["name"] == "min_speedup"]
    assert not too_noisy["passed"] and too_noisy["note"].startswith("too noisy to decide")
    assert evaluate_gates(_report(latency=lat), GateSpec(min_speedup=0.9))["passed"]
    assert not evaluate_gates(_report(latency=lat), GateSpec(min_speedup=4.5))["passed"]


def test_latency_rendering_shows_the_float_baseline_torch_spread_and_noisy(clock):
    from sardfq_export.validation.report import render_readme, render_summary

    x = torch.randn(2, 3, 8, 8)
    ref, dep = Sleeper(ms=20, name="onnxruntime-fp32", clock=clock), Flaky(clock, 5, 20, name="onnxruntime")
    eager = Sleeper(ms=40, name="torch-fp32", clock=clock)
    lat = compare(ref, dep, x, batches=(1,), warmup=0, remeasure=False, extras={"torch_fp32": eager})
    lat["baseline"] = "onnxruntime-fp32: the same runtime in float"
    report = _report(latency=lat, gates={"passed": True, "checks": []})
    md = render_markdown(report)
    assert "Baseline: onnxruntime-fp32: the same runtime in float" in md
    assert "PyTorch eager FP32" in md and "round spread" in md and "1.00–4.00×" in md and "**yes**" in md
    assert "too noisy to decide" in md  # the gate rule is written in the report
    summary = render_summary(report, "out")
    line = next(ln for ln in summary.splitlines() if "latency batch 1" in ln)
    assert "onnxruntime-fp32 20.00 ms" in line and "(rounds 1.00–4.00×)" in line
    assert "torch-fp32 40.00 ms" in line and line.endswith("NOISY")
    readme = render_readme(report, {"mean": [0.5], "std": [0.5]}, (1, 8, 8))
    assert "vs onnxruntime-fp32 20.00 ms" in readme and "PyTorch eager FP32 40.00 ms" in readme
    old = _report()  # a report from before (no spread, no torch column) still renders
    assert "| 1 |" in render_markdown(old) and "n/a" in render_markdown(old)


def test_export_float_onnx_runs_in_onnxruntime_like_the_model(tmp_path):
    import onnx
    from sardfq_export.exporters.onnx_export import export_float_onnx
    from sardfq_export.exporters.ort import create_session
    from sardfq_export.validation.runners import OrtRunner

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.GELU(), torch.nn.Linear(5, 3)
    )
    path = export_float_onnx(model, tmp_path / "model.fp32.onnx", (3, 2, 2))
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
    assert not [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    runner = OrtRunner(create_session(path), name="onnxruntime-fp32")
    for b in (1, 5):
        x = torch.randn(b, 3, 2, 2)
        with torch.no_grad():
            torch.testing.assert_close(runner(x), model(x), rtol=1e-5, atol=1e-5)


# --- clear one-line errors instead of hangs and IndexErrors ---------------------------------------


def test_compare_rejects_run_length_zero_instead_of_looping_forever():
    from sardfq_export.core.errors import UserInputError

    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(UserInputError, match="run_length") as err:
        compare(Sleeper(), Sleeper(), x, batches=(1,), run_length=0)
    assert "\n" not in str(err.value)
    with pytest.raises(UserInputError, match="rounds"):
        compare(Sleeper(), Sleeper(), x, batches=(1,), rounds=0)
    with pytest.raises(UserInputError, match="no sample images"):
        compare(Sleeper(), Sleeper(), x[:0], batches=(1,))
    with pytest.raises(UserInputError, match="no batch sizes"):
        compare(Sleeper(), Sleeper(), x, batches=())


def test_measure_rejects_zero_iters_instead_of_index_error():
    from sardfq_export.core.errors import UserInputError

    with pytest.raises(UserInputError, match="iters") as err:
        measure(Sleeper(), torch.randn(1, 3, 8, 8), warmup=0, iters=0)
    assert "\n" not in str(err.value)


def test_fidelity_with_no_images_is_a_clear_error():
    from sardfq_export.core.errors import UserInputError

    with pytest.raises(UserInputError, match="at least one held-out image, got 0") as err:
        fidelity(Table(FP32), Table(FAKEQUANT), Table(DEPLOYED), torch.empty(0, 1, 1, 1))
    assert "\n" not in str(err.value)
    with pytest.raises(UserInputError, match="at least one image"):
        compare_logits(torch.empty(0, 3), torch.empty(0, 3))


class FakeEngine:
    """Stands in for TensorRTRunner (no GPU here): runs a tiny torch model, named like the real one."""

    def __init__(self, engine_path, name="tensorrt", device="cpu"):
        self.engine_path, self.name, self.device = engine_path, name, "cpu"
        self.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))

    def __call__(self, images):
        with torch.no_grad():
            return self.model(images)


@pytest.mark.parametrize("trt_ok", [True, False])
def test_tensorrt_target_measures_against_an_fp16_engine_of_the_float_model(trt_ok, tmp_path, monkeypatch):
    """The TensorRT wiring without TensorRT: the FP16 baseline engine is built from
    model.fp16.onnx and is the reference, PyTorch eager an extra; without TensorRT the reference
    falls back to PyTorch eager and the report says why."""
    import onnx
    from sardfq_export.exporters import tensorrt as trt_mod
    from sardfq_export.validation import runners
    from sardfq_export.validation.deploy import FP16_ENGINE, FP16_MODEL, validate_deployment

    built = []

    def build_engine(onnx_path, engine_path, input_name, chw, config):
        built.append((Path(onnx_path), Path(engine_path), input_name, chw, config.max_batch))
        Path(engine_path).write_bytes(b"engine")
        return trt_mod.EngineResult(Path(engine_path), Path(engine_path).with_suffix(".log"), Path("c"))

    monkeypatch.setattr(trt_mod, "tensorrt_status", lambda: (trt_ok, "ok" if trt_ok else "no TensorRT here"))
    monkeypatch.setattr(trt_mod, "build_engine", build_engine)
    monkeypatch.setattr(runners, "TensorRTRunner", FakeEngine)
    monkeypatch.setattr(latency, "compare", lambda r, d, s, b, **k: compare(r, d, s, b, warmup=0, iters=2,
                                                                          max_seconds=0.0, extras=k.get("extras")))  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"int8")
    res = validate_deployment(lambda _m: None, model, model, tmp_path / "model.onnx", torch.randn(4, 3, 2, 2),
                              engine_path=engine, batches=(1, 40))  # fmt: skip
    lat = res["latency"]
    assert lat["deployed"]["runtime"] == "tensorrt" and set(lat["by_batch"]) == {"1", "40"}
    if trt_ok:
        assert built == [(tmp_path / FP16_MODEL, tmp_path / FP16_ENGINE, "input", (3, 2, 2), 40)]
        meta = {p.key: p.value for p in onnx.load(str(tmp_path / FP16_MODEL)).metadata_props}
        assert meta["sardfq.fp16"] == "true"  # TensorRT builds it strongly typed: an FP16 engine
        assert lat["reference"]["runtime"] == "tensorrt-fp16" and "same runtime in float" in lat["baseline"]
        assert lat["torch_fp32"]["runtime"] == "torch-fp32" and "baseline_note" not in lat
    else:
        assert not built and not (tmp_path / FP16_MODEL).exists()
        assert lat["reference"]["runtime"] == "torch-fp32" and "torch_fp32" not in lat
        assert "no TensorRT here" in lat["baseline_note"] and "PyTorch eager" in lat["baseline"]


def test_onnxruntime_target_speedup_is_against_ort_fp32_with_eager_as_extra(tmp_path):
    """The headline speed-up divided by PyTorch eager FP32 before; now by the same model in ORT FP32."""
    from sardfq_export.validation.deploy import validate_deployment

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 3)
    ).eval()
    onnx_path = tmp_path / "model.onnx"
    torch.onnx.export(model, torch.randn(1, 3, 2, 2), str(onnx_path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)  # fmt: skip
    res = validate_deployment(lambda _m: None, model, model, onnx_path, torch.randn(4, 3, 2, 2), batches=(1,))
    lat = res["latency"]
    assert lat["deployed"]["runtime"] == "onnxruntime"
    assert lat["reference"]["runtime"] == "onnxruntime-fp32", lat["reference"]
    assert lat["torch_fp32"]["runtime"] == "torch-fp32"  # eager kept as an extra column
