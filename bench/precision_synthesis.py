"""bf16 vs fp32 synthesis: speed ratio and the quality of the calibration it gives (benchmark, not a test).

    bash tools/dev.sh python bench/precision_synthesis.py                       # the full table (hours on 2 CPU cores)
    bash tools/dev.sh python bench/precision_synthesis.py --iters 2 --seeds 0 \\
        --num-images 4 --eval-limit 200 --out /tmp/precision-smoke.json          # a smoke run (minutes)

For each model, seed and precision: SARDFQ synthesizes ``--num-images`` images for ``--iters``
iterations (``--precision`` autocast on ``--device``; seconds per iteration from the run's own wall
time), the set calibrates a ``--scheme`` fake-quant model (the product recipe, fp32), and the
result is scored on the Fashion-MNIST test set:

- ``reference``: the embedded reference ViT (28×28, 1 channel): fake-quant top-1 against the labels;
- ``vit_s14_112``: a random-init timm ``vit_small_patch14_dinov2`` at 112 px (65 tokens, 10
  classes; the shape of the DINOv2 benchmark model). Its labels mean nothing, so its "top-1" is
  the fake-quant model's top-1 agreement with its own FP32 predictions on the same test images;
  a random head often predicts one class for everything, so its relative logit error against FP32
  (``rel_logit_error``, on the first 256 test images; every model has it) is the sharper measure;
- ``dinov2_s14_fmnist``: the real DINOv2 ViT-S/14 benchmark model at 112 px, when built (top-1).

The question it answers (issue 12): may ``--precision`` default to bf16 where the hardware runs it
natively? Only if the calibration quality equals fp32's: the summary gives, per model, the mean
speed ratio fp32/bf16 and the mean ± spread of top-1 over the seeds for each precision. Writes
one JSON file (every row + the summary) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sardfq_export.validation.evaluate import evaluate  # noqa: E402
from sardfq_export.validation.fidelity import run_batches  # noqa: E402
from sardfq_export.validation.runners import TorchRunner  # noqa: E402

import sardfq_export as sx  # noqa: E402
from sardfq_export.core.device import resolve_device  # noqa: E402
from sardfq_export.data import load_dataset  # noqa: E402

LABELLED = {"reference": True, "vit_s14_112": False, "dinov2_s14_fmnist": True}


def load(name: str):
    if name == "reference":
        return sx.load_model()
    if name == "vit_s14_112":
        torch.manual_seed(0)
        # Random-init DINOv2 as timm makes it is degenerate: LayerScale starts at 1e-5, so every
        # image gives the same CLS feature, and the head starts at zero (all logits 0, nothing to
        # measure). So: no LayerScale (init_values=0: timm drops None) and a seeded random head (std 0.02).
        loaded = sx.load_model("vit_small_patch14_dinov2", pretrained=False, img_size=112, num_classes=10,
                               model_kwargs={"init_values": 0})  # fmt: skip
        torch.nn.init.normal_(loaded.model.head.weight, std=0.02, generator=torch.Generator().manual_seed(0))
        return loaded
    return sx.load_model(name)


def score(runner, dataset, labelled: bool, fp32_pred: torch.Tensor | None) -> tuple[float, torch.Tensor]:
    res = evaluate(runner, dataset, 64, progress=False)
    if labelled or fp32_pred is None:
        return res["top1"], res["predictions"]
    return float((res["predictions"] == fp32_pred).double().mean()), res["predictions"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="reference,vit_s14_112")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iters", type=int, default=None, help="default: the model's (reference 200) else 1000")
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--scheme", default="w4a8")
    ap.add_argument("--eval-limit", type=int, default=None, help="test images scored (default: all 10,000)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="docs/precision-synthesis.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    # Resumable (hours on 2 cores): every finished row is written at once, and a rerun with the
    # same settings skips the rows the file already holds.
    same = ("iters", "num_images", "scheme", "eval_limit", "device")
    rows, summary = [], {}
    if out.exists():
        old = json.loads(out.read_text())
        if all(old.get("args", {}).get(k) == getattr(args, k) for k in same):
            rows = old.get("rows", [])
            print(f"resuming: {len(rows)} row(s) already in {out}", flush=True)
    done = {(r["model"], r["seed"], r["precision"]) for r in rows}

    def write(summary):
        result = {"args": vars(args), "device": str(dev), "machine": platform.processor() or platform.machine(),
                  "torch": torch.__version__, "rows": rows, "summary": summary}  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)

    for name in args.models.split(","):
        loaded = load(name)
        data = load_dataset("fashion-mnist", loaded.data_config, limit=args.eval_limit)
        fp32_runner = TorchRunner(loaded.model, "fp32", str(dev))
        fp32_top1, fp32_pred = score(fp32_runner, data, True, None)
        probe, _ = data.take(range(min(len(data), 256)))
        fp32_logits = run_batches(fp32_runner, probe)
        loaded.model.cpu()
        for seed in seeds:
            for precision in ("fp32", "bf16"):
                if (name, seed, precision) in done:
                    continue
                t0 = time.perf_counter()
                cal = sx.synthesize(loaded, method="sardfq", num_images=args.num_images, iters=args.iters,
                                    seed=seed, precision=precision, device=dev, progress=False)  # fmt: skip
                synth_s = time.perf_counter() - t0
                q = sx.quantize(loaded, cal, scheme=args.scheme, seed=seed, device=dev, progress=False)
                runner = TorchRunner(q.model, "fakequant", str(dev))
                top1, _ = score(runner, data, LABELLED.get(name, True), fp32_pred)
                logits = run_batches(runner, probe)
                rel = float((logits - fp32_logits).pow(2).sum() / fp32_logits.pow(2).sum())
                q.model.cpu()
                iters = cal.meta.get("iters") or 1
                row = {"model": name, "seed": seed, "precision": precision, "iters": iters,
                       "num_images": len(cal), "s_per_iter": cal.meta["wall_time_s"] / iters,
                       "synth_wall_s": round(synth_s, 2), "top1": top1, "fp32_model_top1": fp32_top1,
                       "rel_logit_error": rel,
                       "metric": "top1" if LABELLED.get(name, True) else "agreement_with_fp32"}  # fmt: skip
                rows.append(row)
                write(summary)
                print(json.dumps(row), flush=True)
        by = {p: sorted((r for r in rows if r["model"] == name and r["precision"] == p and r["seed"] in seeds),
                        key=lambda r: r["seed"]) for p in ("fp32", "bf16")}  # fmt: skip
        ratios = [a["s_per_iter"] / b["s_per_iter"] for a, b in zip(by["fp32"], by["bf16"], strict=True)]
        stats = {p: {"mean": statistics.fmean(r["top1"] for r in rs),
                     "spread": max(r["top1"] for r in rs) - min(r["top1"] for r in rs),
                     "rel_logit_error": statistics.fmean(r["rel_logit_error"] for r in rs)}
                 for p, rs in by.items()}  # fmt: skip
        summary[name] = {"speed_ratio_fp32_over_bf16": statistics.fmean(ratios), "top1": stats,
                         "delta_bf16_minus_fp32": stats["bf16"]["mean"] - stats["fp32"]["mean"],
                         "metric": by["fp32"][0]["metric"], "seeds": seeds}  # fmt: skip
    write(summary)
    print(
        "\n| model | metric | speed fp32/bf16 | fp32 (mean, spread) | bf16 (mean, spread) | Δ bf16−fp32 "
        "| rel. logit error fp32 / bf16 |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        f, b = s["top1"]["fp32"], s["top1"]["bf16"]
        print(f"| {name} | {s['metric']} | {s['speed_ratio_fp32_over_bf16']:.2f}× | {f['mean'] * 100:.2f}% "
              f"({f['spread'] * 100:.2f}) | {b['mean'] * 100:.2f}% ({b['spread'] * 100:.2f}) | "
              f"{s['delta_bf16_minus_fp32'] * 100:+.2f} points | {f['rel_logit_error']:.4f} / "
              f"{b['rel_logit_error']:.4f} |")  # fmt: skip
    print(f"\nwrote {args.out} ({len(seeds)} seed(s), {args.num_images} images, device {dev})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
