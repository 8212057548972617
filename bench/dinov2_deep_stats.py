"""Where synthetic and real images' activations differ in the deep blocks (a probe; numbers in
docs/dinov2-accuracy.md)

    nice bash tools/dev.sh python bench/dinov2_deep_stats.py --seed 0

The float DINOv2 model's activations, per block, on the table's 32-image calibration sets (SARDFQ's
and PSAQ-ViT's, grey eighth grid), on SARDFQ's framed in one flat grey (calibrators.frame, the
``--calib-frame`` of the w4a4 rows ``…+fr.25``), on the table's other sets named by ``--also`` and
on the first ``--real`` real test images (``--samples DIR`` draws the sets): each block's fc2 input 99.9th percentile of |x| and qkv
input max |x| (what the 4-bit activation ranges and reconstruction fit to), and the mean top-1
probability of the prediction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dinov2_probe import model_cache  # noqa: E402
from dinov2_table import MODEL, calibration, test_set  # noqa: E402
from dinov2_w4a4_range_swap import CALIB_CACHE  # noqa: E402

import sardfq_export as sx  # noqa: E402
from sardfq_export import calibrators  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real", type=int, default=128, help="real test images")
    ap.add_argument("--frame", type=float, default=0.25)
    ap.add_argument("--blocks", type=int, nargs="+", default=[5, 6, 7, 8, 9, 10])
    ap.add_argument("--also", nargs="*", default=[], metavar="CALIB",
                    help="more of the table's synthetic sets, e.g. sardfq/8g-it400 (synthesized if missing)")  # fmt: skip
    ap.add_argument("--samples", type=Path, default=None, metavar="DIR",
                    help="also draw each set named by --also (its first 16 images) to DIR/dinov2-samples-<set>.png")  # fmt: skip
    ap.add_argument("--no-base", action="store_true",
                    help="only the sets named by --also and the real images (not sardfq/8g, framed afterwards, psaq/8g)")  # fmt: skip
    a = ap.parse_args(argv)
    loaded = sx.load_model(MODEL)
    model, dc = loaded.model.eval(), loaded.data_config
    calib_dir = model_cache(CALIB_CACHE, loaded)
    base = {}
    if not a.no_base:
        syn = calibration(loaded, "sardfq/8g", a.seed, 32, 100, calib_dir).images
        base = {
            "sardfq/8g": syn,
            f"sardfq/8g framed {a.frame:g}": calibrators.frame(
                syn, a.frame, dc["mean"], dc["std"], seed=a.seed
            ),
            "psaq/8g": calibration(loaded, "psaq/8g", a.seed, 32, 100, calib_dir).images,
        }
    sets = {
        **base,
        **{c: calibration(loaded, c, a.seed, 32, 100, calib_dir).images for c in a.also},
        f"real test ({a.real})": test_set(loaded, a.real)[0],
    }
    if a.samples is not None:  # what the sets look like, beside their numbers
        from sardfq_export.synthesis.samples import save_samples

        for c in [*(() if a.no_base else ("sardfq/8g",)), *a.also]:
            cal = calibration(loaded, c, a.seed, 32, 100, calib_dir)
            name = c.replace("/", "-")
            print(
                save_samples(a.samples / f"dinov2-samples-{name}-s{a.seed}.png", cal, loaded, max_images=16)
            )
    seen: dict[str, torch.Tensor] = {}
    for i, blk in enumerate(model.blocks):
        blk.mlp.fc2.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(f"fc2 {i}", args[0]))
        blk.attn.qkv.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(f"qkv {i}", args[0]))
    print(
        "| images | mean top-1 probability | "
        + " | ".join(f"block {b}: fc2 p99.9 / qkv max" for b in a.blocks)
        + " |"
    )
    print("|---|---|" + "---|" * len(a.blocks))
    for name, x in sets.items():
        with torch.no_grad():
            conf = model(x).softmax(-1).amax(-1).mean().item()
        cells = [f"{seen[f'fc2 {b}'].abs().flatten().quantile(0.999):.2f} / {seen[f'qkv {b}'].abs().max():.1f}"
                 for b in a.blocks]  # fmt: skip
        print(f"| {name} | {conf:.2f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
