"""Data-parallel fine-tuning under torchrun (torch.distributed, gloo on CPU / NCCL on GPU).

Every process holds the whole (small) calibration set and draws the same mini-batch indices from
the same seeded generator; each computes the loss of its slice of the mini-batch, scaled to its
share of the full-batch mean, and the gradients are summed across processes before the step. So
K processes take the same optimizer steps as one process on the whole mini-batch (up to float
summation order), with 1/K of the compute each. Without a process group all of this is a no-op.
Hand-rolled rather than ``DistributedDataParallel`` because the unit trained changes every block
and only a handful of weight tensors are trainable; one flat all-reduce per step is all DDP would do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sardfq_export.core.distributed import rank_world


def my_slice(idx: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This process's part of mini-batch ``idx`` and its weight (its share of the batch)."""
    rank, world = rank_world()
    if world == 1:
        return idx, 1.0
    part = idx.tensor_split(world)[rank]
    return part, len(part) / len(idx)


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over processes (one flat all-reduce)."""
    if rank_world()[1] == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p)
        offset += n
