"""What the main job's validation passes cost on the DINOv2 benchmark model, side by side.

    bash tools/dev.sh python bench/validation_passes.py [--limit 1000] [--rounds 3]

The validate stage runs three full passes over the labelled test set (float model, fake-quant
model, deployed engine); this bench times each runner the stage could use for them over the same
first --limit test images, in interleaved rounds (machine noise hits all alike), at the stage's batch
of 256: PyTorch FP32 eager, PyTorch fake-quant (weights frozen, as validation runs it), ONNX
Runtime INT8 (the deployed graph and session settings), ONNX Runtime FP32 (the latency
baseline: the float model exported the same way, same settings) and the fake-quant model with
ATen's scalar per-tensor op instead of the vectorized CPU path. Also the top-1 agreement of ORT
FP32 with PyTorch FP32, so that swapping one for the other is seen to leave the float model's
accuracy where it is. Prints one JSON object (--out writes it too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import sardfq_export as sx
from sardfq_export.data import load_raw, preprocess


def aten_op(runner):
    """``runner`` with every activation fake-quant through ATen's own per-tensor op (what the CPU
    evaluation path replaced; bit-identical values), to time the two side by side."""
    from sardfq_export.calibrators import quantizer

    def run(images):
        fast = quantizer._plain_eval
        quantizer._plain_eval = lambda x, scale: False
        try:
            return runner(images)
        finally:
            quantizer._plain_eval = fast

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2_s14_fmnist")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)

    from sardfq_export.calibrators.quantizer import frozen_weights
    from sardfq_export.exporters import export_float_onnx
    from sardfq_export.exporters.ort import OrtConfig, create_session, write_deployment_graph
    from sardfq_export.validation.runners import OrtRunner, TorchRunner

    loaded = sx.load_model(a.model)
    raw = load_raw("fashion-mnist", "test")
    x = preprocess(raw.images[: a.limit], loaded.data_config)
    y = torch.as_tensor(raw.labels[: a.limit]).long()
    cal, _ = sx.calibration_set("real:fashion-mnist", loaded, 32, seed=0, progress=False)
    q = sx.quantize(loaded, cal, scheme="w8a8", progress=False)
    cfg = OrtConfig(threads=torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp, frozen_weights(q.model):
        tmp = Path(tmp)
        sx.export(q, tmp / "model.onnx", target="onnxruntime")
        ort_path, run_cfg = write_deployment_graph(tmp / "model.onnx", tmp / "model.ort.onnx", cfg)
        fp32_path = export_float_onnx(loaded.model, tmp / "model.fp32.onnx", tuple(x.shape[1:]))
        runners = {
            "torch_fp32": TorchRunner(loaded.model, "torch-fp32"),
            "torch_fakequant": TorchRunner(q.model, "torch-fakequant"),
            "torch_fakequant_aten_op": aten_op(TorchRunner(q.model, "torch-fakequant")),
            "ort_int8": OrtRunner(create_session(ort_path, run_cfg)),
            "ort_fp32": OrtRunner(create_session(fp32_path, cfg), name="onnxruntime-fp32"),
        }
        seconds: dict[str, list[float]] = {k: [] for k in runners}
        preds: dict[str, torch.Tensor] = {}
        for _ in range(a.rounds):
            for name, run in runners.items():
                t0 = time.perf_counter()
                with torch.inference_mode():
                    z = torch.cat([run(b) for b in x.split(a.batch)])
                seconds[name].append(time.perf_counter() - t0)
                preds[name] = z.argmax(1)
    base = statistics.median(seconds["torch_fp32"])
    res = {
        "model": a.model, "images": a.limit, "batch": a.batch, "rounds": a.rounds,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "runners": {
            k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                "ms_per_image": 1000 * statistics.median(v) / a.limit,
                "time_vs_torch_fp32": statistics.median(v) / base,
                "top1": float((preds[k] == y).float().mean())}
            for k, v in seconds.items()
        },
        # per round (the runners of one round ran back to back): robust to load that comes and goes
        "round_ratio_fakequant_aten_op_over_vectorized": sorted(
            a / b for a, b in zip(seconds["torch_fakequant_aten_op"], seconds["torch_fakequant"], strict=True)
        ),
        "round_ratio_fakequant_over_fp32": sorted(
            a / b for a, b in zip(seconds["torch_fakequant"], seconds["torch_fp32"], strict=True)
        ),
        "ort_fp32_top1_agreement_with_torch_fp32": float((preds["ort_fp32"] == preds["torch_fp32"]).float().mean()),
        "fakequant_paths_same_predictions": bool(torch.equal(preds["torch_fakequant"], preds["torch_fakequant_aten_op"])),
    }  # fmt: skip
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
