"""GPTQ's target on the embedded reference model: the quantized inputs' float output vs the float model's.

    bash tools/dev.sh python bench/reference_gptq_target.py > docs/reference-gptq-target.jsonl

32 real training images and 32 SARDFQ images (seed 0, the model's default iterations), schemes
w4a16 / w4a8 / w4a4 with the product's recipe, GPTQ with ``gptq_target`` 0 (the paper's), 0.25 and 1 (the float model's output)
(calibrators.gptq, GPTAQ-style); all 10,000 Fashion-MNIST test images: top-1, logit KL to FP32 (what GPTQ
lowers) and top-1 agreement with FP32. One JSON line per cell.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

import sardfq_export as sx
from sardfq_export.data import load_dataset


def main() -> None:
    ref = sx.load_model("reference")
    images, labels = load_dataset("fashion-mnist", ref.data_config, "test").take(range(10000))

    @torch.inference_mode()
    def logits(m):
        return torch.cat([m(c) for c in images.split(1000)])

    fp = logits(ref.model).log_softmax(1)
    print(
        json.dumps({"fp32_top1": round(100 * (fp.argmax(1) == labels).float().mean().item(), 2)}), flush=True
    )
    cals = {
        "real": sx.calibration_set("real:fashion-mnist", ref, 32)[0],
        "sardfq": sx.synthesize(ref, method="sardfq", num_images=32, seed=0, progress=False),
    }
    for cname, cal in cals.items():
        for scheme in ("w4a16", "w4a8", "w4a4"):
            for target in (0.0, 0.25, 1.0):
                q = sx.quantize(ref, cal, scheme=scheme, gptq_target=target, progress=False).model
                log = logits(q).log_softmax(1)
                row = {
                    "calib": cname, "scheme": scheme, "target": target,
                    "top1": round(100 * (log.argmax(1) == labels).float().mean().item(), 2),
                    "kl": round(F.kl_div(log, fp, log_target=True, reduction="batchmean").item(), 5),
                    "agreement": round(100 * (log.argmax(1) == fp.argmax(1)).float().mean().item(), 2),
                }  # fmt: skip
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
