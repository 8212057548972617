"""Does synthesizing on a coarser pixel grid (``SynthConfig.image_scale``) calibrate 4-bit weights better?

    nice bash tools/dev.sh python bench/dinov2_image_scale_probe.py --rows w4a8+awq w4a16+v4+r \
        --seeds 0 1 2 --scales 1 0.5 0.25 --limit 2000 [--log docs/dinov2-image-scale-probe.jsonl]

The low-pass probe (``bench/dinov2_lowpass_probe.py``) smooths finished synthetic images, which
then no longer show what the synthesis optimized them to show. Here SARDFQ optimizes the pixels of
a grid ``scale`` times as fine as the model's input, upsampled at every step, so the images are
smooth *and* optimized. Per scale and seed: SARDFQ's set (32 images, 100 iterations, cached beside
the table's sets as ``sardfq-image_scale<scale>-n32-s<seed>-it100``; scale 1 is the table's own set),
its share of pixel energy above 1/8 cycle per pixel, then per row of ``bench/dinov2_table.py``'s
RECIPES the product's quantize and fake-quant top-1 on the first ``--limit``
test images; with ``--union``, instead once on all the seeds' sets together.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dinov2_lowpass_probe import high_frequency_share  # noqa: E402
from dinov2_probe import _commit, emit, model_cache  # noqa: E402
from dinov2_table import EXPLICIT, MODEL, RECIPES, calibration, logits_of, scores, test_set  # noqa: E402

import sardfq_export as sx  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", default=["w4a8+awq"], choices=sorted(RECIPES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--grey", action="store_true", help="synthesize one grey channel (SynthConfig.grey)")
    ap.add_argument(
        "--union", action="store_true",
        help="calibrate once per scale on the union of the seeds' sets (seed = the first one's) instead of per seed",
    )  # fmt: skip
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument(
        "--calib-cache", type=Path, default=Path.home() / ".cache/sardfq-export/bench-dinov2-calib"
    )
    ap.add_argument("--log", type=Path, help="append each result as a JSON line here too")
    a = ap.parse_args(argv)
    loaded = sx.load_model(MODEL)
    cache = model_cache(a.calib_cache, loaded)
    x, y = test_set(loaded, a.limit)
    fp32 = scores(logits_of(loaded.model, x), y)
    grey = {"grey": True} if a.grey else {}  # in the set's fields and in every row
    sets: dict[float, list] = {scale: [] for scale in a.scales}

    def measure(images, seed: int, where: dict) -> None:
        """Each row's quantize from ``images`` and its fake-quant top-1, one JSON line per row."""
        for row in a.rows:
            t0 = time.perf_counter()
            q = sx.quantize(loaded, images, seed=seed, progress=False, **{**EXPLICIT, **RECIPES[row]})
            emit({"row": row, "calib": "sardfq", **where, "limit": len(y), **grey, "fp32_top1": fp32,
                  "fakequant_top1": scores(logits_of(q.model, x), y),
                  "seconds": round(time.perf_counter() - t0, 1), "commit": _commit()}, a.log)  # fmt: skip

    for seed in a.seeds:
        for scale in a.scales:
            synth = {**({} if scale == 1.0 else {"image_scale": scale}), **grey}
            cal = calibration(loaded, "sardfq", seed, 32, 100, cache, synth)
            sets[scale].append(cal.images)
            emit({"calib": "sardfq", "seed": seed, "image_scale": scale, **grey,
                  "energy_above_1/8": high_frequency_share(cal.images, 1 / 8),
                  "synthesis_seconds": cal.meta.get("wall_time_s"), "commit": _commit()}, a.log)  # fmt: skip
            if not a.union:
                measure(cal, seed, {"seed": seed, "image_scale": scale})
    for scale, images in sets.items() if a.union else ():  # more images per Hessian, each set as made
        union = torch.cat(images)
        measure(union, a.seeds[0], {"seeds": a.seeds, "union": len(union), "image_scale": scale})


if __name__ == "__main__":
    main()
