"""Does low-passing the synthetic calibration images help 4-bit weights? (``--calib-lowpass``)

    nice bash tools/dev.sh python bench/dinov2_lowpass_probe.py --rows w4a16+v4+r --seeds 0 1 2 \
        --fractions 1 0.5 --limit 2000 [--spectrum] [--log docs/dinov2-lowpass-probe.jsonl]
    nice bash tools/dev.sh python bench/dinov2_lowpass_probe.py --spectrum --seeds   # the spectra only

Synthetic images are textures; real Fashion-MNIST ones (28 px, upscaled to 112) are smooth.
``--spectrum`` first prints each set's share of pixel energy above 1/8 and 1/4 cycle per pixel
(and its mean and standard deviation), for 32 real train images and the table's synthetic sets.
Then, per row of ``bench/dinov2_table.py``'s RECIPES, seed and fraction: the product's quantize
with ``calib_lowpass=fraction`` on the table's SARDFQ set of that seed (``sardfq-n32-s<seed>-it100``,
synthesized and cached by the table), fake-quant top-1 on the first ``--limit`` test images.
``--jitter K``: K more runs per cell on the images times ``1 + 1e-7·N(0, 1)`` (seeds 0..K-1).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dinov2_probe import _commit, emit, model_cache  # noqa: E402
from dinov2_table import EXPLICIT, MODEL, RECIPES, calibration, logits_of, scores, test_set  # noqa: E402
from sardfq_export.calibrators import lowpass  # noqa: E402

import sardfq_export as sx  # noqa: E402
from sardfq_export.data import load_raw, preprocess  # noqa: E402


def high_frequency_share(images: torch.Tensor, cutoff: float) -> float:
    """Share of the images' spectral energy above ``cutoff`` cycles per pixel (either axis)."""
    power = torch.fft.rfft2(images.float()).abs().pow(2)
    fy = torch.fft.fftfreq(images.shape[-2]).abs()[:, None]
    fx = torch.fft.rfftfreq(images.shape[-1])[None, :]
    return float(power[..., torch.maximum(fy, fx) > cutoff].sum() / power.sum())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", default=["w4a16+v4+r"], choices=sorted(RECIPES))
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="none: only --spectrum")
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument(
        "--jitter",
        type=int,
        default=0,
        metavar="K",
        help="also K runs per cell with the images moved by 1e-7 relative noise (seeded): how far "
        "top-1 moves when nothing that matters changes",
    )
    ap.add_argument("--spectrum", action="store_true", help="first, the sets' high-frequency energy")
    ap.add_argument(
        "--calib-cache", type=Path, default=Path.home() / ".cache/sardfq-export/bench-dinov2-calib"
    )
    ap.add_argument("--log", type=Path, help="append each result as a JSON line here too")
    a = ap.parse_args(argv)
    loaded = sx.load_model(MODEL)
    cache = model_cache(a.calib_cache, loaded)
    if a.spectrum:
        sets = {"real": preprocess(load_raw("fashion-mnist", "train").images[:32], loaded.data_config)}
        for kind in ("sardfq", "psaq", "noise"):
            sets[kind] = calibration(loaded, kind, 0, 32, 100, cache).images
        sets["sardfq lowpass 0.5"] = lowpass(sets["sardfq"], 0.5)
        for name, images in sets.items():
            emit({"spectrum": name, "seed": 0, "energy_above_1/8": high_frequency_share(images, 1 / 8),
                  "energy_above_1/4": high_frequency_share(images, 1 / 4), "mean": float(images.mean()),
                  "std": float(images.std())}, a.log)  # fmt: skip
    if not a.seeds:
        return
    x, y = test_set(loaded, a.limit)
    fp32 = scores(logits_of(loaded.model, x), y)
    for row in a.rows:
        for seed in a.seeds:
            cal = calibration(loaded, "sardfq", seed, 32, 100, cache)
            for fraction, jitter in itertools.product(a.fractions, [None, *range(a.jitter)]):
                t0 = time.perf_counter()
                recipe = {**EXPLICIT, **RECIPES[row], "calib_lowpass": fraction}
                images = cal.images
                if jitter is not None:
                    gen = torch.Generator().manual_seed(jitter)
                    images = images * (1 + 1e-7 * torch.randn(images.shape, generator=gen))
                q = sx.quantize(loaded, replace(cal, images=images), seed=seed, progress=False, **recipe)
                emit({"row": row, "calib": "sardfq", "seed": seed, "calib_lowpass": fraction, "jitter": jitter,
                      "limit": len(y), "fp32_top1": fp32, "fakequant_top1": scores(logits_of(q.model, x), y),
                      "seconds": round(time.perf_counter() - t0, 1), "commit": _commit()}, a.log)  # fmt: skip


if __name__ == "__main__":
    main()
