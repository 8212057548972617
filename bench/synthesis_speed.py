"""Synthesis throughput and memory (benchmark, not a test).

    bash tools/dev.sh python bench/synthesis_speed.py [--model deit_tiny_patch16_224] [--iters 4]
    bash tools/dev.sh python bench/synthesis_speed.py --memory deit_base_patch16_224 --iters 4
    bash tools/dev.sh python bench/synthesis_speed.py --step-ratio dinov2_s14_fmnist --rounds 3 --iters 4
    bash tools/dev.sh python bench/synthesis_speed.py --fraction deit_tiny_patch16_224 --rounds 5 --iters 6
    bash tools/dev.sh python bench/synthesis_speed.py --fraction deit_tiny_patch16_224 --rounds 5 --iters 6 --versus-plain-tv

Throughput: SARDFQ image-iterations/s at batch 32 (random-init timm model, 224×224) for ours in
fp32 and with bf16 autocast, against the straightforward implementation in
``bench/naive_synthesis.py`` (timm attention maps through hooks, one forward per MSR region, fp32),
all in one process, interleaved. Achieved FLOP/s = matmul FLOPs of one of our iterations (counted
by ``torch.utils.flop_counter``) × iterations/s, as a fraction of the peak this machine reaches on
a large square matmul of the same dtype, measured in the same run.

Step ratio (``--step-ratio MODEL``): a SARDFQ step against a PSAQ-ViT step on MODEL (its own
weights; fp32, or ``--bf16``), interleaved over ``--rounds`` rounds, with the two ratios that
should bound it measured in the same steps: images forwarded through the teacher per step (SARDFQ
adds its MSR region crops to the batch) and matmul FLOPs per step (``torch.utils.flop_counter``).

FLOP fraction (``--fraction MODEL``): only our SARDFQ step in ``--dtype`` (bf16 autocast by
default), over ``--rounds`` rounds; each round's matmul peak is measured just before and just after
its steps and their mean is the round's peak, so a shared machine's drift hits both sides of the
ratio alike. Zoo models (``dinov2_s14_fmnist``) are loaded with their weights, timm names
random-init. Prints every round and the median / min / max.

Memory (``--memory``): peak resident memory of one synthesis process, sampled after every
iteration, to show it does not grow with the iteration count. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive_synthesis import NaiveSARDFQ, time_steps  # noqa: E402

from sardfq_export.core.device import bf16_native  # noqa: E402
from sardfq_export.models import load_model  # noqa: E402
from sardfq_export.synthesis import SynthConfig, synthesize  # noqa: E402


def matmul_peak(dtype: torch.dtype, sizes=(2048, 4096), reps: int = 3) -> float:
    """Best FLOP/s of ``a @ b`` over square sizes (the machine's practical matmul peak)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def _model(name: str):
    torch.manual_seed(0)
    return load_model(name, pretrained=False)


def ours(loaded, batch: int, iters: int, bf16: bool, count_flops: bool = False) -> dict:
    """Seconds per iteration (after one warm-up iteration), first loss, FLOPs of iteration 2."""
    from torch.utils.flop_counter import FlopCounterMode

    stamps: list[float] = []
    counter = FlopCounterMode(display=False) if count_flops else None

    def tick(_batch, done):
        stamps.append(time.perf_counter())
        if counter is not None and done == 1:
            counter.__enter__()
        if counter is not None and done == 2:
            counter.__exit__(None, None, None)

    cfg = SynthConfig(method="sardfq", num_images=batch, batch_size=batch, seed=0, iters=iters + 2, bf16=bf16)
    calib = synthesize(loaded, cfg, None, progress=False, callback=tick)
    per_it = (stamps[-1] - stamps[1]) / (len(stamps) - 2)  # iterations 3.. (1 warm-up, 1 counted)
    out = {"s_per_iter": per_it, "first_loss": calib.meta["loss_curve"][0]["total"][0]}
    if counter is not None:
        out["flops_per_iter"] = int(counter.get_total_flops())
    return out


def measure(model: str = "deit_tiny_patch16_224", batch: int = 32, iters: int = 4, threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    loaded = _model(model)
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    res_bf16 = ours(loaded, batch, iters, bf16=True, count_flops=True)
    res_fp32 = ours(loaded, batch, iters, bf16=False)
    naive = NaiveSARDFQ(_model(model), SynthConfig(method="sardfq", num_images=batch, iters=iters + 1), batch)
    naive_s, naive_first = time_steps(naive, iters)
    flops = res_bf16["flops_per_iter"]
    rows = {
        "naive_fp32": {"s_per_iter": naive_s},
        "ours_fp32": {"s_per_iter": res_fp32["s_per_iter"]},
        "ours_bf16": {"s_per_iter": res_bf16["s_per_iter"]},
    }
    for key, row in rows.items():
        row["image_iters_per_s"] = batch / row["s_per_iter"]
        row["speedup_vs_naive"] = naive_s / row["s_per_iter"]
        dtype = "bf16" if key.endswith("bf16") else "fp32"
        row["tflops"] = flops / row["s_per_iter"] / 1e12
        row["fraction_of_matmul_peak"] = flops / row["s_per_iter"] / peak[dtype]
    return {
        "model": model,
        "batch": batch,
        "timed_iters": iters,
        "threads": threads,
        "matmul_peak_tflops": {k: v / 1e12 for k, v in peak.items()},
        "flops_per_iter": flops,
        "same_objective": {
            "ours_fp32_first_loss": res_fp32["first_loss"],
            "naive_first_loss": naive_first,
            "relative_difference": abs(res_fp32["first_loss"] - naive_first) / abs(naive_first),
        },
        "rows": rows,
    }


def flop_fraction(
    model: str,
    batch: int,
    iters: int,
    rounds: int,
    bf16: bool,
    threads: int = 2,
    versus_plain_tv: bool = False,
) -> dict:
    """Our step's matmul FLOP/s as a fraction of the same-dtype matmul peak, ``rounds`` times.
    ``versus_plain_tv``: each round also times the step with autograd's own TV backward, right
    after ours (same peak bracket), and the result gains their per-round ratio."""
    import statistics
    from unittest import mock

    from sardfq_export.models.loading import ZOO
    from sardfq_export.synthesis import losses

    torch.set_num_threads(threads)
    loaded = load_model(model) if model in ZOO else _model(model)
    dtype = torch.bfloat16 if bf16 else torch.float32
    flops = ours(loaded, batch, 1, bf16=bf16, count_flops=True)["flops_per_iter"]  # also warms up
    runs = []
    for _ in range(rounds):
        before = matmul_peak(dtype)
        s = ours(loaded, batch, iters, bf16=bf16)["s_per_iter"]
        if versus_plain_tv:
            with mock.patch.object(losses, "total_variation", losses.total_variation_autograd):
                s_plain = ours(loaded, batch, iters, bf16=bf16)["s_per_iter"]
        after = matmul_peak(dtype)
        peak = (before + after) / 2
        runs.append({"s_per_iter": s, "peak_tflops_before": before / 1e12, "peak_tflops_after": after / 1e12,
                     "tflops": flops / s / 1e12, "fraction_of_matmul_peak": flops / s / peak})  # fmt: skip
        if versus_plain_tv:
            runs[-1] |= {"plain_tv_s_per_iter": s_plain, "plain_tv_fraction": flops / s_plain / peak}
    fr = [r["fraction_of_matmul_peak"] for r in runs]
    out = {
        "model": model, "batch": batch, "timed_iters": iters, "rounds": rounds, "threads": threads,
        "precision": "bf16" if bf16 else "fp32", "flops_per_iter": flops, "runs": runs,
        "fraction_median": statistics.median(fr), "fraction_min": min(fr), "fraction_max": max(fr),
        "s_per_iter_median": statistics.median(r["s_per_iter"] for r in runs),
        "bf16_native": bf16_native("cpu"),
    }  # fmt: skip
    if versus_plain_tv:
        ratio = [r["plain_tv_s_per_iter"] / r["s_per_iter"] for r in runs]
        out |= {"plain_tv_fraction_median": statistics.median(r["plain_tv_fraction"] for r in runs),
                "plain_tv_step_over_ours": {"median": statistics.median(ratio), "min": min(ratio), "max": max(ratio)}}  # fmt: skip
    return out


def step(loaded, method: str, batch: int, iters: int, bf16: bool) -> dict:
    """Seconds per step of ``method`` (after one warm-up step), and per step: images through the
    teacher (a forward hook counts its batch) and matmul FLOPs (counted in step 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    stamps: list[float] = []
    seen: list[int] = []
    counter = FlopCounterMode(display=False)

    def tick(_batch, done):
        stamps.append(time.perf_counter())
        if done == 1:
            seen.clear()
            counter.__enter__()
        if done == 2:
            counter.__exit__(None, None, None)
            seen.append(-1)  # marks the end of step 2's forwards

    hook = loaded.model.register_forward_hook(lambda m, args, out: seen.append(int(args[0].shape[0])))
    try:
        cfg = SynthConfig(
            method=method, num_images=batch, batch_size=batch, seed=0, iters=iters + 2, bf16=bf16
        )
        synthesize(loaded, cfg, None, progress=False, callback=tick)
    finally:
        hook.remove()
    step2 = seen[: seen.index(-1)]
    return {
        "s_per_iter": (stamps[-1] - stamps[1]) / (len(stamps) - 2),
        "teacher_images_per_step": sum(step2),
        "flops_per_step": int(counter.get_total_flops()),
    }


def step_ratio(model: str, batch: int, iters: int, rounds: int, bf16: bool, threads: int = 2) -> dict:
    """SARDFQ step / PSAQ-ViT step on ``model`` (loaded as the CLI loads it), interleaved rounds."""
    import statistics

    torch.set_num_threads(threads)
    loaded = load_model(model)
    runs = []
    for _ in range(rounds):  # interleaved: machine noise hits both alike
        s = step(loaded, "sardfq", batch, iters, bf16)
        p = step(loaded, "psaq", batch, iters, bf16)
        runs.append({"sardfq": s, "psaq": p, "ratio": s["s_per_iter"] / p["s_per_iter"]})
    ratios = [r["ratio"] for r in runs]
    last = runs[-1]
    return {
        "model": model, "batch": batch, "timed_iters": iters, "rounds": rounds, "threads": threads,
        "precision": "bf16" if bf16 else "fp32", "runs": runs,
        "step_ratio_median": statistics.median(ratios), "step_ratio_min": min(ratios), "step_ratio_max": max(ratios),
        "forward_count_ratio": last["sardfq"]["teacher_images_per_step"] / last["psaq"]["teacher_images_per_step"],
        "flop_ratio": last["sardfq"]["flops_per_step"] / last["psaq"]["flops_per_step"],
    }  # fmt: skip


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def memory(model: str, batch: int, iters: int, bf16: bool, threads: int = 2) -> dict:
    """Peak RSS (MiB) after each iteration of one synthesis process (run it in its own process)."""
    torch.set_num_threads(threads)
    loaded = _model(model)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks: list[float] = []
    stamps: list[float] = []

    def tick(_batch, _done):
        stamps.append(time.perf_counter())
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    cfg = SynthConfig(method="sardfq", num_images=batch, batch_size=batch, seed=0, iters=iters, bf16=bf16)
    synthesize(loaded, cfg, None, progress=False, callback=tick)
    return {
        "model": model,
        "batch": batch,
        "bf16": bf16,
        "rss_after_load_mib": base,
        "peak_rss_mib_after_iter": peaks,
        "rss_now_mib": _rss_mb(),
        "s_per_iter": (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1),
        # glibc's heap settles over the first few iterations (its mmap threshold adapts to the
        # large activation buffers); after that the peak must stay put: second half vs middle.
        "grows_with_iters": peaks[-1] > peaks[len(peaks) // 2 - 1] * 1.02 if len(peaks) >= 4 else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory", default=None, metavar="MODEL", help="measure peak memory of MODEL instead")
    ap.add_argument("--fp32", action="store_true", help="--memory: fp32 instead of bf16 autocast")
    ap.add_argument(
        "--step-ratio", default=None, metavar="MODEL", help="SARDFQ step / PSAQ-ViT step on MODEL"
    )
    ap.add_argument("--fraction", default=None, metavar="MODEL", help="our step's FLOP fraction on MODEL")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="--fraction: precision")
    ap.add_argument("--rounds", type=int, default=3, help="--step-ratio / --fraction: rounds")
    ap.add_argument("--versus-plain-tv", action="store_true",
                    help="--fraction: also time each round with autograd's own TV backward (the change's before)")  # fmt: skip
    ap.add_argument("--bf16", action="store_true", help="--step-ratio: bf16 autocast")
    args = ap.parse_args(argv)
    if args.fraction:
        res = flop_fraction(
            args.fraction,
            args.batch,
            args.iters,
            args.rounds,
            args.dtype == "bf16",
            args.threads,
            args.versus_plain_tv,
        )
    elif args.step_ratio:
        res = step_ratio(args.step_ratio, args.batch, args.iters, args.rounds, args.bf16, args.threads)
    elif args.memory:
        res = memory(args.memory, args.batch, args.iters, bf16=not args.fp32, threads=args.threads)
    else:
        res = measure(args.model, args.batch, args.iters, args.threads)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
