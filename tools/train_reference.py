"""Train the embedded reference ViT on Fashion-MNIST (train split only) and write its model card.

    python tools/train_reference.py [--epochs 15] [--seed 0] [--out sardfq_export/assets]

Recipe: AdamW (lr 2e-3, wd 0.05) with a one-cycle schedule, label smoothing 0.1, bf16 autocast
on CPU, random horizontal flip and +-2 px shift. Test images are used once, at the end, for the
model card's number: nothing is selected on them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sardfq_export.data import find_fashion_mnist, load_raw  # noqa: E402
from sardfq_export.models.reference import ARCH, MEAN, STD, build_reference  # noqa: E402


def augment(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and integer shift (zero padding) per image; x is (B, 1, H, W)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None]
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "sardfq_export/assets")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    folder = find_fashion_mnist()
    train = load_raw(folder, "train")
    test = load_raw(folder, "test")
    mean, std = torch.tensor(MEAN).view(1, -1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1)

    def to_input(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)

    x_train, y_train = to_input(train.images), torch.from_numpy(train.labels)
    print(f"train-split mean/std: {x_train.mean():.4f}/{x_train.std():.4f} (model uses {MEAN}/{STD})")

    model = build_reference()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(y_train) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
    )
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=gen)
        loss_sum, correct = 0.0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
            x = (augment(x_train[idx], gen) - mean) / std
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
            correct += (logits.argmax(1) == y_train[idx]).sum().item()
            if step % 100 == 0:
                print(
                    f"epoch {epoch + 1} step {step}/{steps_per_epoch} loss {loss.item():.4f} "
                    f"{time.time() - t0:.0f}s",
                    flush=True,
                )
        n = steps_per_epoch * args.batch_size
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / steps_per_epoch:.4f} "
            f"train top-1 {correct / n:.4f} ({(time.time() - t0) / 60:.1f} min)",
            flush=True,
        )

    minutes = (time.time() - t0) / 60
    model.eval()
    correct = 0
    with torch.no_grad():
        x_test = (to_input(test.images) - mean) / std
        for s in range(0, len(x_test), 500):
            correct += (
                (model(x_test[s : s + 500]).argmax(1) == torch.from_numpy(test.labels[s : s + 500]))
                .sum()
                .item()
            )
    top1 = correct / len(test)
    print(f"test top-1 {top1:.4f} after {minutes:.1f} min")

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "arch": json.dumps(ARCH),
        "test_top1": f"{top1:.4f}",
        "seed": str(args.seed),
        "epochs": str(args.epochs),
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp = args.out / "reference_vit.safetensors.tmp"
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(args.out / "reference_vit.safetensors")
    nparams = sum(p.numel() for p in model.parameters())
    card = f"""# Reference model card: `reference` (DeiT-style ViT on Fashion-MNIST)

The embedded default model of sardfq-export (`--model` omitted). Written by
`tools/train_reference.py`; numbers below are from that run.

| field | value |
|---|---|
| architecture | timm `VisionTransformer`, {json.dumps(ARCH)} |
| parameters | {nparams:,} |
| input | 1x28x28, mean {MEAN[0]}, std {STD[0]} (Fashion-MNIST train split) |
| data | Fashion-MNIST train split only (60,000 images), Debian `dataset-fashion-mnist` |
| recipe | AdamW lr {args.lr} wd {args.weight_decay}, one-cycle (15% warm-up), batch {args.batch_size}, label smoothing 0.1, bf16 autocast, random flip + +-2 px shift |
| epochs / seed | {args.epochs} / {args.seed} |
| training time | {minutes:.1f} min on {args.threads} CPU threads |
| **test top-1** | **{top1 * 100:.2f}%** on the 10,000 real test images |

Reproduce: `python tools/train_reference.py --epochs {args.epochs} --seed {args.seed}`
Check: `sardfq-export eval --data fashion-mnist --json`
"""
    (args.out / "reference_vit.md").write_text(card)


if __name__ == "__main__":
    main()
