"""Benchmark (not a test): ONNX Runtime latency of our INT8 export vs ORT FP32, PyTorch FP32 and
ORT's own quantize_static.

    bash tools/dev.sh python bench/ort_latency.py [--model deit_small_patch16_224] [--threads 2]
                                                  [--batches 1,32] [--repeats 20,5] [--profile] [--json F]
                                                  [--write docs/deployment-results.md]

Random-init timm model (no download), 224×224. Ours: calibrators w8a8 (per-channel INT8 weights,
per-tensor INT8 activations on every block Linear) calibrated on Gaussian noise, exported by
exporters.export_onnx. ORT FP32: the same network exported by torch.onnx. Both run through the
product's session factory, ``exporters.ort.create_session``, with the same ``OrtConfig``: every
graph rewrite and ORT setting the INT8 model gets (attention folded into MultiHeadAttention,
SkipLayerNormFusion and MatMulAddFusion off) the FP32 baseline gets too — best FP32 vs best INT8.
PyTorch FP32: the timm model in eager mode under ``torch.inference_mode`` with the same thread
count. quantize_static: onnxruntime.quantization's QDQ, symmetric, per-channel INT8, calibrated on
the same noise images, ORT's default graph optimizations. "previous settings" rerun both ORT
models with the graph settings the product used before attention fusion (FP32 with ORT's default
optimizers, ours with only MatMulAddFusion off, no attention fusion), so before/after ratios come
from one run. Every ORT session stops its workers spinning after ``run`` (``stop_spinning``, the
product default): spinning pools of idle sessions would otherwise slow whichever model runs next.

All models are timed in rotation (round robin) so machine noise hits them alike; p50 of the
repeats, after warm-up. Each timed call starts after a short idle gap so the previous runtime's
spinning worker threads (ORT's pool, torch's OpenMP) have gone to sleep and do not steal a core
from the next model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GAP_S = 0.02  # idle time before each timed call (see the module docstring)


def _export_fp32(model, path: Path, size: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, size, size),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def _quantize_static(fp32: Path, out: Path, calib: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    quantize_static(
        str(fp32),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )


def cpu_description() -> str:
    """CPU model and the SIMD features the int8 kernels care about (Linux), else the machine."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    simd = [
        f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags
    ]
    return f"{name or platform.machine()}, {info.count('processor')} logical CPUs, " + " ".join(simd)


def _op_label(op: str, node: str) -> str:
    if op in ("MatMul", "FusedMatMul"):
        return "MatMul (block Linear)" if re.search(r"/(qkv|proj|fc1|fc2)/", node) else "MatMul (attention)"
    return op


