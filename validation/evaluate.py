"""Accuracy of any runner on real labelled data, streamed through the dataset's DataLoader."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sardfq_export.data import LabelledDataset


def evaluate(runner: Callable[[torch.Tensor], torch.Tensor], dataset: LabelledDataset, batch_size: int = 256,
             progress: bool = True, desc: str = "eval", **options) -> dict:  # fmt: skip
    """Top-1 / top-5 of ``runner`` over ``dataset``; also returns the predictions (for agreement).

    Images are decoded batch by batch; ``options``: ``num_workers`` (processes, default: the
    dataset's choice) and ``limit`` (evaluate only that many images, ``LabelledDataset.limited``'s
    rule), as for :func:`evaluate_runners`."""
    return evaluate_runners({desc: runner}, dataset, batch_size, progress, desc, **options)[desc]


def evaluate_runners(
    runners: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    dataset: LabelledDataset,
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "eval",
    *,
    num_workers: int | None = None,
    limit: int | None = None,
) -> dict[str, dict]:
    """:func:`evaluate` of several runners in one pass over ``dataset``: each batch is decoded once
    and given to every runner (a validation's float, fake-quant and deployed models read the same
    images; decoding them three times cost a third of an evaluation on Fashion-MNIST, more on JPEGs).
    Returns ``{key: evaluate's dict}`` in ``runners``' order."""
    from sardfq_export.core.progress import progress_bar

    dataset = dataset.limited(limit)
    n = len(dataset)
    # Results go into buffers allocated once, on each runner's device: no host sync per batch, and
    # no small tensor kept per batch (kept between the forwards' large freed blocks, those pin
    # glibc's heap, and the process grows batch after batch).
    predictions: dict[str, torch.Tensor] = {}
    correct: dict[str, torch.Tensor] = {}  # per runner: [top-1 hits, top-5 hits]
    done = 0
    bar = progress_bar(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    for images, labels in dataset.loader(batch_size, num_workers):
        for key, runner in runners.items():
            logits = runner(images)
            if key not in predictions:
                predictions[key] = torch.empty(n, dtype=torch.long, device=logits.device)
                correct[key] = torch.zeros(2, dtype=torch.long, device=logits.device)
            on_device = labels.to(logits.device)
            topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
            predictions[key][done : done + len(labels)] = topk[:, 0]
            correct[key][0] += (topk[:, 0] == on_device).sum()
            correct[key][1] += (topk == on_device[:, None]).any(1).sum()
        done += len(labels)
        if progress:
            bar.update(len(labels))
            label = (lambda k: f"top1 {k}") if len(runners) > 1 else (lambda k: "top1")
            bar.set_postfix({label(k): f"{int(c[0]) / done:.4f}" for k, c in correct.items()})
    bar.close()
    empty = torch.empty(0, dtype=torch.long)
    results = {}
    for key in runners:
        hits1, hits5 = correct[key].tolist() if key in correct else (0, 0)
        results[key] = {
            "dataset": dataset.name,
            "n": n,
            "top1": hits1 / max(n, 1),
            "top5": hits5 / max(n, 1),
            "predictions": predictions[key][:done].cpu() if key in predictions else empty,
            "preprocessing": dataset.preprocessing,
        }
    return results
