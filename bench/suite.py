"""The performance suite: every figure of issue 6 with its target, in one command.

    bash tools/dev.sh python bench/suite.py [--threads 2] [--skip memory,latency,...]

1. synthesis throughput, deit_tiny@224, batch 32: ours (fp32 / bf16 autocast) vs the
   straightforward implementation, and achieved FLOP/s as a fraction of this machine's measured
   matmul peak (``bench/synthesis_speed.py``);
2. deployed latency, deit_small@224, batch 1 and 32: ORT INT8 (ours) vs ORT FP32 vs PyTorch FP32
   (``bench/ort_latency.py``);
3. end-to-end wall time of the README main-job command on the reference model (a fresh ``--out``);
4. peak memory of SARDFQ synthesis for deit_base@224 at batch 32, sampled every iteration.

Each part runs in its own process (clean peak-memory numbers, no state shared between parts).
Writes ``docs/performance.json`` and ``docs/performance.md`` (notes below the marker are kept),
prints every figure with its target. Takes about 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
NOTES_MARK = "<!-- notes: kept when the suite is re-run -->"
MAIN_JOB = ["--bits", "8", "--target", "onnxruntime", "--data", "fashion-mnist"]  # README's main job
PARTS = ("synthesis", "latency", "main_job", "memory")


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))


def _json_of(cmd: list[str], threads: int, timeout: int = 3600) -> dict:
    res = subprocess.run(cmd, cwd=ROOT, env=_env(threads), capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    start = res.stdout.index("{")
    return json.loads(res.stdout[start:])


def synthesis(threads: int) -> dict:
    return _json_of([sys.executable, str(BENCH / "synthesis_speed.py"), "--threads", str(threads)], threads)


def latency(threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="sardfq-suite-") as tmp:
        path = Path(tmp) / "latency.json"
        cmd = [sys.executable, str(BENCH / "ort_latency.py"), "--threads", str(threads), "--json", str(path)]
        res = subprocess.run(cmd, cwd=ROOT, env=_env(threads), capture_output=True, text=True, timeout=3600)
        if res.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
        return json.loads(path.read_text())


def main_job(threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="sardfq-suite-") as tmp:
        cmd = [sys.executable, "-m", "sardfq_export", *MAIN_JOB, "--out", tmp, "--quiet"]
        start = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, env=_env(threads), capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - start
        if res.returncode != 0:
            raise RuntimeError(f"main job failed ({res.returncode}): {res.stderr[-2000:]}")
        report = json.loads((Path(tmp) / "report.json").read_text())
    acc = report.get("accuracy", {})
    return {
        "command": "sardfq-export " + shlex.join(MAIN_JOB) + " --out DIR",
        "wall_s": wall,
        "top1_fp32": acc.get("fp32_top1"),
        "top1_deployed": acc.get("deployed_top1"),
        "gates_passed": report.get("gates", {}).get("passed"),
    }


def memory(threads: int) -> dict:
    cmd = [sys.executable, str(BENCH / "synthesis_speed.py"), "--memory", "deit_base_patch16_224",
           "--iters", "8", "--threads", str(threads)]  # fmt: skip
    return _json_of(cmd, threads)


def figures(res: dict) -> list[dict]:
    """(figure, value, target, met) rows from the raw results."""
    rows = []
    if "synthesis" in res:
        s = res["synthesis"]["rows"]
        best = max(("ours_fp32", "ours_bf16"), key=lambda k: s[k]["speedup_vs_naive"])
        rows.append({"figure": f"synthesis img-it/s, ours ({best[5:]}) / straightforward (fp32), deit_tiny@224 b32",
                     "value": f"{s[best]['speedup_vs_naive']:.2f}× ({s[best]['image_iters_per_s']:.1f} vs "
                              f"{s['naive_fp32']['image_iters_per_s']:.1f} img-it/s)",
                     "target": "≥ 2×", "met": s[best]["speedup_vs_naive"] >= 2.0})  # fmt: skip
        for k in ("ours_fp32", "ours_bf16"):
            dt = k[5:]
            peak = res["synthesis"]["matmul_peak_tflops"][dt]
            rows.append({"figure": f"synthesis achieved FLOP/s / matmul peak, ours {dt}",
                         "value": f"{s[k]['fraction_of_matmul_peak'] * 100:.0f}% ({s[k]['tflops'] * 1000:.0f} of "
                                  f"{peak * 1000:.0f} GFLOP/s)",
                         "target": "≥ 50%", "met": s[k]["fraction_of_matmul_peak"] >= 0.5})  # fmt: skip
    if "latency" in res:
        for b, r in res["latency"]["batches"].items():
            rows.append({"figure": f"deit_small@224 batch {b}: ORT INT8 speedup over ORT FP32",
                         "value": f"{r['int8_vs_ort_fp32']:.2f}× ({r['ours_int8_ms']:.1f} vs {r['ort_fp32_ms']:.1f} ms; "
                                  f"PyTorch FP32 {r['pytorch_fp32_ms']:.1f} ms → {r['int8_vs_pytorch_fp32']:.2f}×)",
                         "target": "≥ 2×", "met": r["int8_vs_ort_fp32"] >= 2.0})  # fmt: skip
    if "main_job" in res:
        m = res["main_job"]
        rows.append({"figure": f"main job wall time on the reference model (`{m['command']}`)",
                     "value": f"{m['wall_s']:.0f} s (top-1 {m['top1_fp32'] * 100:.2f} → {m['top1_deployed'] * 100:.2f})",
                     "target": "≤ 120 s", "met": m["wall_s"] <= 120})  # fmt: skip
    if "memory" in res:
        m = res["memory"]
        peaks = m["peak_rss_mib_after_iter"]
        rows.append({"figure": f"deit_base@224 synthesis peak memory, batch 32 ({'bf16' if m['bf16'] else 'fp32'})",
                     "value": f"{peaks[-1] / 1024:.2f} GiB peak RSS; after iteration 1..{len(peaks)}: "
                              + ", ".join(f"{p / 1024:.2f}" for p in peaks) + f" GiB; {m['s_per_iter']:.1f} s/it",
                     "target": "report; no growth over the second half of the iterations",
                     "met": m["grows_with_iters"] is False})  # fmt: skip
    return rows


def write_doc(path: Path, cmd: str, res: dict, rows: list[dict], threads: int) -> None:
    import torch

    lines = [
        "# Performance suite (issue 6)",
        "",
        "Produced by (raw numbers in `docs/performance.json`):",
        "",
        f"    {cmd}",
        "",
        f"- {datetime.date.today().isoformat()}, {platform.machine()} ({os.cpu_count()} CPUs), {threads} threads, "
        f"torch {torch.__version__}; total {res['wall_s'] / 60:.1f} min",
        "- every figure is a ratio measured side by side in one process, or a wall time of one command",
        "",
        "| figure | measured | target | met |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['figure']} | {r['value']} | {r['target']} | {'yes' if r['met'] else '**no**'} |" for r in rows
    ]
    lines += [
        f"| {part}: not measured | {err.splitlines()[0]} | – | **error** |"
        for part, err in res.get("errors", {}).items()
    ]
    if "synthesis" in res:
        s = res["synthesis"]
        same = s["same_objective"]
        lines += [
            "",
            "## Synthesis throughput (SARDFQ, deit_tiny@224 random init, batch 32)",
            "",
            "| implementation | s/iteration | image-iterations/s | × straightforward | TFLOP/s | of matmul peak |",
            "|---|---|---|---|---|---|",
        ]
        for k, r in s["rows"].items():
            lines.append(f"| {k} | {r['s_per_iter']:.2f} | {r['image_iters_per_s']:.1f} | {r['speedup_vs_naive']:.2f} | "
                         f"{r['tflops']:.3f} | {r['fraction_of_matmul_peak'] * 100:.0f}% |")  # fmt: skip
        lines += [
            "",
            f"Matmul peak (best square matmul, same run): fp32 {s['matmul_peak_tflops']['fp32']:.3f}, "
            f"bf16 {s['matmul_peak_tflops']['bf16']:.3f} TFLOP/s. FLOPs of one iteration (forward over the "
            f"images and their MSR regions + backward to the pixels, counted by `torch.utils.flop_counter`): "
            f"{s['flops_per_iter'] / 1e9:.0f} GFLOP. Same objective: first-iteration loss ours "
            f"{same['ours_fp32_first_loss']:.4f} vs straightforward {same['naive_first_loss']:.4f} "
            f"(relative difference {same['relative_difference']:.1e}).",
        ]
    lines.append("")
    notes = ""
    if path.exists() and NOTES_MARK in path.read_text():
        notes = path.read_text().split(NOTES_MARK, 1)[1]
    path.write_text("\n".join(lines) + "\n" + NOTES_MARK + (notes or "\n"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help=f"comma-separated parts to skip: {', '.join(PARTS)}")
    ap.add_argument("--json-out", type=Path, default=ROOT / "docs" / "performance.json")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md")
    args = ap.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(PARTS):
        ap.error(f"unknown parts {sorted(skip - set(PARTS))}; choose from {PARTS}")
    start = time.perf_counter()
    res: dict = {}
    runners = {"synthesis": synthesis, "latency": latency, "main_job": main_job, "memory": memory}
    for part in PARTS:
        if part in skip:
            continue
        print(f"[suite] {part} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            res[part] = runners[part](args.threads)
        except Exception as exc:  # a broken part is reported, the others still run
            res.setdefault("errors", {})[part] = f"{type(exc).__name__}: {exc}"
            print(f"[suite] {part} FAILED: {exc}", file=sys.stderr, flush=True)
            continue
        print(f"[suite] {part} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    res["wall_s"] = time.perf_counter() - start
    rows = figures(res)
    res["figures"] = rows
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(res, indent=1))
    cmd = "bash tools/dev.sh python bench/suite.py" + (
        " " + shlex.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ""
    )
    write_doc(args.doc, cmd, res, rows, args.threads)
    for r in rows:
        print(f"{'OK ' if r['met'] else 'NO '} {r['figure']}: {r['value']}  (target {r['target']})")
    for part, err in res.get("errors", {}).items():
        print(f"ERR {part}: {err}")
    print(f"wrote {args.json_out} and {args.doc}")
    return 1 if res.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
