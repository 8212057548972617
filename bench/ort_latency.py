"""Benchmark (not a test): ONNX Runtime latency of our INT8 export vs FP32 vs ORT's own quantize_static.

    bash tools/dev.sh python bench/ort_latency.py [--model deit_small_patch16_224] [--threads 2]
                                                  [--batches 1,32] [--write docs/deployment-results.md]

Random-init timm model (no download), 224×224. Ours: calibrators w8a8 (per-channel INT8 weights,
per-tensor INT8 activations on every block Linear) calibrated on Gaussian noise, exported by
exporters.export_onnx, run with exporters.ort's session settings (MatMulAddFusion off). FP32: the
same network exported by torch.onnx. quantize_static: onnxruntime.quantization's QDQ, symmetric,
per-channel INT8, calibrated on the same noise images. Models are timed in rotation (round robin)
so machine noise hits all of them alike; p50 of a few repeats, after warm-up.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _export_fp32(model, path: Path, size: int) -> None:
    import warnings

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--calib-images", type=int, default=8)
    ap.add_argument("--repeats", default="20,5", help="timed runs per model at each batch size")
    ap.add_argument("--write", default=None, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import timm

    import calibrators
    from exporters.onnx_export import export_onnx
    from exporters.ort import OrtConfig, create_session, op_census

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    size = model.pretrained_cfg["input_size"][-1]
    gen = torch.Generator().manual_seed(0)
    calib = torch.randn(args.calib_images, 3, size, size, generator=gen)
    tmp = Path(tempfile.mkdtemp(prefix="sardfq-bench-"))
    qmodel = calibrators.quantize_model(model, "w8a8")
    calibrators.calibrate(qmodel, calib, progress=False)
    export_onnx(qmodel, tmp / "ours.onnx", (3, size, size))
    _export_fp32(model, tmp / "fp32.onnx", size)
    _quantize_static(tmp / "fp32.onnx", tmp / "qstatic.onnx", calib.numpy())
    print(f"prepared in {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    tuned = OrtConfig(threads=args.threads)
    default = OrtConfig(threads=args.threads, disabled_optimizers=())
    sessions = {
        "ORT FP32": create_session(tmp / "fp32.onnx", default),
        "ours INT8 (MatMulAddFusion off)": create_session(tmp / "ours.onnx", tuned),
        "ours INT8 (ORT defaults)": create_session(tmp / "ours.onnx", default),
        "ORT quantize_static INT8": create_session(tmp / "qstatic.onnx", default),
    }
    census = {
        "ours": op_census(tmp / "ours.onnx", tuned),
        "ours-default": op_census(tmp / "ours.onnx", default),
        "qstatic": op_census(tmp / "qstatic.onnx", default),
    }
    batches = [int(b) for b in args.batches.split(",")]
    repeats = [int(r) for r in args.repeats.split(",")]
    results: dict[int, dict[str, float]] = {}
    for b, reps in zip(batches, repeats + repeats[-1:] * len(batches), strict=False):
        x = np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32)
        for s in sessions.values():
            s.run(None, {"input": x})  # warm-up
            s.run(None, {"input": x})
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(reps):
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, {"input": x})
                times[name].append(time.perf_counter() - start)
        results[b] = {k: float(np.median(v)) * 1000 for k, v in times.items()}
        print(f"batch {b}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in results[b].items()), file=sys.stderr)

    cpu = platform.processor() or platform.machine()
    lines = [
        f"### {args.model}, random init, {size}×{size}, {args.threads} threads ({cpu}), "
        f"onnxruntime {__import__('onnxruntime').__version__}",
        "",
        "| batch | ORT FP32 p50 (ms) | ours INT8 p50 (ms) | quantize_static INT8 p50 (ms) | ours, ORT defaults (ms) "
        "| ours / FP32 latency | ours / quantize_static latency |",
        "|---|---|---|---|---|---|---|",
    ]
    for b, r in results.items():
        ours, fp32, qs = r["ours INT8 (MatMulAddFusion off)"], r["ORT FP32"], r["ORT quantize_static INT8"]
        lines.append(
            f"| {b} | {fp32:.1f} | {ours:.1f} | {qs:.1f} | {r['ours INT8 (ORT defaults)']:.1f} | "
            f"{ours / fp32:.2f} ({fp32 / ours:.2f}× faster) | {ours / qs:.2f} |"
        )
    lines += [
        "",
        f"Optimized-graph census: ours {census['ours']['int8_gemm']} int8 GEMMs / "
        f"{census['ours']['float_gemm']} float; ours with ORT defaults {census['ours-default']['int8_gemm']} / "
        f"{census['ours-default']['float_gemm']}; quantize_static {census['qstatic']['int8_gemm']} / "
        f"{census['qstatic']['float_gemm']}. Total wall time {time.perf_counter() - t0:.0f}s.",
        "",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        with open(args.write, "a") as fh:
            fh.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
