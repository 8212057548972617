"""Accuracy of any runner on real labelled data."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sardfq_export.data import LabelledDataset


def evaluate(
    runner: Callable[[torch.Tensor], torch.Tensor],
    dataset: LabelledDataset,
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "eval",
) -> dict:
    """Top-1 / top-5 of ``runner`` over ``dataset``; also returns the predictions (for agreement)."""
    from tqdm.auto import tqdm

    correct1 = correct5 = 0
    preds = []
    bar = tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress, leave=False)
    for images, labels in dataset.batches(batch_size):
        logits = runner(images)
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        correct1 += (topk[:, 0] == labels).sum().item()
        correct5 += (topk == labels[:, None]).any(1).sum().item()
        preds.append(topk[:, 0])
        bar.update(len(labels))
        bar.set_postfix(top1=f"{correct1 / max(bar.n, 1):.4f}")
    bar.close()
    n = len(dataset)
    return {
        "dataset": dataset.name,
        "n": n,
        "top1": correct1 / n,
        "top5": correct5 / n,
        "predictions": torch.cat(preds) if preds else torch.empty(0, dtype=torch.long),
    }
