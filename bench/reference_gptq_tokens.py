"""GPTQ's token weighting on the embedded reference model: uniform vs attention rollout.

    bash tools/dev.sh python bench/reference_gptq_tokens.py > docs/reference-gptq-tokens.jsonl

32 real training images and 32 SARDFQ images (seed 0, the model's default iterations), schemes
w4a16 / w4a8 / w4a4 with the product's recipe, GPTQ with ``gptq_tokens`` uniform and rollout
(calibrators.rollout); all 10,000 Fashion-MNIST test images: top-1, logit KL to FP32 (what GPTQ
lowers) and top-1 agreement with FP32. One JSON line per cell.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

import sardfq_export as sx
from sardfq_export.data import load_dataset


def sweep(field: str, values, schemes=("w4a16", "w4a8", "w4a4")) -> None:
    """One JSON line per calibration set, scheme and value of the QuantizeConfig ``field`` (the line
    names it without its ``gptq_`` prefix); the FP32 top-1 first."""
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
    key = field.removeprefix("gptq_")
    for cname, cal in cals.items():
        for scheme in schemes:
            for value in values:
                q = sx.quantize(ref, cal, scheme=scheme, progress=False, **{field: value}).model
                log = logits(q).log_softmax(1)
                row = {
                    "calib": cname, "scheme": scheme, key: value,
                    "top1": round(100 * (log.argmax(1) == labels).float().mean().item(), 2),
                    "kl": round(F.kl_div(log, fp, log_target=True, reduction="batchmean").item(), 5),
                    "agreement": round(100 * (log.argmax(1) == fp.argmax(1)).float().mean().item(), 2),
                }  # fmt: skip
                print(json.dumps(row), flush=True)


def main() -> None:
    sweep("gptq_tokens", ("uniform", "rollout"))


if __name__ == "__main__":
    main()
