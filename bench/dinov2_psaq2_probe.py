"""Why PSAQ-ViT V2 collapses on DINOv2 (table cell `w8a8+c+bc psaq2`, seed 0: 35.3% fake-quant,
FP32 86.66%): is it the student's training (its float weights drift) or its quantization?

    nice bash tools/dev.sh python bench/dinov2_psaq2_probe.py [--row w8a8+c+bc] [--rounds 8] \
        [--student-lrs 0 1e-5] [--schedule K=V ...] [--limit 1000] [--log docs/dinov2-psaq2-probe.jsonl]

For each student learning rate (0: the images evolve against a student that never changes), one
``sx.psaq2`` run with the table's recipe row (bench/dinov2_table.py), then top-1 on the first
``--limit`` test images of: the student as deployed (fake-quant), the student with its quantizers
off (its float weights, after training), and the float model.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dinov2_probe import _commit, emit  # noqa: E402
from dinov2_table import EXPLICIT, MODEL, RECIPES, logits_of, scores, test_set  # noqa: E402

import sardfq_export as sx  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    from sardfq_export import calibrators

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", default="w8a8+c+bc", choices=sorted(RECIPES))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--student-lrs", type=float, nargs="+", default=[0.0, 1e-5])
    ap.add_argument(
        "--schedule",
        nargs="*",
        default=[],
        metavar="K=V",
        help="other AdaptiveConfig fields for every run (e.g. disc_weight=0.1)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--log", type=Path, help="append each result as a JSON line here too")
    a = ap.parse_args(argv)
    extra = {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in a.schedule)}
    loaded = sx.load_model(MODEL)
    x, y = test_set(loaded, a.limit)
    fp_top1 = scores(logits_of(loaded.model, x), y)
    for lr in a.student_lrs:
        t0 = time.perf_counter()
        adaptive = sx.AdaptiveConfig.from_dict({**extra, "rounds": a.rounds, "student_lr": lr})
        run = sx.psaq2(loaded, adaptive=adaptive, num_images=32, seed=a.seed, progress=True,
                       **{**EXPLICIT, **RECIPES[a.row]})  # fmt: skip
        student = run.quantized.model
        fq_top1 = scores(logits_of(student, x), y)
        calibrators.set_quantizers_enabled(student, False)
        float_top1 = scores(logits_of(student, x), y)
        row = {"row": a.row, "recipe": RECIPES[a.row], "schedule": adaptive.to_dict(), "seed": a.seed,
               "limit": len(y), "fp32_top1": fp_top1, "student_fakequant_top1": fq_top1,
               "student_float_top1": float_top1,
               # discrepancy at each round's first/last image and student step (image steps raise it)
               "rounds": run.quantized.summary["psaq2"]["rounds"], "seconds": round(time.perf_counter() - t0, 1),
               "commit": _commit()}  # fmt: skip
        emit(row, a.log)


if __name__ == "__main__":
    main()
