"""SmoothQuant strength on DINOv2 with the model's own w8a8 recipe (centred fc2 + bias correction),
from the table's SARDFQ set for one seed (``bench/dinov2_table.py``'s calibration cache): fake-quant top-1 on the
first ``--limit`` test images per recipe, one line each, in minutes rather than the table's hours:

    nice bash tools/dev.sh python bench/dinov2_smooth_probe.py --alphas 0.5 0.8 --limit 1000 --seed 0

A screening probe (one seed, a slice of the test set): the table's 10k × 3-seed rows decide.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dinov2_probe import model_cache  # noqa: E402
from dinov2_table import EXPLICIT, MODEL, RECIPES, calibration, logits_of, scores, test_set  # noqa: E402

import sardfq_export as sx  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.8])
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--calib-cache", type=Path, default=Path.home() / ".cache/sardfq-export/bench-dinov2-calib"
    )
    a = ap.parse_args(argv)
    loaded = sx.load_model(MODEL)
    # The table's own SARDFQ set for this seed (made and cached there when missing) and its row.
    cal = calibration(loaded, "sardfq", a.seed, 32, 100, model_cache(a.calib_cache, loaded))
    x, y = test_set(loaded, a.limit)
    print(json.dumps({"recipe": "fp32", "top1": scores(logits_of(loaded.model, x), y)}), flush=True)
    base = {**EXPLICIT, **RECIPES["w8a8+c+bc"]}
    for alpha in [None, *a.alphas]:
        recipe = base if alpha is None else {**base, "smoothquant": alpha, "smooth_fc2": True}
        q = sx.quantize(loaded, cal, seed=a.seed, progress=False, **recipe)
        with torch.inference_mode():
            top1 = scores(logits_of(q.model, x), y)
        print(
            json.dumps({"recipe": recipe, "seed": a.seed, "limit": a.limit, "fakequant_top1": top1}),
            flush=True,
        )


if __name__ == "__main__":
    main()
