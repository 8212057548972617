"""Where the w8a8 error of the DINOv2 benchmark model comes from, and whether ONNX Runtime's
disagreement with the fake-quant model is rounding-boundary noise.

    bash tools/dev.sh python bench/dinov2_error_budget.py --calib real --limit 2000 [--smoothquant 0.8 --smooth-fc2]

Quantizes once (the product's recipe with the given options), then measures on the first --limit
test images how often the fake-quant model agrees with FP32 top-1 when only a group of its
quantizers is on (weights only, activations only, the input of each Linear role alone), and the
*internal* noise floor: the fake-quant model against itself when every activation quantizer's input
is multiplied by (1 + 1e-6·ε), ε ~ N(0, 1) — the size of a float runtime's rounding differences in
every layer at once, not only at the input. One JSON line per run (--log appends).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dinov2_probe import _commit, emit, setup, top1  # noqa: E402

import sardfq_export as sx  # noqa: E402

ROLES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def quantizers(qmodel):
    """(owning module's name, 'input'|'weight', quantizer) of every active TensorQuantizer (at w8a8:
    the input and weight of each block Linear; other schemes add attention/residual/patch ones)."""
    from sardfq_export.calibrators.quantizer import TensorQuantizer

    out = []
    for name, m in qmodel.named_modules():
        if isinstance(m, TensorQuantizer) and m.active:
            owner = name.rsplit(".", 1)[0]
            out.append((owner, "weight" if m.role == "weight" else "input", m))
    return out


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2_s14_fmnist")
    ap.add_argument("--calib", default="real", choices=["noise", "real", "sardfq", "psaq"])
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scheme", default="w8a8")
    ap.add_argument(
        "--smoothquant", type=float, default=0.0, help="0: off (stated: the model may default it on)"
    )
    ap.add_argument("--smooth-fc2", action="store_true")
    ap.add_argument("--keep-fp", nargs="*", default=[])
    ap.add_argument("--gptq-views", type=int, default=None, help="None: the model's default")
    ap.add_argument(
        "--bias-correct", action=argparse.BooleanOptionalAction, default=None,
        help="None: the model's default; --no-bias-correct for --weight-groups (a corrected bias "
        "belongs to the whole quantized model, so a group's row would carry every layer's correction)",
    )  # fmt: skip
    ap.add_argument(
        "--weight-groups", action="store_true",
        help="also each Linear role's and each block's weights alone (the others float): where 4-bit weights lose",
    )  # fmt: skip
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/sardfq-export/bench-calib")
    ap.add_argument("--log", type=Path)
    a = ap.parse_args(argv)
    commit = _commit()

    p = setup(a.model, a.calib, a.num_images, a.seed, a.cache, a.iters, a.limit)
    loaded, x, y, cal, fp_top1, fp = p.loaded, p.x, p.y, p.cal, p.fp32_top1, p.fp32_logits
    q = sx.quantize(loaded, cal, scheme=a.scheme, seed=a.seed, smoothquant=a.smoothquant,
                    smooth_fc2=a.smooth_fc2, keep_fp=tuple(a.keep_fp), gptq_views=a.gptq_views,
                    bias_correct=a.bias_correct, progress=False)  # fmt: skip
    qs = quantizers(q.model)
    # GPTQ writes its rounded weights back as floats, so a weight quantizer switched off must also
    # get the float model's weight back (and the rounded one when switched on again).
    fp_modules = dict(loaded.model.named_modules())
    q_modules = dict(q.model.named_modules())
    rounded = {n: q_modules[n].weight.detach().clone() for n, k, _ in qs if k == "weight"}
    original = {n: fp_modules[n].weight.detach().clone() for n in rounded}
    t0 = time.perf_counter()
    full_top1, full = top1(q.model, x, y)

    def only(pred) -> dict:
        for name, kind, tq in qs:
            tq.enabled = pred(name, kind)
            if kind == "weight":
                q_modules[name].weight.data.copy_(rounded[name] if tq.enabled else original[name])
        try:
            t1, z = top1(q.model, x, y)
        finally:
            for name, kind, tq in qs:
                tq.enabled = True
                if kind == "weight":
                    q_modules[name].weight.data.copy_(rounded[name])
        return {"top1": t1, "agreement_vs_fp32": agreement(z, fp)}

    groups = {
        "all": {"top1": full_top1, "agreement_vs_fp32": agreement(full, fp)},
        "weights only": only(lambda n, k: k == "weight"),
        "activations only": only(lambda n, k: k == "input"),
    }
    for role in ROLES:
        groups[f"{role} input only"] = only(lambda n, k, r=role: k == "input" and n.endswith(r))
    if a.weight_groups:
        for role in ROLES:
            groups[f"{role} weights only"] = only(lambda n, k, r=role: k == "weight" and n.endswith(r))
        for b in range(len(loaded.model.blocks)):
            groups[f"blocks.{b} weights only"] = only(
                lambda n, k, p=f"blocks.{b}.": k == "weight" and n.startswith(p)
            )

    # Internal noise floor: a relative 1e-6 perturbation of every activation quantizer's input (the
    # product's own context, as the report measures it; seed + 1 is what the published rows used).
    from sardfq_export.calibrators.quantizer import perturbed_activations

    with perturbed_activations(q.model, rel=1e-6, seed=a.seed + 1):
        _, perturbed = top1(q.model, x, y)
    row = {
        "model": a.model, "calib": a.calib, "num_images": a.num_images, "iters": a.iters, "seed": a.seed,
        "scheme": a.scheme, "gptq_views": a.gptq_views, "bias_correct": a.bias_correct, "smoothquant": a.smoothquant, "smooth_fc2": a.smooth_fc2, "keep_fp": a.keep_fp,
        "limit": a.limit, "fp32_top1": fp_top1, "groups": groups,
        "internal_noise_floor": agreement(perturbed, full),
        "seconds": round(time.perf_counter() - t0, 1), "commit": commit,
    }  # fmt: skip
    emit(row, a.log)
    for name, g in groups.items():
        print(
            f"  {name:24s} top-1 {100 * g['top1']:.2f}  agreement vs FP32 {100 * g['agreement_vs_fp32']:.2f}%"
        )
    print(
        f"  internal noise floor (1e-6 relative at every activation quantizer): {100 * row['internal_noise_floor']:.2f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