def profile_ops(path: Path, config, batch: int, size: int, runs: int) -> dict:
    """Per-op-type kernel time (ms per run, median over ``runs`` profiled runs after warm-up) from
    ORT's profiler on a session built by the product factory."""
    from sardfq_export.exporters.ort import create_session

    with tempfile.TemporaryDirectory(prefix="sardfq-prof-") as tmp:
        sess = create_session(path, config, profile_prefix=Path(tmp) / "ort")
        x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
        warm = 2
        for _ in range(warm + runs):
            sess.run(None, {"input": x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    spans = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "Session" and e["name"] == "model_run"
    )[warm:]
    per_run = [dict() for _ in spans]
    counts: dict[str, int] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        k = next((i for i, (a, b) in enumerate(spans) if a <= e["ts"] <= b), None)
        if k is None:
            continue
        label = _op_label(e["args"]["op_name"], e["name"])
        per_run[k][label] = per_run[k].get(label, 0.0) + e["dur"] / 1000
        if k == 0:
            counts[label] = counts.get(label, 0) + 1
    labels = sorted({lb for r in per_run for lb in r})
    ops = {lb: round(float(np.median([r.get(lb, 0.0) for r in per_run])), 3) for lb in labels}
    return {
        "model_run_ms": round(float(np.median([b - a for a, b in spans])) / 1000, 2),
        "kernel_sum_ms": round(float(np.median([sum(r.values()) for r in per_run])), 2),
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "nodes": counts,
        "runs": runs,
    }


def _short_census(c: dict) -> dict:
    keys = ("int8_gemm", "int4_gemm", "float_gemm", "attention", "quantize_linear", "dequantize_linear")
    return {k: c[k] for k in keys} | {"ops": c["ops"], "nodes": sum(c["ops"].values())}


def measure(
    model_name: str = "deit_small_patch16_224",
    threads: int = 2,
    batches: tuple[int, ...] = (1, 32),
    repeats: tuple[int, ...] = (20, 5),
    calib_images: int = 8,
    previous: bool = True,
    profile: bool = False,
    log=None,
) -> dict:
    """Latency of every runtime at every batch size, timed side by side (JSON-serialisable).

    ``repeats`` pairs with ``batches`` (the last value repeats when shorter). Per batch:
    ``ort_fp32_ms``, ``ours_int8_ms``, ``pytorch_fp32_ms``, ``qstatic_int8_ms`` (p50),
    ``int8_vs_ort_fp32`` and ``int8_vs_pytorch_fp32`` (speed-ups: FP32 time / our INT8 time), and
    with ``previous`` the same two ORT models under the settings used before attention fusion.
    ``profile``: afterwards, ORT's profiler on those ORT models (per-op-type kernel time per run).
    """
    import onnxruntime
    import timm
    from sardfq_export.exporters.onnx_export import export_onnx
    from sardfq_export.exporters.ort import OrtConfig, create_session, describe, op_census

    from sardfq_export import calibrators

    say = log or (lambda msg: print(msg, file=sys.stderr))
    load_before = os.getloadavg()[0]
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    size = model.pretrained_cfg["input_size"][-1]
    gen = torch.Generator().manual_seed(0)
    calib = torch.randn(calib_images, 3, size, size, generator=gen)
    qmodel = calibrators.quantize_model(model, "w8a8")  # a copy: ``model`` stays FP32
    calibrators.calibrate(qmodel, calib, progress=False)

    product = OrtConfig(threads=threads)
    ort_defaults = OrtConfig(threads=threads, disabled_optimizers=(), fuse_attention=False)
    before = OrtConfig(threads=threads, disabled_optimizers=("MatMulAddFusion",), fuse_attention=False)
    with tempfile.TemporaryDirectory(prefix="sardfq-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        export_onnx(qmodel, tmp / "ours.onnx", (3, size, size))
        _export_fp32(model, tmp / "fp32.onnx", size)
        _quantize_static(tmp / "fp32.onnx", tmp / "qstatic.onnx", calib.numpy())
        sessions = {
            "ort_fp32": create_session(tmp / "fp32.onnx", product),
            "ours_int8": create_session(tmp / "ours.onnx", product),
            "qstatic_int8": create_session(tmp / "qstatic.onnx", ort_defaults),
        }
        if previous:
            sessions["ort_fp32_previous"] = create_session(tmp / "fp32.onnx", ort_defaults)
            sessions["ours_int8_previous"] = create_session(tmp / "ours.onnx", before)
        census = {
            "ort_fp32": _short_census(op_census(tmp / "fp32.onnx", product)),
            "ours_int8": _short_census(op_census(tmp / "ours.onnx", product)),
            "qstatic_int8": _short_census(op_census(tmp / "qstatic.onnx", ort_defaults)),
        }
        if previous:
            census["ours_int8_previous"] = _short_census(op_census(tmp / "ours.onnx", before))
        say(f"prepared in {time.perf_counter() - t0:.0f}s")
        results = _time_rotation(sessions, model, size, batches, repeats, previous, say)
        profiles: dict[str, dict] = {}
        if profile:
            targets = {"ort_fp32": ("fp32.onnx", product), "ours_int8": ("ours.onnx", product)}
            if previous:
                targets |= {
                    "ort_fp32_previous": ("fp32.onnx", ort_defaults),
                    "ours_int8_previous": ("ours.onnx", before),
                }
            reps_for = list(repeats) + [repeats[-1]] * max(0, len(batches) - len(repeats))
            for b, reps in zip(batches, reps_for, strict=False):
                profiles[str(b)] = {
                    name: profile_ops(tmp / f, cfg, b, size, reps) for name, (f, cfg) in targets.items()
                }
                say(f"profiled batch {b}")
    out = {
        "model": model_name,
        "input_size": [3, size, size],
        "threads": threads,
        "batches": results,
        "census": census,
        "settings": describe(product),
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "cpu": cpu_description(),
        "gap_s": GAP_S,
        "wall_s": round(time.perf_counter() - t0, 1),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
    }
    if profiles:
        out["profile"] = profiles
    return out


def _time_rotation(sessions, model, size, batches, repeats, previous, say) -> dict:
    """p50 latency of every session and of PyTorch eager, all timed in one round robin."""

    def ort_runner(sess):
        return lambda x: sess.run(None, {"input": x})

    def torch_runner(x):
        with torch.inference_mode():
            model(torch.from_numpy(x))

    runners = {name: ort_runner(s) for name, s in sessions.items()}
    runners["pytorch_fp32"] = torch_runner
    reps_for = list(repeats) + [repeats[-1]] * max(0, len(batches) - len(repeats))
    results: dict[str, dict] = {}
    for b, reps in zip(batches, reps_for, strict=False):
        x = np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32)
        for run in runners.values():  # warm-up: arena growth, prepacking, first-call costs
            run(x)
            run(x)
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(reps):
            for name, run in runners.items():
                time.sleep(GAP_S)
                start = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - start)
        row = {f"{k}_ms": round(float(np.median(v)) * 1000, 2) for k, v in times.items()}
        row["int8_vs_ort_fp32"] = round(row["ort_fp32_ms"] / row["ours_int8_ms"], 3)
        row["int8_vs_pytorch_fp32"] = round(row["pytorch_fp32_ms"] / row["ours_int8_ms"], 3)
        row["int8_vs_qstatic_int8"] = round(row["qstatic_int8_ms"] / row["ours_int8_ms"], 3)
        if previous:
            row["previous_int8_vs_ort_fp32"] = round(
                row["ort_fp32_previous_ms"] / row["ours_int8_previous_ms"], 3
            )
        row["repeats"] = reps
        results[str(b)] = row
        say(f"batch {b}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return results


def markdown(res: dict) -> str:
    """The results as the table docs/deployment-results.md keeps."""
    size = res["input_size"][-1]
    lines = [
        f"### {res['model']}, random init, {size}×{size}, {res['threads']} threads ({res['cpu']}), "
        f"onnxruntime {res['versions']['onnxruntime']}, torch {res['versions']['torch']}",
        "",
        "| batch | ORT FP32 (ms) | ours INT8 (ms) | PyTorch FP32 (ms) | quantize_static INT8 (ms) "
        "| INT8 vs ORT FP32 | INT8 vs PyTorch FP32 | previous settings: ORT FP32 / ours INT8 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b, r in res["batches"].items():
        prev = (
            f"{r['ort_fp32_previous_ms']:.1f} / {r['ours_int8_previous_ms']:.1f} "
            f"(**{r['previous_int8_vs_ort_fp32']:.2f}×**)"
            if "previous_int8_vs_ort_fp32" in r
            else "—"
        )
        lines.append(
            f"| {b} | {r['ort_fp32_ms']:.1f} | {r['ours_int8_ms']:.1f} | {r['pytorch_fp32_ms']:.1f} | "
            f"{r['qstatic_int8_ms']:.1f} | **{r['int8_vs_ort_fp32']:.2f}×** | "
            f"{r['int8_vs_pytorch_fp32']:.2f}× | {prev} |"
        )
    c = res["census"]

    def fmt(k: str) -> str:
        x = c[k]
        return (
            f"{x['int8_gemm']} int8 GEMMs, {x['float_gemm']} float GEMMs, {x['attention']} "
            f"MultiHeadAttention, {x['nodes']} nodes"
        )

    lines += [
        "",
        f"p50 of {', '.join(str(r['repeats']) for r in res['batches'].values())} runs per model "
        f"(batch {', '.join(res['batches'])}), all models in one rotation. Optimized-graph census: "
        f"ORT FP32 {fmt('ort_fp32')}; ours {fmt('ours_int8')}; quantize_static {fmt('qstatic_int8')}"
        + (f"; ours, previous settings {fmt('ours_int8_previous')}" if "ours_int8_previous" in c else "")
        + f". Total wall time {res['wall_s']:.0f}s; 1-min load average "
        f"{res['loadavg_1min'][0]:.2f} before, {res['loadavg_1min'][1]:.2f} after.",
        "",
    ]
    names = {
        "ort_fp32_previous": "ORT FP32, previous",
        "ort_fp32": "ORT FP32",
        "ours_int8_previous": "ours INT8, previous",
        "ours_int8": "ours INT8",
    }
    for b, prof in res.get("profile", {}).items():
        cols = [k for k in names if k in prof]
        labels = sorted(
            {lb for k in cols for lb in prof[k]["ops"]},
            key=lambda lb: -max(prof[k]["ops"].get(lb, 0) for k in cols),
        )
        lines += [
            f"ORT profiler, batch {b}: kernel time per run by op type (ms, median of "
            f"{prof[cols[0]]['runs']} profiled runs; × = nodes of that type).",
            "",
            "| op type | " + " | ".join(names[k] for k in cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for lb in labels:
            cells = []
            for k in cols:
                ms, n = prof[k]["ops"].get(lb), prof[k]["nodes"].get(lb)
                cells.append("—" if ms is None else f"{ms:.2f} (×{n})" if n else f"{ms:.2f}")
            if max(prof[k]["ops"].get(lb, 0) for k in cols) >= 0.01 * float(b) ** 0.5:
                lines.append(f"| {lb} | " + " | ".join(cells) + " |")
        lines.append(
            "| **kernel sum** / model_run | "
            + " | ".join(f"**{prof[k]['kernel_sum_ms']:.2f}** / {prof[k]['model_run_ms']:.2f}" for k in cols)
            + " |"
        )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--calib-images", type=int, default=8)
    ap.add_argument("--repeats", default="20,5", help="timed runs per model at each batch size")
    ap.add_argument("--no-previous", action="store_true", help="skip the previous-settings sessions")
    ap.add_argument("--profile", action="store_true", help="also profile the ORT models (per-op kernel time)")
    ap.add_argument("--json", default=None, help="write the raw results to this file")
    ap.add_argument("--write", default=None, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    res = measure(
        args.model,
        threads=args.threads,
        batches=tuple(int(b) for b in args.batches.split(",")),
        repeats=tuple(int(r) for r in args.repeats.split(",")),
        calib_images=args.calib_images,
        previous=not args.no_previous,
        profile=args.profile,
    )
    table = markdown(res)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    if args.write:
        with open(args.write, "a") as fh:
            fh.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
