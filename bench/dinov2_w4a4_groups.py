"""Which 4-bit activation quantizers break DINOv2 at w4a4? (a probe; numbers in docs/dinov2-accuracy.md)

    nice bash tools/dev.sh python bench/dinov2_w4a4_groups.py sardfq

Quantizes with the table's ``w4a4`` row (GPTQ, seed 1's cached set), then turns groups of the 48
activation (input) quantizers off — one Linear role at a time, all but one role, single blocks — and
prints top-1 on the first 1,000 test images for each.
"""

import json
import sys

sys.path.insert(0, "bench")
from pathlib import Path

from dinov2_probe import model_cache
from dinov2_table import EXPLICIT, MODEL, RECIPES, calibration, logits_of, scores, test_set
from sardfq_export.calibrators.instrument import iter_quantizers

import sardfq_export as sx

CALIB_CACHE = Path.home() / ".cache/sardfq-export/bench-dinov2-calib"


def w4a4_model(calib: str):
    """The table's ``w4a4`` model from seed 1's cached ``calib`` set, the first 1,000 test images, and
    its enabled activation quantizers: ``(loaded, x, y, cal, model, [(name, quantizer)])``."""
    loaded = sx.load_model(MODEL)
    x, y = test_set(loaded, 1000)
    cal = calibration(loaded, calib, 1, 32, 100, model_cache(CALIB_CACHE, loaded))
    m = sx.quantize(loaded, cal, seed=1, progress=False, **{**EXPLICIT, **RECIPES["w4a4"]}).model
    acts = [(n, qq) for n, qq in iter_quantizers(m) if qq.role != "weight" and qq.enabled]
    return loaded, x, y, cal, m, acts


def main() -> None:
    calib = sys.argv[1] if len(sys.argv) > 1 else "sardfq"
    _, x, y, _, m, acts = w4a4_model(calib)
    print(len(acts), acts[:3][0][0], flush=True)

    def run(tag, off):
        for n, qq in acts:
            qq.enabled = not off(n)
        r = scores(logits_of(m, x), y)
        print(json.dumps({"calib": calib, "off": tag, "top1": r}), flush=True)

    run("none", lambda n: False)
    run("all acts (w4 per-channel, a16)", lambda n: True)
    for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        run(k, lambda n, k=k: k in n)
        run("all but " + k, lambda n, k=k: k not in n)
    for b in (0, 1, 2, 11):
        run(f"blocks.{b}", lambda n, b=b: n.startswith(f"blocks.{b}."))


if __name__ == "__main__":
    main()
