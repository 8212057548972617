"""Scratch probe: 4-bit activation grids shifted inside the INT8 container (codes lo..lo+15, zero-point 0).

    nice bash tools/dev.sh python bench/dinov2_w4a4_shifted_grid.py sardfq mlp.fc2

Post-GELU inputs (fc2) are almost never below -0.17, so a symmetric 4-bit grid (-8..7) spends half its
codes on nothing. This re-chooses (lo, scale) of the named input quantizers of the table's ``w4a4``
model (seed 1) by MSE on their inputs over the 32 calibration images and prints top-1 on the first
1,000 test images before and after. Not in the product (docs/dinov2-accuracy.md says why).
"""

import json
import sys
import types

import torch

sys.path.insert(0, "bench")
from dinov2_table import logits_of, scores
from dinov2_w4a4_groups import w4a4_model

calib = sys.argv[1]
which = sys.argv[2].split(",")
_, x, y, cal, m, acts = w4a4_model(calib)
print("baseline", scores(logits_of(m, x), y), flush=True)
# inputs of the chosen quantizers in the quantized model, on the calibration images
got = {}
hooks = []
for n, qq in acts:
    if any(w in n for w in which):

        def h(mod, args, n=n):
            t = args[0].detach().flatten()
            g = torch.Generator().manual_seed(0)
            got.setdefault(n, []).append(
                t[torch.randint(len(t), (200_000,), generator=g)] if len(t) > 200_000 else t
            )

        hooks.append(qq.register_forward_pre_hook(h))
with torch.no_grad():
    for c in cal.images.split(8):
        m(c)
for hk in hooks:
    hk.remove()


def fq(x, s, lo):
    return torch.clamp(torch.round(x / s), lo, lo + 15) * s


chosen = {}
for n, parts in got.items():
    t = torch.cat(parts)
    qq = dict(acts)[n]
    base_s = float(qq.scale)
    base = float((fq(t, base_s, -8) - t).pow(2).mean())
    best = (base, base_s, -8)
    lo_v, hi_v = float(t.min()), float(t.max())
    for lo in range(-8, 1):
        for c in torch.linspace(0.05, 1.0, 60).tolist():
            # scale so that the top code reaches c·max (or bottom reaches c·min when lo·s binds)
            s = c * max(hi_v / (lo + 15), (lo_v / lo) if lo < 0 else 0)
            if s <= 0:
                continue
            e = float((fq(t, s, lo) - t).pow(2).mean())
            if e < best[0]:
                best = (e, s, lo)
    chosen[n] = best
    print(
        n,
        f"min {lo_v:.3g} max {hi_v:.3g}  symmetric s {base_s:.3g} mse {base:.3g} -> lo {best[2]} s {best[1]:.3g} mse {best[0]:.3g}",
        flush=True,
    )
    s_t = torch.tensor(best[1])
    lo = best[2]
    qq.fake_quant = types.MethodType(lambda self, x, s=s_t, lo=lo: fq(x, s, lo), qq)
print(json.dumps({"calib": calib, "shifted": which, "top1": scores(logits_of(m, x), y)}), flush=True)
