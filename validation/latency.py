"""Latency of any runner: p50/p95 and throughput after warm-up, reference and deployed side by side.

The two runners are timed in alternation on the same inputs, so a busy machine slows both alike
and the speed-up stays meaningful. They alternate in short runs (one untimed call, then a few timed
ones), not call by call: runtimes keep their worker threads spinning for a while after a call
(PyTorch's OpenMP pool, ORT's unless told to stop), and on a few cores those threads would steal
the core of the other runner's next call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

Runner = Callable[[torch.Tensor], torch.Tensor]


def _stats(times_s: list[float], batch: int) -> dict:
    arr = np.asarray(times_s) * 1000.0
    p50 = float(np.percentile(arr, 50))
    return {
        "p50_ms": p50,
        "p95_ms": float(np.percentile(arr, 95)),
        "mean_ms": float(arr.mean()),
        "throughput_ips": batch / (p50 / 1000.0) if p50 > 0 else float("inf"),
        "iters": len(times_s),
    }


def _sync(runner: Runner) -> None:
    if str(getattr(runner, "device", "cpu")).startswith("cuda"):
        torch.cuda.synchronize()


def _time_once(runner: Runner, x: torch.Tensor) -> float:
    _sync(runner)
    start = time.perf_counter()
    runner(x)
    _sync(runner)
    return time.perf_counter() - start


def measure(runner: Runner, x: torch.Tensor, warmup: int = 3, iters: int = 20) -> dict:
    """p50/p95/mean latency (ms) and throughput (images/s) of one runner on batch ``x``."""
    for _ in range(warmup):
        runner(x)
    return _stats([_time_once(runner, x) for _ in range(iters)], int(x.shape[0]))


def compare(
    reference: Runner,
    deployed: Runner,
    sample: torch.Tensor,
    batches: Sequence[int] = (1, 32),
    warmup: int = 3,
    iters: int = 20,
    max_seconds: float | None = 60.0,
    run_length: int = 5,
) -> dict:
    """The report's ``latency`` section: reference vs deployed at each batch size (alternating).

    ``sample`` supplies the images (repeated when a batch is larger than it). The top-level
    ``batch``/``reference``/``deployed``/``speedup`` are the first batch size's; every size is in
    ``by_batch``. ``max_seconds`` caps the timed loop per batch size (fewer iterations then).
    """
    by_batch = {}
    for b in batches:
        reps = -(-b // sample.shape[0])
        x = sample.repeat(reps, 1, 1, 1)[:b].contiguous()
        for _ in range(warmup):
            reference(x)
            deployed(x)
        t_ref, t_dep = [], []
        start = time.perf_counter()
        while len(t_ref) < iters:
            for runner, times in ((reference, t_ref), (deployed, t_dep)):
                runner(x)  # settles the threads the other runner left spinning
                times.extend(_time_once(runner, x) for _ in range(run_length))
            if max_seconds is not None and time.perf_counter() - start > max_seconds and len(t_ref) >= 3:
                break
        ref, dep = _stats(t_ref, b), _stats(t_dep, b)
        ref["runtime"] = getattr(reference, "name", "reference")
        dep["runtime"] = getattr(deployed, "name", "deployed")
        by_batch[str(b)] = {"reference": ref, "deployed": dep, "speedup": ref["p50_ms"] / dep["p50_ms"]}
    first = by_batch[str(batches[0])]
    return {
        "device": _device_name(deployed),
        "threads": torch.get_num_threads(),
        "batch": int(batches[0]),
        "reference": first["reference"],
        "deployed": first["deployed"],
        "speedup": first["speedup"],
        "by_batch": by_batch,
    }


def _device_name(runner: Runner) -> str:
    device = str(getattr(runner, "device", "cpu"))
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(0)})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
