"""Latency of any runner, and the speed-up of a deployed runtime over its float baseline, measured
so that it holds on a shared, loaded machine.

The runners are timed in interleaved *rounds* on the same inputs, so a busy machine slows them
alike and the per-round ratio stays meaningful while absolute times drift. Within a round each
runner does a short run (one untimed call, then a few timed ones), not one call at a time:
runtimes keep their worker threads spinning for a while after a call (PyTorch's OpenMP pool, ORT's
unless told to stop), and on a few cores those threads would steal the core of the other runner's
next call. The untimed call absorbs that.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from sardfq_export.core.errors import UserInputError

Runner = Callable[[torch.Tensor], torch.Tensor]

ROUNDS = 7  # default rounds: [min, max] of 7 round ratios covers their median with 98.4% confidence
MIN_ROUNDS = 3  # never fewer, whatever max_seconds says (75% confidence)
NOISY_ABOVE = 0.25  # (max - min) / median of the round ratios above this: "noisy", re-measured once
CI_LEVEL = 0.95  # speedup_ci: the narrowest order-statistic interval of the median with this confidence


def _stats(times_s: Sequence[float], batch: int) -> dict:
    """min/p50/p95/mean (ms), dispersion (p95 / p50), throughput at p50 and the count of ``times_s``."""
    arr = np.asarray(times_s, dtype=float) * 1000.0
    p50 = float(np.percentile(arr, 50))
    p95 = float(np.percentile(arr, 95))
    return {
        "min_ms": float(arr.min()),
        "p50_ms": p50,
        "p95_ms": p95,
        "mean_ms": float(arr.mean()),
        "dispersion": p95 / p50 if p50 > 0 else 1.0,
        "throughput_ips": batch / (p50 / 1000.0) if p50 > 0 else float("inf"),
        "iters": len(arr),
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


def _need(value, minimum: int, what: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise UserInputError(f"latency: {what} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def measure(runner: Runner, x: torch.Tensor, warmup: int = 3, iters: int = 20) -> dict:
    """min/p50/p95/mean latency (ms), dispersion and throughput (images/s) of one runner on ``x``."""
    _need(warmup, 0, "warmup")
    _need(iters, 1, "iters (timed calls)")
    for _ in range(warmup):
        runner(x)
    return _stats([_time_once(runner, x) for _ in range(iters)], int(x.shape[0]))


def _ratio(ref_s: float, dep_s: float) -> float:
    if dep_s > 0:
        return ref_s / dep_s
    return float("inf") if ref_s > 0 else 1.0


def _ratio_summary(ratios: list[float], noisy_above: float) -> dict:
    """Median, [min, max], (max - min) / median and the median's confidence interval of per-round
    ratios."""
    med = float(np.median(ratios))
    lo, hi = float(min(ratios)), float(max(ratios))
    dispersion = (hi - lo) / med if 0 < med < float("inf") else 0.0
    ci_lo, ci_hi, level = median_interval(ratios)
    return {
        "speedup": med,
        "speedup_spread": [lo, hi],
        "speedup_ci": [ci_lo, ci_hi],
        "confidence": level,
        "dispersion": dispersion,
        "noisy": bool(dispersion > noisy_above),
        "round_ratios": [float(r) for r in ratios],
    }


def _below(k: int, n: int) -> float:
    """P(X < k) for X ~ Binomial(n, 1/2): how often fewer than k of n rounds fall below the median."""
    return sum(math.comb(n, i) for i in range(k)) / 2.0**n


def median_interval(values: Sequence[float], level: float = CI_LEVEL) -> tuple[float, float, float]:
    """``(lo, hi, confidence)``: the distribution-free confidence interval of the median of
    independent ``values`` from their order statistics, ``[x(k), x(n+1-k)]``, which misses the true
    median with probability ``2 · P(Binomial(n, 1/2) < k)``.

    ``k`` is the largest that still gives at least ``level`` confidence, so one or two outlying
    rounds (a load spike on a shared machine) drop out of the interval once there are enough
    rounds: 7 rounds give [min, max] (98.4%), 14 give [3rd, 12th] (98.7%), 20 give [6th, 15th]
    (95.9%). Too few rounds for ``level`` give [min, max] and their lower confidence
    (3 rounds: 75%)."""
    x = sorted(float(v) for v in values)
    n = len(x)
    k = 1
    while k + 1 <= (n + 1) // 2 and 1.0 - 2.0 * _below(k + 1, n) >= level:
        k += 1
    return x[k - 1], x[n - k], 1.0 - 2.0 * _below(k, n)


def confidence(rounds: int) -> float:
    """The confidence of :func:`median_interval` for ``rounds`` independent ratios."""
    return median_interval(range(rounds))[2]


def _rounds(
    runners: dict[str, Runner], x: torch.Tensor, n_rounds: int, run_length: int, max_seconds: float | None
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """All timed calls and the per-round p50 (seconds) of each runner, over interleaved rounds.

    Round ``r`` starts with runner ``r mod n`` (a rotation: no runner always follows the same one).
    """
    order = list(runners)
    times: dict[str, list[float]] = {k: [] for k in order}
    round_p50: dict[str, list[float]] = {k: [] for k in order}
    start = time.perf_counter()
    done = 0
    while done < n_rounds:
        k0 = done % len(order)
        for key in order[k0:] + order[:k0]:
            runner = runners[key]
            runner(x)  # settles the threads the previous runner left spinning
            ts = [_time_once(runner, x) for _ in range(run_length)]
            times[key].extend(ts)
            round_p50[key].append(float(np.median(ts)))
        done += 1
        if (
            max_seconds is not None
            and done >= min(MIN_ROUNDS, n_rounds)
            and time.perf_counter() - start > max_seconds
        ):
            break
    return times, round_p50


def compare(
    reference: Runner,
    deployed: Runner,
    sample: torch.Tensor,
    batches: Sequence[int] = (1, 32),
    warmup: int = 3,
    iters: int = 20,
    max_seconds: float | None = 60.0,
    run_length: int = 5,
    *,
    rounds: int = ROUNDS,
    extras: Mapping[str, Runner] | None = None,
    noisy_above: float = NOISY_ABOVE,
    remeasure: bool = True,
) -> dict:
    """The report's ``latency`` section: ``reference`` (the same runtime in float) vs ``deployed``,
    plus any ``extras`` (e.g. ``{"torch_fp32": PyTorch eager}``), at each batch size.

    How it is timed, per batch size (``sample`` repeated up to the batch):

    1. ``warmup`` untimed calls of every runner.
    2. ``R`` rounds, ``R = max(rounds, ceil(iters / run_length))`` (default 7). In each round every
       runner, in interleaved (rotating) order, makes one untimed settle call and then
       ``run_length`` timed calls; the round's p50 of each runner is kept.
    3. Ratio per round = reference round p50 / deployed round p50 (a loaded machine slows both
       sides of one round alike, so the ratio is steadier than either time). The headline
       ``speedup`` is the median of the round ratios, ``speedup_spread`` their [min, max],
       ``dispersion`` = (max - min) / median, and ``speedup_ci`` the median's distribution-free
       confidence interval from the round ratios' order statistics (:func:`median_interval`: the
       narrowest with ≥ 95% confidence; [min, max] at 98.4% for 7 rounds, 75% for 3), its
       confidence as ``confidence``.
    4. ``noisy`` when ``dispersion > noisy_above`` (0.25): then it is measured once more with twice
       the rounds and that second measurement is kept (``remeasured: true``, the first in
       ``first_measurement``).

    ``max_seconds`` bounds each measurement (per batch size): no round starts after it, but at
    least 3 rounds run. When the warm-up shows that ``R`` rounds of ``run_length`` calls cannot
    fit, ``run_length`` shrinks (down to 1) so that the rounds, which carry the confidence, do.

    Every runner keeps min/p50/p95/mean over all its timed calls, its own ``dispersion``
    (p95 / p50) and its round p50s; every extra also gets its own ratio over the deployed runner
    (``speedup``, ``speedup_spread``, ``speedup_dispersion``, ``noisy``). The top-level ``batch``,
    ``reference``, ``deployed``, ``speedup`` (and the other headline keys and extras) are the
    first batch size's; every size is in ``by_batch``.
    """
    _need(warmup, 0, "warmup")
    _need(iters, 0, "iters")
    run_length = _need(run_length, 1, "run_length (timed calls per runner per round)")
    rounds = _need(rounds, 1, "rounds")
    if not batches:
        raise UserInputError("latency: no batch sizes to measure")
    for b in batches:
        _need(b, 1, "a batch size")
    if sample.ndim < 1 or sample.shape[0] == 0:
        raise UserInputError("latency: no sample images to time the runners on (got 0)")
    extras = dict(extras or {})
    clash = {"reference", "deployed"} & set(extras)
    if clash:
        raise ValueError(f"latency: extra runner names clash with {sorted(clash)}")
    runners = {"reference": reference, "deployed": deployed, **extras}
    n_rounds = max(rounds, -(-iters // run_length))
    by_batch = {}
    for b in batches:
        reps = -(-b // sample.shape[0])
        x = sample.repeat(reps, *([1] * (sample.ndim - 1)))[:b].contiguous()
        unit = 0.0  # one call of every runner, from the last warm-up round
        for i in range(warmup):
            for runner in runners.values():
                if i == warmup - 1:
                    unit += _time_once(runner, x)
                else:
                    runner(x)
        length = run_length
        if max_seconds is not None and unit > 0:
            length = max(1, min(run_length, int(max_seconds / (n_rounds * unit)) - 1))
        row = _measure_row(runners, x, b, n_rounds, length, max_seconds, noisy_above)
        if row["noisy"] and remeasure:
            first = {k: row[k] for k in ("speedup", "speedup_spread", "speedup_ci", "dispersion", "rounds")}
            row = _measure_row(runners, x, b, 2 * n_rounds, length, max_seconds, noisy_above)
            row["remeasured"], row["first_measurement"] = True, first
        by_batch[str(b)] = row
    first = by_batch[str(batches[0])]
    headline = (
        "speedup_spread",
        "speedup_ci",
        "dispersion",
        "noisy",
        "remeasured",
        "rounds",
        "confidence",
        "round_ratios",
    )
    return {
        "device": _device_name(deployed),
        "threads": torch.get_num_threads(),
        "batch": int(batches[0]),
        "reference": first["reference"],
        "deployed": first["deployed"],
        "speedup": first["speedup"],
        "by_batch": by_batch,
        **{k: first[k] for k in (*headline, "first_measurement") if k in first},
        **{k: first[k] for k in extras},
        "noisy_batches": [int(b) for b, row in by_batch.items() if row["noisy"]],
        "method": {
            "rounds": n_rounds,
            "run_length": run_length,
            "warmup": warmup,
            "max_seconds": max_seconds,
            "noisy_above": noisy_above,
            "statistic": "median over rounds of (reference round p50 / deployed round p50)",
        },
    }


def _measure_row(
    runners: dict[str, Runner],
    x: torch.Tensor,
    batch: int,
    n_rounds: int,
    run_length: int,
    max_seconds: float | None,
    noisy_above: float,
) -> dict:
    times, round_p50 = _rounds(runners, x, n_rounds, run_length, max_seconds)
    done = len(round_p50["deployed"])
    sides = {}
    for key, runner in runners.items():
        stats = _stats(times[key], batch)
        stats["runtime"] = getattr(runner, "name", key)
        stats["round_p50_ms"] = [t * 1000.0 for t in round_p50[key]]
        sides[key] = stats
    dep = round_p50["deployed"]
    row = {"reference": sides["reference"], "deployed": sides["deployed"]}
    row.update(
        _ratio_summary([_ratio(r, d) for r, d in zip(round_p50["reference"], dep, strict=True)], noisy_above)
    )
    row.update(rounds=done, run_length=run_length, remeasured=False)
    for key in runners:
        if key not in ("reference", "deployed"):
            summary = _ratio_summary(
                [_ratio(r, d) for r, d in zip(round_p50[key], dep, strict=True)], noisy_above
            )
            del summary["round_ratios"]
            summary["speedup_dispersion"] = summary.pop("dispersion")  # its own "dispersion" is p95 / p50
            row[key] = {**sides[key], **summary}
    return row


def _device_name(runner: Runner) -> str:
    device = str(getattr(runner, "device", "cpu"))
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(0)})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
