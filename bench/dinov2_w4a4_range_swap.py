"""Is w4a4's gap between synthetic and real calibration in the activation ranges or in the weights?
(a probe; numbers in docs/dinov2-accuracy.md)

    nice bash tools/dev.sh python bench/dinov2_w4a4_range_swap.py --seed 0 --log docs/dinov2-w4a4-range-swap.jsonl
    nice bash tools/dev.sh python bench/dinov2_w4a4_range_swap.py --seed 0 --limit 1000 --per-quantizer \
        --log docs/dinov2-w4a4-range-swap-per-quantizer.jsonl
    nice bash tools/dev.sh python bench/dinov2_w4a4_range_swap.py --seed 0 --limit 1000 --per-quantizer \
        --row w4a4+v4+r+fp10-11+b64+ft.25+c --keep-shifts --roles mlp.fc2 \
        --log docs/dinov2-w4a4-range-swap-centred.jsonl

Quantizes DINOv2 at w4a4 with the table's ``ROW`` (the model's w4a4 recipe) twice, from the table's
SARDFQ set (``sardfq/8g``, the product's synthesis for this model) and from 32 real train images, then
swaps the 4-bit activation quantizers' scales between the two models (weights, and everything else,
kept) and reports fake-quant top-1 on the first ``--limit`` test images for all four combinations.
The recipe must not centre or smooth (those shifts are fitted to the same data as the ranges).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dinov2_probe import model_cache  # noqa: E402
from dinov2_table import EXPLICIT, MODEL, RECIPES, calibration, logits_of, scores, test_set  # noqa: E402
from sardfq_export.calibrators.instrument import iter_quantizers  # noqa: E402

import sardfq_export as sx  # noqa: E402

ROW = "w4a4+v4+r+fp10-11+b64+ft.25"
CALIB_CACHE = Path.home() / ".cache/sardfq-export/bench-dinov2-calib"


def act_scales(model) -> dict:
    """The enabled activation quantizers' scales, by module name."""
    return {n: q.scale.clone() for n, q in iter_quantizers(model) if q.role != "weight" and q.enabled}


def set_act_scales(model, scales: dict) -> None:
    for n, q in iter_quantizers(model):
        if n in scales:
            q.set_scale(scales[n])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--row", default=ROW)
    ap.add_argument("--log", type=Path)
    ap.add_argument(
        "--per-quantizer",
        action="store_true",
        help="also: the SARDFQ model with one quantizer at a time given the real set's range",
    )
    ap.add_argument(
        "--roles", nargs="+", help="--per-quantizer: only quantizers whose name contains one of these"
    )
    ap.add_argument(
        "--keep-shifts",
        action="store_true",
        help="allow a row that centres fc2: each model keeps its own shifts, only the ranges swap (a diagnostic)",
    )
    a = ap.parse_args(argv)
    recipe = {**EXPLICIT, **RECIPES[a.row]}
    if recipe.get("smoothquant") or (recipe.get("centre_fc2") and not a.keep_shifts):
        ap.error(f"{a.row} centres or smooths: its shifts are fitted with the ranges; pick a row without "
                 "(or, centring only, --keep-shifts)")  # fmt: skip

    loaded = sx.load_model(MODEL)
    x, y = test_set(loaded, a.limit)
    calib_dir = model_cache(CALIB_CACHE, loaded)
    models = {}
    for calib in ("sardfq/8g", "real"):
        cal = calibration(loaded, calib, a.seed, 32, 100, calib_dir)
        models[calib] = sx.quantize(loaded, cal, seed=a.seed, progress=False, **recipe).model
    ranges = {k: act_scales(m) for k, m in models.items()}
    assert ranges["real"].keys() == ranges["sardfq/8g"].keys()
    rows = []
    for weights in ("sardfq/8g", "real"):
        for acts in ("sardfq/8g", "real"):
            m = models[weights]
            set_act_scales(m, ranges[acts])
            row = {"row": a.row, "seed": a.seed, "limit": a.limit, "weights_from": weights,
                   "shifts": "own" if recipe.get("centre_fc2") else None,
                   "activation_ranges_from": acts, "top1": scores(logits_of(m, x), y)}  # fmt: skip
            set_act_scales(m, ranges[weights])
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.per_quantizer:  # which of the real ranges carry the gain: one at a time into the SARDFQ model
        m = models["sardfq/8g"]
        for name in (n for n in ranges["real"] if not a.roles or any(r in n for r in a.roles)):
            set_act_scales(m, {name: ranges["real"][name]})
            row = {"row": a.row, "seed": a.seed, "limit": a.limit, "weights_from": "sardfq/8g",
                   "real_range_for": name, "top1": scores(logits_of(m, x), y),
                   "range_ratio_synthetic_over_real": float(ranges["sardfq/8g"][name].mean() / ranges["real"][name].mean())}  # fmt: skip
            set_act_scales(m, {name: ranges["sardfq/8g"][name]})
            print(json.dumps(row), flush=True)
            rows.append(row)
    # how far apart the two sets' ranges are, per Linear role (ratio synthetic / real, geometric mean)
    for role in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        names = [n for n in ranges["real"] if role in n]
        ratios = [float(ranges["sardfq/8g"][n].mean() / ranges["real"][n].mean()) for n in names]
        row = {"row": a.row, "seed": a.seed, "role": role, "range_ratio_synthetic_over_real": ratios}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.log:
        with open(a.log, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
