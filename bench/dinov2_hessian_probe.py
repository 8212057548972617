"""Probe: does GPTQ's rounding from a calibration set carry over to real inputs? (DINOv2, 4-bit weights)

    nice bash tools/dev.sh python bench/dinov2_hessian_probe.py --sets sardfq psaq real --seeds 1 2

Why: at 4-bit weights the table's PSAQ-ViT images calibrate GPTQ better than SARDFQ's on every
seed (w4a8+c+bc: 76.03 ± 3.03% vs 66.52 ± 2.38%), and 32 real images better than both. GPTQ
minimizes ``tr((W−Q) H (W−Q)ᵀ)`` with ``H = Σ x xᵀ`` of the calibration tokens at a Linear's input;
what the deployed model pays is the same error under the *real* inputs' ``H``. This probe measures,
per Linear, how much of round-to-nearest's output error on real inputs is left after GPTQ rounded
on a given set:

    transfer(set) = tr(ΔW_set H_real ΔW_setᵀ) / tr(ΔW_nearest H_real ΔW_nearestᵀ)

(below 1: GPTQ on that set helps real inputs; the oracle rounds on ``H_real`` itself). ``H_real``
comes from ``--truth`` real Fashion-MNIST *train* images that no real calibration set of the given
seeds holds. Inputs are the float model's (the data's effect alone: no earlier rounding, no input
quantizer), the weight grid is the scheme's (per-channel MSE ranges, as the product's), GPTQ is the
product's (``calibrators.gptq.gptq_round``, act-order, dampening 0.01). Sets are the table's
(``bench/dinov2_table.calibration``: its cached sets, synthesized when missing; ``A+B`` for the
union of two sets' Hessians). One JSON line per set and seed on stdout, appended to ``--log``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dinov2_probe import (
    _commit,  # noqa: E402
    model_cache,  # noqa: E402
)
from dinov2_table import calibration  # noqa: E402
from sardfq_export.calibrators.calibrate import calibrate_weight  # noqa: E402
from sardfq_export.calibrators.gptq import _output_error as error  # noqa: E402  (tr(ΔW H ΔWᵀ))
from sardfq_export.calibrators.gptq import gptq_round  # noqa: E402
from sardfq_export.calibrators.modules import QuantLinear  # noqa: E402

import sardfq_export as sx  # noqa: E402
from sardfq_export import calibrators  # noqa: E402

MODEL = "dinov2_s14_fmnist"


def real_images(loaded, n: int, seed: int, exclude_seeds: list[int], calib_n: int) -> torch.Tensor:
    """``n`` real train images none of the real calibration sets of ``exclude_seeds`` holds
    (those take the first ``calib_n`` of a permutation seeded by their seed; sources.real_calibration)."""
    from sardfq_export.data import load_dataset

    ds = load_dataset("fashion-mnist", loaded.data_config, split="train")
    taken = set()
    for s in exclude_seeds:
        taken |= set(torch.randperm(len(ds), generator=torch.Generator().manual_seed(s))[:calib_n].tolist())
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    idx = [i for i in order if i not in taken][:n]
    return ds.take(torch.tensor(idx).numpy())[0]


@torch.no_grad()
def hessians(model, names: list[str], images: torch.Tensor, batch: int = 32) -> dict[str, torch.Tensor]:
    """Σ x xᵀ (float64) of every named Linear's input in the float model, over all tokens,
    divided by the token count (so sets of different sizes compare). All layers in one pass of the
    float model; ``calibrators.gptq._input_hessian`` takes one layer of the quantized model at a time."""
    mods = dict(model.named_modules())
    out = {n: torch.zeros(mods[n].in_features, mods[n].in_features, dtype=torch.float64) for n in names}
    count = [0]

    def hook(name):
        def fn(m, args):
            x = args[0].detach().double().reshape(-1, m.in_features)
            out[name].addmm_(x.T, x)
            if name == names[0]:
                count[0] += x.shape[0]

        return fn

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for i in range(0, len(images), batch):
            model(images[i : i + batch])
    finally:
        for h in handles:
            h.remove()
    return {n: h / count[0] for n, h in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["sardfq", "psaq", "real"],
                    help="sets (sardfq, psaq, real, noise, the table's sardfq/4, sardfq/8 and its PROBE_SETS); A+B: both sets' Hessians summed")  # fmt: skip
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scheme", default="w4a8")
    ap.add_argument("--truth", type=int, default=512, help="real train images for H_real")
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument(
        "--calib-cache", type=Path, default=Path.home() / ".cache/sardfq-export/bench-dinov2-calib"
    )
    ap.add_argument("--shrink", type=float, nargs="+", default=[0.0],
                    help="GPTQ on (1-λ)·H + λ·diag(H): λ 0 is the product's GPTQ, 1 ignores the set's correlations")  # fmt: skip
    ap.add_argument("--log", type=Path, help="append the JSON lines here")
    a = ap.parse_args(argv)

    loaded = sx.load_model(MODEL)
    calib_dir = model_cache(a.calib_cache, loaded)
    model = loaded.model.eval()
    qmodel = calibrators.quantize_model(model, calibrators.get_scheme(a.scheme))
    layers = [
        (n, m) for n, m in qmodel.named_modules() if isinstance(m, QuantLinear) and m.weight_quantizer.enabled
    ]
    names = [n for n, _ in layers]
    for _, lin in layers:  # the product's weight grid: per-channel MSE ranges, data-free
        calibrate_weight(lin.weight_quantizer, lin.weight, "mse")
    truth = real_images(loaded, a.truth, 12345, a.seeds, a.num_images)
    h_real = hessians(model, names, truth)
    nearest = {n: lin.weight_quantizer.fake_quant(lin.weight).double() for n, lin in layers}
    base = {n: error(lin.weight, nearest[n], h_real[n]) for n, lin in layers}
    oracle = {n: error(lin.weight, gptq_round(lin.weight, h_real[n], lin.weight_quantizer), h_real[n]) / base[n]
              for n, lin in layers}  # fmt: skip
    commit = _commit()
    for tag in a.sets:
        for seed in a.seeds:
            # the table's sets (its cache; synthesized there when missing)
            parts = [
                calibration(loaded, t, seed, a.num_images, a.iters, calib_dir).images for t in tag.split("+")
            ]
            # each set's two halves apart (images 0..n/2-1, n/2..): the held-out check GPTQ could
            # make without data, rounding on one half and scoring on the other
            halves = [
                (hessians(model, names, p[: len(p) // 2]), hessians(model, names, p[len(p) // 2 :]))
                for p in parts
            ]
            for lam in a.shrink:
                report(a, tag, seed, lam, halves, layers, nearest, base, oracle, h_real, model, commit)
    return 0


def report(a, tag, seed, lam, halves, layers, nearest, base, oracle, h_real, model, commit) -> None:
    """One JSON line: the transfer of GPTQ rounded on the set's (shrunk) Hessian, per layer and summed
    up; "heldout": GPTQ rounded on one half of the set, scored on the other (both ways, averaged)."""

    def shrunk(h):
        return (1 - lam) * h + lam * torch.diag(torch.diag(h))

    def ratio(w, rounded, near, h):
        b = error(w, near, h)
        return error(w, rounded, h) / b if b > 0 else 1.0

    per_layer = {}
    for n, lin in layers:
        ha, hb = sum(x[0][n] for x in halves), sum(x[1][n] for x in halves)
        h = shrunk(ha + hb)
        rounded = gptq_round(lin.weight, h, lin.weight_quantizer)
        heldout = [
            ratio(lin.weight, gptq_round(lin.weight, shrunk(fit), lin.weight_quantizer), nearest[n], score)
            for fit, score in ((ha, hb), (hb, ha))
        ]
        per_layer[n] = {
            "transfer": error(lin.weight, rounded, h_real[n]) / base[n],
            "own": ratio(lin.weight, rounded, nearest[n], h),
            "heldout": sum(heldout) / 2,
            "oracle": oracle[n],
        }
    roles = {}
    for role in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        vals = [v["transfer"] for n, v in per_layer.items() if n.endswith(role)]
        roles[role] = sum(vals) / len(vals)
    row = {
        "set": tag,
        "seed": seed,
        "shrink": lam,
        "scheme": a.scheme,
        "truth_images": a.truth,
        "mean_transfer": sum(v["transfer"] for v in per_layer.values()) / len(per_layer),
        "mean_own": sum(v["own"] for v in per_layer.values()) / len(per_layer),
        "mean_heldout": sum(v["heldout"] for v in per_layer.values()) / len(per_layer),
        "mean_oracle": sum(oracle.values()) / len(oracle),
        "by_role": roles,
        "by_block": [
            sum(v["transfer"] for n, v in per_layer.items() if n.startswith(f"blocks.{b}.")) / 4
            for b in range(len(model.blocks))
        ],
        "layers": per_layer,
        "commit": commit,
    }
    line = json.dumps(row)
    print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
    if a.log:
        with a.log.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
