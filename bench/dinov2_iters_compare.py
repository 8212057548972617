"""SARDFQ synthesis iterations on the DINOv2 benchmark model: 100 vs 200, side by side.

    bash tools/dev.sh python bench/dinov2_iters_compare.py          # after the two table runs below

The cells come from two runs of ``bench/dinov2_table.py`` that differ only in ``--iters`` (same
seeds, calibration size, recipes and test images), seed by seed so that a stopped run leaves pairs:

    for seed in 0 1 2; do
      nice bash tools/dev.sh python bench/dinov2_table.py --seeds $seed --only fp32 "ours w8a8 sardfq" "ours w8a8+sq sardfq" \\
          --iters 100 --limit 2000 --cache ~/.cache/sardfq-export/bench-dinov2-it100-l2000 \\
          --doc docs/dinov2-iters100-limit2000.md --json docs/dinov2-iters100-limit2000.json
      (the same with --iters 200, --cache ~/.cache/sardfq-export/bench-dinov2-l2000,
       --doc docs/dinov2-iters200-limit2000.md --json docs/dinov2-iters200-limit2000.json)
    done

(Both runs and the full table keep calibration sets in one ``--calib-cache``, so the full table reuses
the 200-iteration sets; the file names carry the iteration count.)

This script reads the two JSON files and writes docs/dinov2-iterations.md: per recipe and seed,
deployed and fake-quant top-1, agreement with FP32, and the synthesis wall time, then the seed
means and the paired difference (200 − 100) with its spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROWS = ("w8a8", "w8a8+sq")
NOTES = "<!-- notes (not written by the script) -->"


def cells(path: Path) -> dict[tuple[str, int], dict]:
    """(recipe row, seed) → cell, of the run's own iteration count and test-set size only."""
    doc = json.loads(path.read_text())
    meta = doc["meta"]
    return {
        (r["row"], r["seed"]): r
        for r in doc["rows"]
        if r.get("kind") == "ours" and r.get("calib") == "sardfq" and not r.get("synth")
        and r.get("iters") == meta["iters"] and r.get("limit") == meta["limit"]
    }  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, default=Path("docs/dinov2-iters100-limit2000.json"))
    ap.add_argument("--b", type=Path, default=Path("docs/dinov2-iters200-limit2000.json"))
    ap.add_argument("--out", type=Path, default=Path("docs/dinov2-iterations.md"))
    a = ap.parse_args(argv)
    ja, jb = json.loads(a.a.read_text()), json.loads(a.b.read_text())
    ia, ib = ja["meta"]["iters"], jb["meta"]["iters"]
    ca, cb = cells(a.a), cells(a.b)
    fp = next((r["top1"] for r in jb["rows"] + ja["rows"] if r.get("kind") == "fp32"), None)
    if fp is None:
        raise SystemExit(
            f"no fp32 cell in {a.b} or {a.a}: run the table with --only fp32 (cached logits: seconds)"
        )
    lines = [
        f"# SARDFQ synthesis iterations on DINOv2 ViT-S/14 (112 px): {ia} vs {ib}",
        "",
        "Command (after the two `bench/dinov2_table.py` runs in its docstring):",
        "",
        "    bash tools/dev.sh python bench/dinov2_iters_compare.py",
        "",
        f"32 SARDFQ images per seed, the first {jb['meta']['limit']} Fashion-MNIST test images (FP32 "
        f"{100 * fp:.2f}%), deployed = ONNX Runtime. Sources: [{a.a.name}]({a.a.name}), [{a.b.name}]({a.b.name}).",
        "",
        f"| recipe | seed | deployed top-1, {ia} it | {ib} it | fake-quant {ia} | {ib} | agreement vs FP32 {ia} | {ib} "
        f"| synthesis s {ia} | {ib} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    diffs: dict[str, list[float]] = {}
    for row in ROWS:
        for seed in sorted({s for (r, s) in ca if r == row} & {s for (r, s) in cb if r == row}):
            x, y = ca[(row, seed)], cb[(row, seed)]
            diffs.setdefault(row, []).append(100 * (y["deployed_top1"] - x["deployed_top1"]))
            lines.append(
                f"| {row} | {seed} | {100 * x['deployed_top1']:.2f} | {100 * y['deployed_top1']:.2f} "
                f"| {100 * x['fakequant_top1']:.2f} | {100 * y['fakequant_top1']:.2f} "
                f"| {100 * x['agreement_fakequant_vs_fp32']:.2f}% | {100 * y['agreement_fakequant_vs_fp32']:.2f}% "
                f"| {x['calib_wall_time_s'] or 0:.0f} | {y['calib_wall_time_s'] or 0:.0f} |"
            )
    lines += ["", "(synthesis s: the wall time of that set's run on the shared machine, under whatever else ran "
              "or paused it; not a speed measurement: step times are in docs/performance.md.)"]  # fmt: skip
    lines += ["", f"Paired difference of deployed top-1 ({ib} − {ia} iterations), points:", ""]
    for row, d in diffs.items():
        spread = f", range {min(d):+.2f} to {max(d):+.2f}" if len(d) > 1 else ""
        lines.append(f"- {row}: mean {statistics.mean(d):+.2f} over {len(d)} seed(s){spread}")
    if not diffs:
        lines.append("- no seed has both cells yet")
    lines.append("")
    notes = ""  # a hand-written reading below the marker survives a rerun
    if a.out.exists() and NOTES in a.out.read_text():
        notes = NOTES + a.out.read_text().split(NOTES, 1)[1]
    a.out.write_text("\n".join(lines) + notes)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
