"""Accuracy of any runner on real labelled data, streamed through the dataset's DataLoader."""

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
    *,
    num_workers: int | None = None,
    limit: int | None = None,
) -> dict:
    """Top-1 / top-5 of ``runner`` over ``dataset``; also returns the predictions (for agreement).

    Images are decoded batch by batch (``num_workers`` processes, default: the dataset's choice);
    ``limit`` evaluates only that many images (``LabelledDataset.limited``'s rule)."""
    from sardfq_export.core.progress import progress_bar

    dataset = dataset.limited(limit)
    n = len(dataset)
    # Results go into buffers allocated once, on the runner's device: no host sync per batch, and
    # no small tensor kept per batch (kept between the forwards' large freed blocks, those pin
    # glibc's heap, and the process grows batch after batch).
    predictions, correct, done = None, None, 0
    bar = progress_bar(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    for images, labels in dataset.loader(batch_size, num_workers):
        logits = runner(images)
        if predictions is None:
            predictions = torch.empty(n, dtype=torch.long, device=logits.device)
            correct = torch.zeros(2, dtype=torch.long, device=logits.device)
        labels = labels.to(logits.device)
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        predictions[done : done + len(labels)] = topk[:, 0]
        correct[0] += (topk[:, 0] == labels).sum()
        correct[1] += (topk == labels[:, None]).any(1).sum()
        done += len(labels)
        if progress:
            bar.update(len(labels))
            bar.set_postfix(top1=f"{int(correct[0]) / max(done, 1):.4f}")
    bar.close()
    correct1, correct5 = (0, 0) if correct is None else correct.tolist()
    return {
        "dataset": dataset.name,
        "n": n,
        "top1": correct1 / max(n, 1),
        "top5": correct5 / max(n, 1),
        "predictions": predictions[:done].cpu()
        if predictions is not None
        else torch.empty(0, dtype=torch.long),
        "preprocessing": dataset.preprocessing,
    }
