"""Results table of calibrators: scheme x range method x fine-tuning -> top-1 on real test data.

    python bench/calibrators_table.py [--model M --checkpoint F] [--data fashion-mnist] [--num-images 32]
                                      [--out docs/calibrators-results.md]

Calibration = the first N images of the *train* split (real data); evaluation = the whole test split.
Writes a markdown table with the exact command that produced it.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMES = ("w8a8", "w4a16", "w4a8", "w4a4", "research_w4a4_log2")
RANGES = ("minmax", "percentile", "mse")
FINETUNES = ("none", "recon", "kd")


def grid(schemes, ranges, finetunes, full: bool, finetune_schemes=None):
    """Every scheme x range without fine-tuning; fine-tuning on the mse range (every range with --full).

    A fine-tuning entry may carry a learning rate: ``recon@1e-3`` (default: recon 4e-5, kd 1e-5).
    """
    for s in schemes:
        for r in ranges:
            for f in finetunes:
                if f == "none" or ((full or r == "mse") and (not finetune_schemes or s in finetune_schemes)):
                    yield s, r, f


@torch.inference_mode()
def top1(model, images, labels, batch_size=1000) -> float:
    correct = 0
    for s in range(0, len(images), batch_size):
        correct += (model(images[s : s + batch_size]).argmax(1) == labels[s : s + batch_size]).sum().item()
    return correct / len(images)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--ranges", default=",".join(RANGES))
    ap.add_argument("--finetunes", default=",".join(FINETUNES))
    ap.add_argument(
        "--full", action="store_true", help="fine-tune every scheme x range (default: mse + 4-bit)"
    )
    ap.add_argument("--finetune-schemes", default="", help="fine-tune only these schemes (default: all)")
    ap.add_argument("--weight-range", default="mse")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "docs/calibrators-results.md"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import sardfq_export as sx
    from sardfq_export.data import load_dataset

    loaded = sx.load_model(args.model, args.checkpoint, pretrained=True)
    cal, _ = sx.calibration_set(f"real:{args.data}", loaded, args.num_images, seed=args.seed)
    test = load_dataset(args.data, loaded.data_config, split="test", limit=args.limit)
    images, labels = test.take(range(len(test)))
    fp = top1(loaded.model, images, labels)
    print(f"float top-1 {fp * 100:.2f}% on {len(test)} test images", flush=True)
    rows = []
    t_all = time.perf_counter()
    finetune_schemes = [x for x in args.finetune_schemes.split(",") if x]
    for s, r, f in grid(
        args.schemes.split(","),
        args.ranges.split(","),
        args.finetunes.split(","),
        args.full,
        finetune_schemes,
    ):
        mode, _, lr = f.partition("@")  # "recon@1e-3": a learning rate other than the default
        q = sx.quantize(loaded, cal, scheme=s, range=r, weight_range=args.weight_range, finetune=mode,
                        lr=float(lr) if lr else None, seed=args.seed, progress=False)  # fmt: skip
        qmodel, summary = q.model, q.summary
        acc = top1(qmodel, images, labels)
        rows.append((s, r, f, acc, summary["seconds"]))
        print(f"{s:20s} {r:10s} {f:6s} top-1 {acc * 100:6.2f}%  drop {100 * (fp - acc):+6.2f}  "
              f"({summary['seconds']:.1f} s)", flush=True)  # fmt: skip
    minutes = (time.perf_counter() - t_all) / 60

    cmd = "python bench/calibrators_table.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    lines = [
        "# calibrators: scheme x range method x fine-tuning -> top-1",
        "",
        f"Model: `{loaded.name}` ({loaded.source}); float top-1 **{fp * 100:.2f}%** on {len(test)} real test images "
        f"of `{args.data}`. Calibration: {len(cal)} images of the *train* split (real data), shuffled by the seed. "
        f"Weights: {args.weight_range} per channel/block. Seed {args.seed}.",
        "",
        "Reproduce (one command, writes this file):",
        "",
        f"    {cmd}",
        "",
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads, {minutes:.1f} min in all. "
        "Fine-tuning: `recon` = block-wise reconstruction, SARDFQ stage-2 defaults (Adam 4e-5, cosine, "
        "100 it/block, batch 32); `kd` = end-to-end distillation to the float model (Adam 1e-5, 300 it); "
        "`X@LR` = the same with learning rate LR.",
        "",
        "| scheme | exportable | range | fine-tune | top-1 % | drop (points) | quantize s |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    from sardfq_export.calibrators import get_scheme

    for s, r, f, acc, sec in rows:
        lines.append(f"| {s} | {'yes' if get_scheme(s).exportable else 'no'} | {r} | {f} | {acc * 100:.2f} | "
                     f"{100 * (fp - acc):.2f} | {sec:.1f} |")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
