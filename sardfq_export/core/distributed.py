"""torchrun support: one process group per run, set up from torchrun's environment.

``torchrun --nproc-per-node K -m sardfq_export synthesize ...`` starts K copies of the CLI; each
calls :func:`init_from_env` (gloo on CPU, NCCL when CUDA is visible; on GPUs each rank takes
``cuda:LOCAL_RANK``). Without torchrun (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) nothing is set up
and every helper behaves as the single process it is. Results are merged deterministically (by
batch index), so K processes give the same calibration set as one process with the same batch
size per process.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from sardfq_export.core.errors import UserInputError


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserInputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def init_from_env(device: str | None = None) -> tuple[int, int]:
    """Join torchrun's process group if launched by it; returns (rank, world size).

    ``device``: the ``--device`` spec (``auto|cpu|cuda[:N]``); NCCL on ``cuda:LOCAL_RANK`` when it
    resolves to CUDA, gloo on the CPU."""
    if dist.is_available() and dist.is_initialized():
        return rank_world()
    if env_world_size() <= 1:
        return 0, 1
    if not dist.is_available():
        raise UserInputError("this torch build has no torch.distributed: run a single process")
    from sardfq_export.core.device import resolve_device

    dev = resolve_device(device)  # auto/cuda under torchrun: cuda:LOCAL_RANK
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # NCCL takes CUDA tensors only: it is chosen exactly when the work (and so every gradient that
    # is all-reduced) lives on this process's GPU; gloo for CPU tensors.
    dist.init_process_group(
        backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None
    )
    return rank_world()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (rank order); ``[obj]`` in a single process. Tensors travel on CPU."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    got: list[Any] = [None] * world
    dist.all_gather_object(got, obj)
    return got
