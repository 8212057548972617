"""Benchmark (not a test): does ``--min-speedup`` give the same verdict on every run under load?

    bash tools/dev.sh python bench/gate_stability.py [--runs 10] [--min-speedup 1.5]
                                                     [--target onnxruntime] [--load-threads 2]
                                                     [--calib sardfq|noise|FILE] [--threads N]
                                                     [--md docs/gate-stability.md]
                                                     [--json docs/gate-stability.json] [--work DIR]

Issue 14's acceptance: on the embedded reference model, ten identical runs of the main job with
``--min-speedup 1.5 --target onnxruntime`` while another 2-thread job loads the machine give the
same gate verdict every time (or a documented "too noisy to decide"), and the spread of the
reported ORT INT8 vs ORT FP32 ratio across the runs is written down.

How: the calibration set is made once (``sardfq-export synthesize``, or ``--calib noise`` /
an existing file), so the runs are identical and each one quantizes, exports and *measures* again
in a fresh ``--out`` (a reused folder would reuse its cached latency). A second process runs a
float32 matmul loop on ``--load-threads`` threads for the whole time (``--load-threads 0``: no
load). Each run's verdict is read from its ``report.json``: ``pass`` / ``fail`` (the min_speedup
check decided) or ``too-noisy`` (it failed as "too noisy to decide"); the headline ratio is the
batch-1 median round ratio ORT FP32 p50 / ORT INT8 p50 (the speed-up) with its confidence interval, batch 32 beside it.
Writes a markdown and a JSON table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "sardfq_export"]

LOAD = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a * 1e-3)
"""


