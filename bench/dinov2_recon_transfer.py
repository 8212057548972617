"""Does w4a4 block reconstruction on 32 synthetic images carry over to other images? (a probe;
numbers in docs/dinov2-accuracy.md)

    nice bash tools/dev.sh python bench/dinov2_recon_transfer.py --seed 0 --calibs sardfq/8g real \
        --log docs/dinov2-recon-transfer.jsonl

For each calibration source it quantizes DINOv2 with the headline's w4a4 recipe (``ROW``, without
fine-tuning) from that source's set of ``--seed``, then runs the block reconstruction the table's
``+c+recon`` row runs (``calibrators.reconstruct_blocks`` on the same images, the same seed and
precision; ``--drop``: QDrop's probability). Before and after, it measures every block's output error
against the float model, in the whole quantized model's forward (the earlier blocks' errors
included), relative to the float output's power, on three sets of images:

* ``calib``: the 32 images the model was fitted to;
* ``sibling``: 32 other images of the same source (its set of seed ``--seed + 1``);
* ``test``: the first ``--images`` real test images;

and fake-quant top-1 on the first ``--limit`` test images. Reconstruction that lowers the error on
its own images but not on siblings is fitting the 32 images; one that lowers it on siblings but not on
real test images is fitting the source.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dinov2_probe import _commit, model_cache  # noqa: E402
from dinov2_table import EXPLICIT, MODEL, RECIPES, calibration, logits_of, scores, test_set  # noqa: E402
from sardfq_export.calibrators import reconstruct_blocks  # noqa: E402
from sardfq_export.calibrators.instrument import block_names  # noqa: E402
from sardfq_export.calibrators.reconstruct import _capture  # noqa: E402

import sardfq_export as sx  # noqa: E402

ROW = "w4a4+v4+r+fp10-11+b64+ft.25+c"  # the model's w4a4 recipe; the table's +c+recon row adds recon
CALIB_CACHE = Path.home() / ".cache/sardfq-export/bench-dinov2-calib"


def block_outputs(model, names: list[str], x: torch.Tensor, batch: int = 32) -> dict[str, torch.Tensor]:
    """The named blocks' outputs for images ``x``, in chunks (reconstruction's own capture)."""
    parts = [_capture(model, names, c, "out") for c in x.split(batch)]
    return {n: torch.cat([p[n] for p in parts]).float() for n in names}


def block_errors(qmodel, ref: dict[str, dict[str, torch.Tensor]], images: dict[str, torch.Tensor]) -> dict:
    """Per image set: each block's MSE against the float output, over the float output's mean square."""
    names = list(next(iter(ref.values())))
    out = {}
    for key, x in images.items():
        q = block_outputs(qmodel, names, x)
        out[key] = [
            round(float((q[n] - ref[key][n]).pow(2).mean() / ref[key][n].pow(2).mean()), 6) for n in names
        ]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibs", nargs="+", default=["sardfq/8g", "real"])
    ap.add_argument("--limit", type=int, default=2000, help="test images for top-1")
    ap.add_argument("--images", type=int, default=128, help="test images for the block errors")
    ap.add_argument("--drop", type=float, default=0.0, help="QDrop's probability in the reconstruction")
    ap.add_argument("--log", type=Path)
    a = ap.parse_args(argv)
    recipe = {**EXPLICIT, **RECIPES[ROW]}
    commit = _commit()  # at the start: the code this process imported
    loaded = sx.load_model(MODEL)
    x, y = test_set(loaded, a.limit)
    calib_dir = model_cache(CALIB_CACHE, loaded)
    for calib in a.calibs:
        t0 = time.perf_counter()
        cal = calibration(loaded, calib, a.seed, 32, 100, calib_dir)
        sibling = calibration(loaded, calib, a.seed + 1, 32, 100, calib_dir)
        images = {"calib": cal.images, "sibling": sibling.images, "test": x[: a.images]}
        q = sx.quantize(loaded, cal, seed=a.seed, progress=False, **recipe)
        names = block_names(q.model)
        ref = {k: block_outputs(loaded.model, names, v) for k, v in images.items()}
        row = {"calib": calib, "seed": a.seed, "row": ROW, "drop": a.drop, "limit": a.limit, "images": a.images,
               "commit": commit, "blocks": names}  # fmt: skip
        row["before"] = block_errors(q.model, ref, images)
        row["top1_before"] = scores(logits_of(q.model, x), y)
        tuned = copy.deepcopy(q.model)
        rec = reconstruct_blocks(tuned, loaded.model, cal.images, seed=a.seed, progress=False,
                                 precision=q.config.precision, drop=a.drop)  # fmt: skip
        row["after"] = block_errors(tuned, ref, images)
        row["top1_after"] = scores(logits_of(tuned, x), y)
        row["recon_mse_after"] = [b["mse_after"] for b in rec["blocks"]]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        last = {k: (row["before"][k][-1], row["after"][k][-1]) for k in images}
        print(json.dumps({"calib": calib, "top1": (row["top1_before"], row["top1_after"]), "last_block": last}),
              flush=True)  # fmt: skip
        if a.log:
            with a.log.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
