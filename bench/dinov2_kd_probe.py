"""Is it the student's step size or PSAQ-ViT V2's images that breaks DINOv2's student? End-to-end
distillation of the table's quantized model on its own *SARDFQ* calibration set (no adversarial images):

    nice bash tools/dev.sh python bench/dinov2_kd_probe.py [--lrs 1e-5 1e-6] [--steps 40] [--limit 1000] \
        [--row w4a8+awq] [--calib sardfq|psaq|real|sardfq/8g|…] [--augment --batch 32] [--log docs/dinov2-kd-probe.jsonl]

For each learning rate: ``--steps`` full-batch Adam steps (cosine to 0, as V2's student phases take them)
on KL(teacher ‖ student) over the 32 images of ``sardfq-n32-s<seed>-it100`` (the table's set, synthesized
and cached by ``bench/dinov2_table.py``), on a fresh copy of the table's ``--row`` model; then the KL on
those images, the largest weight change, and top-1 on the first ``--limit`` test images of the student
(fake-quant) and of its float weights. 40 steps = V2's student steps in 8 rounds of one batch.

``--augment``: each step distils on ``--batch`` fresh random crop views of the set instead (the product's
``calibrators.distill(augment=True)``, ``--kd-views``), so 32 images stand for many more: does the student
then learn what the quantized weights got wrong, rather than the 32 images it was calibrated on? Both
paths run the product's ``calibrators.distill`` on the bare images (no soft targets), batch 32 = the
full set without ``--augment``. ``kl_views_*``: the KL on 64 held-out crop views. ``--float-lr``: the 1-D float parameters (biases,
LayerNorm affines, LayerScale gammas) train too, at their own learning rate.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from dinov2_probe import _commit, emit, model_cache  # noqa: E402
from dinov2_table import EXPLICIT, GRIDS, MODEL, PROBE_SETS, RECIPES, calibration, logits_of, scores, test_set  # noqa: E402

import sardfq_export as sx  # noqa: E402


def kl(student, images, teacher_logits) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student(images).float(), -1), F.log_softmax(teacher_logits, -1),
                    reduction="batchmean", log_target=True)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from sardfq_export.calibrators.gptq import crop_views
    from sardfq_export.calibrators.reconstruct import _trainable

    from sardfq_export import calibrators

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", default="w8a8+c+bc", choices=sorted(RECIPES))
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-6])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib", default="sardfq", choices=["sardfq", "psaq", "real", *GRIDS, *PROBE_SETS])
    ap.add_argument("--augment", action="store_true", help="distil on fresh random views each step")
    ap.add_argument(
        "--batch", type=int, default=32, help="images (or views, with --augment) per step; 32 = the whole set"
    )
    ap.add_argument(
        "--float-lr", type=float, help="also train the 1-D float parameters at this lr (distill's float_lr)"
    )
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument(
        "--calib-cache", type=Path, default=Path.home() / ".cache/sardfq-export/bench-dinov2-calib"
    )
    ap.add_argument("--log", type=Path, help="append each result as a JSON line here too")
    a = ap.parse_args(argv)
    loaded = sx.load_model(MODEL)
    x, y = test_set(loaded, a.limit)
    cal = calibration(loaded, a.calib, a.seed, 32, 100, model_cache(a.calib_cache, loaded))
    q = sx.quantize(loaded, cal, seed=a.seed, progress=False, **{**EXPLICIT, **RECIPES[a.row]})
    with torch.no_grad():
        teacher = loaded.model(cal.images).float()
        kl_before = float(kl(q.model, cal.images, teacher))
        # held-out views (a generator of their own): does what the student learns carry beyond its batches?
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10_000 + a.seed)
            held = crop_views(cal.images.repeat(2, 1, 1, 1))
        held_teacher = loaded.model(held).float()
        held_before = float(kl(q.model, held, held_teacher))
    base = {"row": a.row, "calib": a.calib, "augment": a.augment, "batch": a.batch,
            "seed": a.seed, "limit": len(y), "steps": a.steps, "float_lr": a.float_lr,
            "fp32_top1": scores(logits_of(loaded.model, x), y), "quantized_top1": scores(logits_of(q.model, x), y),
            "kl_before": kl_before, "kl_views_before": held_before}  # fmt: skip
    for lr in a.lrs:
        t0 = time.perf_counter()
        student = copy.deepcopy(q.model)
        params = [p for _, p in _trainable(student)]
        anchors = [p.detach().clone() for p in params]
        calibrators.distill(student, loaded.model, cal.images, iters=a.steps, lr=lr, batch_size=a.batch,
                            seed=a.seed, progress=False, augment=a.augment, float_lr=a.float_lr)  # fmt: skip
        with torch.no_grad():
            kl_after = float(kl(student, cal.images, teacher))
            held_after = float(kl(student, held, held_teacher))
            change = max(float((p - p0).abs().max()) for p, p0 in zip(params, anchors, strict=True))
        fq = scores(logits_of(student, x), y)
        calibrators.set_quantizers_enabled(student, False)
        row = {**base, "lr": lr, "kl_after": kl_after, "kl_views_after": held_after, "max_abs_weight_change": change, "student_fakequant_top1": fq,
               "student_float_top1": scores(logits_of(student, x), y),
               "seconds": round(time.perf_counter() - t0, 1), "commit": _commit()}  # fmt: skip
        emit(row, a.log)


if __name__ == "__main__":
    main()
