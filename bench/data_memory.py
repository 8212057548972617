"""Benchmark (not a test): evaluation memory is bounded by the batch, not the dataset.

    bash tools/dev.sh python bench/data_memory.py [--images 5000] [--limit 100] [--batch-size 256]
                                                  [--workers N] [--model NAME] [--dir DIR]

Writes an ImageNet-style folder of ``--images`` random 375×500 JPEGs (10 classes; smooth random
content, so they are cheap to write and small on disk) in a temporary folder (or ``--dir``, kept),
then evaluates a model on it twice, each in a fresh process: with ``--limit`` and on every image.
Prints each run's peak RSS (``wait4``'s ru_maxrss of that process and the DataLoader workers it
waited for: the largest one) and the difference; the target is < 300 MB.

The default model is a random-init ViT at 224×224 (patch 32, depth 2, width 64: 50 tokens) through
``sardfq_export.data`` + ``validation.evaluate``: the product's data path with a model whose
activations are small, so the figures measure the data. ``--patch 16`` (197 tokens) adds ~1 MB
of activations per image of the batch (so a batch of 256 vs the limited run's single batch of 100
differs by that too: compare with ``--batch-size 100`` for the data alone); ``--model NAME`` runs
``sardfq-export eval --model NAME --random-init`` instead (the whole CLI, slower).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_folder(root: Path, n: int, classes: int = 10, seed: int = 0) -> None:
    """``n`` random 375×500 RGB JPEGs spread over ``classes`` sub-folders (skipped if present)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        path = root / f"class_{i % classes:02d}" / f"{i:06d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.BILINEAR).save(path, quality=85)


def child(folder: str, limit: int | None, batch_size: int, workers: int | None, patch: int) -> None:
    """One evaluation (runs in its own process): prints a JSON line."""
    import timm
    import torch
    from sardfq_export.validation.evaluate import evaluate
    from timm.data import resolve_data_config

    from sardfq_export.data import load_dataset

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, patch_size=patch, depth=2, embed_dim=64, num_heads=2,
        num_classes=10,
    ).eval()  # fmt: skip
    start = time.perf_counter()
    ds = load_dataset(folder, resolve_data_config(model=model), split="test", limit=limit)
    with torch.inference_mode():
        res = evaluate(model, ds, batch_size, progress=False, num_workers=workers)
    print(json.dumps({"n": res["n"], "top1": res["top1"], "seconds": round(time.perf_counter() - start, 1)}))


def measure(cmd: list[str]) -> tuple[float, str, float]:
    """Run ``cmd``; (peak RSS in MB of it and its waited-for children, its stdout, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return usage.ru_maxrss / 1024.0, out.strip().splitlines()[-1], time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the dataset's)")
    ap.add_argument("--patch", type=int, default=32, help="patch size of the default model (16 or 32)")
    ap.add_argument("--model", default=None, help="run `sardfq-export eval --model NAME --random-init`")
    ap.add_argument("--dir", type=Path, default=None, help="keep the generated folder here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-limit", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.child_limit, args.batch_size, args.workers, args.patch)
        return 0

    with tempfile.TemporaryDirectory(prefix="data-memory-") as tmp:
        folder = args.dir or Path(tmp) / "images"
        t0 = time.perf_counter()
        make_folder(folder, args.images)
        mb = sum(f.stat().st_size for f in folder.rglob("*.jpg")) / 2**20
        print(
            f"{args.images} JPEGs 375x500 in {folder} ({mb:.0f} MB on disk, {time.perf_counter() - t0:.0f} s)"
        )
        rows = []
        for limit in (args.limit, None):
            if args.model:
                cmd = [sys.executable, "-m", "sardfq_export", "eval", "--model", args.model, "--random-init",
                       "--data", str(folder), "--batch-size", str(args.batch_size), "--json", "--quiet"]  # fmt: skip
                cmd += ["--limit", str(limit)] if limit else []
            else:
                cmd = [sys.executable, __file__, "--child", str(folder), "--batch-size", str(args.batch_size),
                       "--patch", str(args.patch)]  # fmt: skip
                cmd += ["--child-limit", str(limit)] if limit else []
                cmd += ["--workers", str(args.workers)] if args.workers is not None else []
            rss, out, wall = measure(cmd)
            n = json.loads(out)["n"]
            rows.append(rss)
            print(f"limit={limit or 'none':>5}  n={n:>5}  peak RSS {rss:7.0f} MB  wall {wall:5.1f} s")
        diff = rows[1] - rows[0]
        print(
            f"peak RSS difference (all - limit): {diff:.0f} MB (target < 300 MB): {'OK' if diff < 300 else 'FAIL'}"
        )
    return 0 if diff < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
