"""Probe: channel shifting (Outlier Suppression+ style) before w8a8 on the DINOv2 benchmark model.

    bash tools/dev.sh python bench/dinov2_shift_probe.py --calib sardfq --where fc2 --log docs/dinov2-shift-probe.jsonl

Why: INT8 activations in TensorRT are symmetric per tensor. A Linear input whose channels are not
centred on zero wastes part of that range: the post-GELU input of ``mlp.fc2`` lies in [-0.17, max],
so symmetric INT8 spends half its levels on values that never occur. Shifting each input channel by
its centre z_j = (max_j + min_j) / 2 and adding ``W z`` to the Linear's bias keeps the float
function and halves the widest channel's range. Where the shift can go without a runtime op:

- ``ln``: the inputs of ``attn.qkv`` and ``mlp.fc1`` are LayerNorm outputs: β ← β − z;
- ``v``: the input of ``attn.proj`` is softmax·V, whose rows sum to 1: V's bias ← bias − z;
- ``fc2``: GELU is in between, so the shift is an explicit per-channel subtraction after it
  (a pointwise op TensorRT fuses into the GELU kernel; not exported by the product yet).

The shifts come from the calibration images (the float model's per-channel min/max); the model is
then quantized by the product's own ``sx.quantize`` (w8a8, min-max). One JSON line per run: fake-quant
top-1 and agreement with FP32 on the first --limit test images, the activation noise floor, and the
float model's change from the surgery (it must be rounding-level).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
from dinov2_probe import _commit, emit, setup, top1  # noqa: E402
from sardfq_export.calibrators.centre import input_channel_ranges  # noqa: E402

import sardfq_export as sx  # noqa: E402
from sardfq_export.api import MODEL_RECIPE_FIELDS  # noqa: E402

WHERE = ("ln", "v", "fc2")


class Shift(nn.Module):
    """x − z per channel (last dim): the explicit shift after an op nothing can absorb it into."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.register_buffer("z", z.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.z


@torch.no_grad()
def shifted_copy(model: nn.Module, images: torch.Tensor, where: set[str]) -> tuple[nn.Module, dict]:
    """A float-equivalent copy of ``model`` with the inputs of the chosen Linears centred."""
    m = copy.deepcopy(model)
    targets = {}
    for i, blk in enumerate(m.blocks):
        targets |= {f"{i}.qkv": blk.attn.qkv, f"{i}.fc1": blk.mlp.fc1, f"{i}.proj": blk.attn.proj,
                    f"{i}.fc2": blk.mlp.fc2}  # fmt: skip
    ranges = input_channel_ranges(targets, lambda: [m(b) for b in images.split(32)])
    width = {}
    for i, blk in enumerate(m.blocks):

        def centre(key, i=i):
            lo, hi = ranges[f"{i}.{key}"]
            width[f"{i}.{key}"] = (
                float(torch.maximum(lo.abs(), hi.abs()).max()),
                float(((hi - lo) / 2).max()),
            )
            return (hi + lo) / 2

        if "ln" in where:
            for norm, lin, key in ((blk.norm1, blk.attn.qkv, "qkv"), (blk.norm2, blk.mlp.fc1, "fc1")):
                z = centre(key)
                norm.bias -= z
                lin.bias += lin.weight @ z
        if "v" in where:
            z, c = centre("proj"), blk.attn.proj.in_features
            blk.attn.qkv.bias[2 * c :] -= z
            blk.attn.proj.bias += blk.attn.proj.weight @ z
        if "fc2" in where:
            z = centre("fc2")
            blk.mlp.act = nn.Sequential(blk.mlp.act, Shift(z))
            blk.mlp.fc2.bias += blk.mlp.fc2.weight @ z
    return m, width


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", default="sardfq", choices=["real", "sardfq", "psaq", "noise"])
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--where", default="fc2", help=f"comma list of {WHERE}, or 'none' / 'all'")
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/sardfq-export/bench-calib")
    ap.add_argument("--log", type=Path)
    a = ap.parse_args(argv)
    where = set(WHERE) if a.where == "all" else set() if a.where == "none" else set(a.where.split(","))
    if not where <= set(WHERE):
        ap.error(f"--where: use a comma list of {WHERE}, 'all' or 'none'")
    commit = _commit()

    from sardfq_export.calibrators import instrument
    from sardfq_export.calibrators.quantizer import perturbed_activations

    # The explicit shift stays float before fc2's input quantizer, as a pointwise op fused into
    # the GELU would; the instrumenter refuses unknown modules, so this probe names it as safe.
    instrument.SAFE_LEAVES = (*instrument.SAFE_LEAVES, Shift)

    p = setup("dinov2_s14_fmnist", a.calib, a.num_images, a.seed, a.cache, a.iters, a.limit)
    loaded, x, y, cal, fp_top1, fp = p.loaded, p.x, p.y, p.cal, p.fp32_top1, p.fp32_logits
    t0 = time.perf_counter()
    model, width = shifted_copy(loaded.model, cal.images, where)
    with torch.inference_mode():  # the surgery keeps the float function (rounding aside)
        surgery = float((model(x[:64]) - fp[:64]).abs().max())
    # the plain w8a8 recipe it was measured with: the model's own switches (centring, correction,
    # SmoothQuant: defaults since) stated off, so the shift alone is what differs
    plain = dict(MODEL_RECIPE_FIELDS)
    q = sx.quantize(replace(loaded, model=model), cal, scheme="w8a8", seed=a.seed, progress=False, **plain)
    fq_top1, fq = top1(q.model, x, y)
    with perturbed_activations(q.model):
        _, noisy = top1(q.model, x, y)
    key = {"ln": ("qkv", "fc1"), "v": ("proj",), "fc2": ("fc2",)}
    shrink = {k: round(sum(width[f"{i}.{r}"][1] / width[f"{i}.{r}"][0] for i in range(12)) / 12, 3)
              for k in where for r in key[k][:1]}  # fmt: skip
    row = {
        "model": loaded.name, "calib": a.calib, "num_images": a.num_images, "iters": a.iters, "seed": a.seed,
        "scheme": "w8a8", "where": sorted(where), "limit": a.limit, "fp32_top1": fp_top1, "fakequant_top1": fq_top1,
        "drop_points": round(100 * (fp_top1 - fq_top1), 2),
        "agreement_vs_fp32": float((fq.argmax(1) == fp.argmax(1)).float().mean()),
        "activation_noise_floor": float((noisy.argmax(1) == fq.argmax(1)).float().mean()),
        "mean_range_ratio_after_shift": shrink, "float_surgery_max_abs_logit_change": surgery,
        "seconds": round(time.perf_counter() - t0, 1), "commit": commit,
    }  # fmt: skip
    emit(row, a.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
