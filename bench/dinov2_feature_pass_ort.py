"""Would ONNX Runtime make the DINOv2 build's feature pass fast enough? torch fp32 vs ONNX Runtime
fp32 on the model's feature extractor (forward_features + timm's pooling), 128 images a batch (the
build's FEATURE_BATCH), interleaved pairs, one run:

    nice bash tools/dev.sh python bench/dinov2_feature_pass_ort.py [--pairs 5]

Prints each pair's seconds, the ratio torch/ORT, its median and range, and the largest feature
difference. docs/dinov2-model.md ("Build time") quotes it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

import sardfq_export as sx
from sardfq_export.models.dinov2 import FEATURE_BATCH


class Features(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(2)
    f = Features(sx.load_model("dinov2_s14_fmnist").model.eval()).eval()
    x = torch.randn(FEATURE_BATCH, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "features.onnx")
        torch.onnx.export(f, x[:2], path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}}, dynamo=False)  # fmt: skip
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

        def run_torch():
            t = time.perf_counter()
            with torch.inference_mode():
                out = f(x)
            return time.perf_counter() - t, out

        def run_ort():
            t = time.perf_counter()
            out = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
            return time.perf_counter() - t, out

        run_torch(), run_ort()  # warm-up
        ratios = []
        for _ in range(a.pairs):
            (tt, ft), (to, fo) = run_torch(), run_ort()
            ratios.append(tt / to)
            print(
                f"torch {tt:.2f} s  ORT {to:.2f} s  ratio {tt / to:.2f}  max |diff| {(ft - fo).abs().max():.2e}"
            )
    print(f"torch/ORT: median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}")


if __name__ == "__main__":
    main()