def _start_load(threads: int) -> subprocess.Popen | None:
    if threads <= 0:
        return None
    return subprocess.Popen([sys.executable, "-c", LOAD, str(threads)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()  # the load process we started, by its own handle
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _verdict(check: dict | None) -> str:
    if check is None:
        return "not-run"
    if check["passed"]:
        return "pass"
    return "fail" if check.get("decided", True) else "too-noisy"


def _row(i: int, code: int, wall: float, out: Path, err: str) -> dict:
    row: dict = {"run": i, "exit": code, "wall_s": round(wall, 1)}
    rep_path = out / "report.json"
    if not rep_path.is_file():
        row.update(verdict="error", error=err.strip().splitlines()[-1] if err.strip() else f"exit {code}")
        return row
    report = json.loads(rep_path.read_text())
    checks = report["gates"]["checks"]
    speed = next((c for c in checks if c["name"] == "min_speedup"), None)
    row["verdict"] = _verdict(speed)
    row["other_failed_gates"] = [c["name"] for c in checks if not c["passed"] and c["name"] != "min_speedup"]
    row["note"] = (speed or {}).get("note", "")
    for b, r in (report.get("latency") or {}).get("by_batch", {}).items():
        row[f"b{b}"] = {
            "speedup": r["speedup"],
            "spread": r.get("speedup_spread"),
            "ci": r.get("speedup_ci"),
            "confidence": r.get("confidence"),
            "noisy": r.get("noisy"),
            "remeasured": bool(r.get("remeasured")),
            "int8_p50_ms": r["deployed"]["p50_ms"],
            "fp32_p50_ms": r["reference"]["p50_ms"],
        }
    return row


def _summary(rows: list[dict]) -> dict:
    verdicts = [r["verdict"] for r in rows]
    out: dict = {"verdicts": {v: verdicts.count(v) for v in sorted(set(verdicts))},
                 "same_verdict": len(set(verdicts)) == 1,
                 # the acceptance's reading: every decided run agrees, the rest said "too noisy"
                 "decided_agree": len(set(verdicts) - {"too-noisy"}) <= 1 and "error" not in verdicts,
                 "exits": sorted({r["exit"] for r in rows})}  # fmt: skip
    for b in ("b1", "b32"):
        vals = [r[b]["speedup"] for r in rows if b in r]
        if vals:
            med = statistics.median(vals)
            out[b] = {"min": min(vals), "median": med, "max": max(vals),
                      "relative_spread": (max(vals) - min(vals)) / med if med else None,
                      "noisy_runs": sum(bool(r[b]["noisy"]) for r in rows if b in r)}  # fmt: skip
    return out


def _markdown(meta: dict, rows: list[dict], summary: dict) -> str:
    def ratio(r: dict, b: str) -> str:
        if b not in r:
            return "n/a"
        x = r[b]
        lo, hi = x.get("ci") or x["spread"] or (x["speedup"], x["speedup"])
        flags = (" noisy" if x["noisy"] else "") + (" (re-measured)" if x["remeasured"] else "")
        return f"{x['speedup']:.2f}× [{lo:.2f}–{hi:.2f}]{flags}"

    lines = [
        "# `--min-speedup` verdict stability under load",
        "",
        f"Written by `bench/gate_stability.py` ({meta['date']}). Command per run:",
        "",
        f"    {meta['command']}",
        "",
        f"Machine: {meta['machine']}. Load: {meta['load']}. Calibration: {meta['calib']} (made once; every run "
        "quantizes, exports and measures again in a fresh `--out`).",
        "",
        "Ratio (the speed-up) = ORT FP32 (model.fp32.onnx, same session settings) p50 / ORT INT8 "
        "(model.ort.onnx) p50, the median over interleaved rounds, with the median's confidence interval "
        "from the rounds' order statistics (≥ 95% where there are enough rounds; the gate decides a noisy "
        "measurement on it); the gate reads batch 1. *(re-measured)*: the first measurement was noisy and was redone with twice the rounds.",
        "",
        "| run | exit | verdict | batch 1 ratio [interval] | batch 32 ratio [interval] | other failed gates | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['exit']} | **{r['verdict']}** | {ratio(r, 'b1')} | {ratio(r, 'b32')} | "
            f"{', '.join(r.get('other_failed_gates') or []) or '—'} | {r['wall_s']} |"
        )
    if summary["same_verdict"]:
        said = " — the same every run."
    elif summary.get("decided_agree"):
        said = (
            " — every run that decided gave the same verdict; the others failed as *too noisy to "
            "decide* (exit 3, the documented outcome of a measurement that cannot tell)."
        )
    else:
        said = " — **not** the same every run."
    exits = summary.get("exits") or sorted({r["exit"] for r in rows})
    lines += ["", "Verdicts: " + ", ".join(f"{v} × {n}" for v, n in summary["verdicts"].items()) + said
              + f" Exit codes seen: {', '.join(map(str, exits))}.", ""]  # fmt: skip
    for b, label in (("b1", "batch 1 (gated)"), ("b32", "batch 32")):
        s = summary.get(b)
        if s:
            lines.append(
                f"- {label}: ratio min {s['min']:.2f}×, median {s['median']:.2f}×, max {s['max']:.2f}× "
                f"(spread (max − min) / median = {s['relative_spread']:.1%}); {s['noisy_runs']} of "
                f"{len(rows)} runs flagged noisy"
            )
    notes = sorted({r["note"] for r in rows if r.get("note")})
    if notes:
        lines += ["", "Gate notes seen:", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--min-speedup", type=float, default=1.5)
    ap.add_argument("--target", default="onnxruntime")
    ap.add_argument("--load-threads", type=int, default=2, help="threads of the loading process (0: none)")
    ap.add_argument("--calib", default="sardfq", help="sardfq | psaq | noise (made once) or a calib file")
    ap.add_argument("--threads", type=int, default=None, help="--threads for the runs (default: theirs)")
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "gate-stability.md")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "gate-stability.json")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--render", action="store_true", help="only rewrite --md from --json (no runs)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be ≥ 1")
    if args.render:
        saved = json.loads(args.json.read_text())
        summary = _summary(saved["runs"])
        args.json.write_text(json.dumps({**saved, "summary": summary}, indent=2) + "\n")
        args.md.write_text(_markdown(saved["meta"], saved["runs"], summary))
        return 0 if summary["decided_agree"] else 1

    work = args.work or Path(tempfile.mkdtemp(prefix="sardfq-gate-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = Path(args.calib)
    if not calib.is_file():
        calib = work / "calib.safetensors"
        if not calib.is_file():
            method = args.calib if args.calib in ("sardfq", "psaq", "noise") else "sardfq"
            print(f"calibration set ({method}), once: {calib}", file=sys.stderr)
            subprocess.run(
                [*CLI, "synthesize", "--method", method, "--out", str(calib), "--quiet"], check=True
            )
    flags = [
        "--calib",
        str(calib),
        "--target",
        args.target,
        "--min-speedup",
        str(args.min_speedup),
        "--quiet",
    ]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    load = _start_load(args.load_threads)
    rows = []
    try:
        time.sleep(1.0 if load else 0.0)  # the load is running before the first measurement
        for i in range(1, args.runs + 1):
            out = work / f"run{i:02d}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            proc = subprocess.run([*CLI, *flags, "--out", str(out)], capture_output=True, text=True)
            row = _row(i, proc.returncode, time.perf_counter() - t0, out, proc.stderr)
            rows.append(row)
            b1 = row.get("b1", {})
            print(f"run {i}/{args.runs}: exit {proc.returncode}, {row['verdict']}, batch-1 ratio "
                  f"{b1.get('speedup', float('nan')):.2f}× {b1.get('spread')}", file=sys.stderr)  # fmt: skip
    finally:
        _stop(load)
    summary = _summary(rows)
    shown = ["sardfq-export", *flags[:1], "CALIB", *flags[2:], "--out", "DIR"]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": shlex.join(shown),
        "runs": args.runs,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load": f"a {args.load_threads}-thread float32 matmul loop in another process"
        if args.load_threads
        else "none",
        "calib": args.calib,
        "min_speedup": args.min_speedup,
        "target": args.target,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "runs": rows, "summary": summary}, indent=2) + "\n")
    args.md.write_text(_markdown(meta, rows, summary))
    print(f"wrote {args.md} and {args.json}: {summary['verdicts']}", file=sys.stderr)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["decided_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
