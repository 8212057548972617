"""Do wider 4-bit activation ranges close w4a4's gap between synthetic and real calibration?
(a probe; numbers in docs/dinov2-accuracy.md)

    nice bash tools/dev.sh python bench/dinov2_w4a4_ranges.py --seed 0 --log docs/dinov2-w4a4-ranges.jsonl

bench/dinov2_w4a4_range_swap.py found half of the gap in the activation ranges: the synthetic
sets' MSE clips are narrower than real images' (geometric mean 0.83x in blocks 0-9). Two data-free
ways to widen them, each a QuantizeConfig field: ``range_norm`` p > 2 (the clip minimizing
sum |x - q(x)|^p weighs the clipped tail more) and ``range_views`` (ranges also seen on flipped and
cropped variants of the images). Each variant quantizes with the table's ``--row`` (the model's w4a4
recipe) from the table's sets, fake-quant top-1 on the first ``--limit`` test images. The variant
``frame.25`` changes the images instead (``calib_frame`` 0.25, a flat grey frame).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dinov2_probe import model_cache  # noqa: E402
from dinov2_table import EXPLICIT, MODEL, RECIPES, calibration, logits_of, scores, test_set  # noqa: E402
from dinov2_w4a4_range_swap import CALIB_CACHE, act_scales  # noqa: E402

import sardfq_export as sx  # noqa: E402

ROW = "w4a4+v4+r+fp10-11+b64+ft.25+c"
VARIANTS = {
    "mse": {},
    "p3": {"range_norm": 3.0},
    "p4": {"range_norm": 4.0},
    "views4": {"range_views": 4},
    "p2.5": {"range_norm": 2.5},
    "p3+views4": {"range_norm": 3.0, "range_views": 4},
    # not a range: the images framed in one flat grey first (calibrators.frame; bench/dinov2_deep_stats.py)
    "frame.25": {"calib_frame": 0.25},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--row", default=ROW)
    ap.add_argument("--calib", nargs="+", default=["sardfq/8g", "real"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--log", type=Path)
    a = ap.parse_args(argv)
    loaded = sx.load_model(MODEL)
    x, y = test_set(loaded, a.limit)
    calib_dir = model_cache(CALIB_CACHE, loaded)
    for calib in a.calib:
        cal = calibration(loaded, calib, a.seed, 32, 100, calib_dir)
        for name in a.variants:
            t0 = time.time()
            recipe = {**EXPLICIT, **RECIPES[a.row], **VARIANTS[name]}
            m = sx.quantize(loaded, cal, seed=a.seed, progress=False, **recipe).model
            scales = act_scales(m)
            row = {"row": a.row, "variant": name, "overrides": VARIANTS[name], "calib": calib, "seed": a.seed,
                   "limit": a.limit, "top1": scores(logits_of(m, x), y),
                   "mean_activation_scale": {k: float(v.mean()) for k, v in scales.items()},
                   "seconds": round(time.time() - t0, 1)}  # fmt: skip
            print(json.dumps({k: v for k, v in row.items() if k != "mean_activation_scale"}), flush=True)
            if a.log:
                with open(a.log, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
