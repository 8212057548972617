"""Reproduce the papers' comparison on our reference model: calibration data vs quantized top-1.

    bash tools/dev.sh python bench/synthesis_table.py [--seeds 0 1 2] [--iters N] [--bf16] ...

For each seed, 32 calibration images from noise / PSAQ-ViT / SARDFQ synthesis and 32 real
Fashion-MNIST *train* images; for each scheme (w8a8, w4a8, w4a4, and w4a4 followed by SARDFQ's
block reconstruction) the fake-quant model is calibrated on them and evaluated on the real
Fashion-MNIST *test* set (10k). The ``psaq2`` row (PSAQ-ViT V2) is the student V2 distills for the
scheme (ranges on its warm-up images, then the teacher-student rounds), evaluated the same way. Then the SARDFQ ablation (APA / MSR / SL on/off). Writes
docs/synthesis-results.md (mean ± std over seeds, the exact command, settings, timings) and a
JSON of every number. Resumable: synthetic sets and per-(set, scheme) results are cached in --work.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sardfq_export.core.calibset import CalibSet  # noqa: E402
from sardfq_export.models import load_model  # noqa: E402
from sardfq_export.synthesis import SynthConfig, synthesize  # noqa: E402

NOTES_MARK = "<!-- notes: kept when the table is regenerated -->"
METHODS = ("noise", "psaq", "psaq2", "sardfq", "real")
ABLATION = [  # (APA, MSR, SL); (1, 1, 1) is the main SARDFQ run
    (a, m, s) for a, m, s in itertools.product((0, 1), repeat=3)
]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded reference model")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument(
        "--iters", type=int, default=None, help="synthesis iterations (default: the methods' 1000)"
    )
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast during synthesis")
    ap.add_argument(
        "--psaq2-rounds", type=int, default=None, help="PSAQ-ViT V2 rounds (default: AdaptiveConfig's)"
    )
    ap.add_argument("--schemes", nargs="+", default=["w8a8", "w4a8", "w4a4"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="rows to run (default: all)")
    ap.add_argument("--recon", nargs="*", default=["w4a4"], help="schemes also run with block reconstruction")
    ap.add_argument("--range", default="mse", help="activation range method of calibrators.calibrate")
    ap.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ablation-seeds", type=int, nargs="*", default=None, help="default: --seeds")
    ap.add_argument(
        "--ablation-iters",
        type=int,
        default=None,
        help="synthesis iterations of the ablation (default: --iters)",
    )
    ap.add_argument("--ablation-schemes", nargs="+", default=["w4a4", "w4a4+recon"])
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument(
        "--samples",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="draw docs/synthesis-samples-{noise,psaq,sardfq}.png from the first seed's sets",
    )
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images only")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--cache-only",
        action="store_true",
        help="write the doc from cached results only; cells with fewer seeds say n=",
    )
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "synthesis")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "synthesis-results.md")
    ap.add_argument(
        "--adopt",
        type=Path,
        default=None,
        help="take the cells of a published results JSON (this command's --out .json) into an empty cache, "
        "when it was made with the same settings: a new row (e.g. --methods psaq2) joins the table "
        "without re-measuring the others",
    )
    return ap.parse_args(argv)


# The settings a cell's value depends on: a published table is adopted only when they all match.
CELL_SETTINGS = ("model", "checkpoint", "seeds", "num_images", "iters", "bf16", "psaq2_rounds", "range",
                 "ablation_seeds", "ablation_iters", "data", "eval_limit")  # fmt: skip


def adopted_cells(published: Path, args: argparse.Namespace, n_test: int) -> dict[str, float]:
    """The cache entries (``Bench.results`` keys) of a table written by this command."""
    import shlex

    pub = json.loads(published.read_text())
    then = parse(shlex.split(pub["command"])[4:])  # "bash tools/dev.sh python bench/synthesis_table.py ..."
    differ = [k for k in CELL_SETTINGS if getattr(then, k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"{published} was made with other settings ({', '.join(differ)}): not adopted")
    bf = int(args.bf16)
    cells = {f"fp|n{n_test}": pub["fp_top1"]}
    for m, by_scheme in pub["main"].items():
        for s, values in by_scheme.items():
            if len(values) != len(args.seeds):  # a partial row: which seeds it holds is not recorded
                continue
            for seed, v in zip(args.seeds, values, strict=True):  # values are in seed order
                tag = (
                    f"psaq2-s{seed}-r{args.psaq2_rounds}-bf{bf}"
                    if m == "psaq2"
                    else f"{m}-s{seed}-i{args.iters}-bf{bf}"
                )
                cells[f"{tag}|{s}|{args.range}|n{n_test}"] = v
    abl_iters = args.ablation_iters if args.ablation_iters is not None else args.iters
    abl_seeds = args.ablation_seeds if args.ablation_seeds is not None else args.seeds
    for flags, by_scheme in pub.get("ablation", {}).items():
        tag = "sardfq" + ("" if flags == "111" else "-" + flags)
        for s, values in by_scheme.items():
            if len(values) != len(abl_seeds):
                continue
            for seed, v in zip(abl_seeds, values, strict=True):
                cells[f"{tag}-s{seed}-i{abl_iters}-bf{bf}|{s}|{args.range}|n{n_test}"] = v
    return cells


class Bench:
    def __init__(self, args: argparse.Namespace):
        from sardfq_export.data import load_dataset

        self.args = args
        self.loaded = load_model(args.model, args.checkpoint)
        self.fp = self.loaded.model
        args.work.mkdir(parents=True, exist_ok=True)
        if not (args.work / ".gitignore").exists():  # a cache, never committed
            (args.work / ".gitignore").write_text("*\n")
        self.results_path = args.work / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        test = load_dataset(args.data, self.loaded.data_config, split="test", limit=args.eval_limit)
        self.test_x, self.test_y = test.take(range(len(test)))
        if args.adopt:
            new = {
                k: v
                for k, v in adopted_cells(args.adopt, args, len(self.test_y)).items()
                if k not in self.results
            }
            self.results.update(new)
            self.save()
            print(f"adopted {len(new)} cells from {args.adopt}", flush=True)
        self.train = load_dataset(args.data, self.loaded.data_config, split="train")
        self.synth_times: dict[str, float] = {}
        if args.adopt:  # the adopted sets' synthesis times, as the published table listed them
            self.synth_times.update(json.loads(args.adopt.read_text()).get("synthesis_wall_s", {}))

    def save(self) -> None:
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, sort_keys=True))
        tmp.replace(self.results_path)

    @torch.inference_mode()
    def top1(self, model: torch.nn.Module) -> float:
        model.eval()
        correct = 0
        for x, y in zip(self.test_x.split(500), self.test_y.split(500), strict=True):
            correct += int((model(x).argmax(-1) == y).sum())
        return 100.0 * correct / len(self.test_y)

    def calib(
        self, method: str, seed: int, flags: tuple[int, int, int] = (1, 1, 1), iters: int | None = None
    ) -> CalibSet:
        a = self.args
        if method == "real":
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(len(self.train), generator=g)[: a.num_images].numpy()
            images, labels = self.train.take(idx)
            return CalibSet(images=images, labels=labels, meta={"method": "real", "seed": seed})
        cfg = SynthConfig(
            method=method,
            num_images=a.num_images,
            seed=seed,
            iters=iters,
            bf16=a.bf16,
            apa=bool(flags[0]),
            msr=bool(flags[1]),
            soft_labels=bool(flags[2]),
        )
        tag = (
            ""
            if flags == (1, 1, 1)
            else "-" + "".join(f"{n}{v}" for n, v in zip(("apa", "msr", "sl"), flags, strict=True))
        )
        out = a.work / f"{method}{tag}-s{seed}-i{iters or 'default'}{'-bf16' if a.bf16 else ''}.safetensors"
        resolved = json.loads(json.dumps(cfg.resolve(self.loaded.family).to_dict()))
        if out.exists():
            calib = CalibSet.load(out)
            if calib.meta.get("config") == resolved:
                self.synth_times[out.stem] = calib.meta.get("wall_time_s", 0.0)
                return calib
        print(f"synthesize {out.name}", flush=True)
        calib = synthesize(self.loaded, cfg, out, resume=True, progress=False)
        self.synth_times[out.stem] = calib.meta["wall_time_s"]
        return calib

    def run(self, key: str, calib_fn, scheme: str) -> float:
        """top-1 of ``scheme`` ('w4a4' or 'w4a4+recon') calibrated on the set; cached by key."""
        from sardfq_export import calibrators

        rkey = f"{key}|{scheme}|{self.args.range}|n{len(self.test_y)}"
        if rkey in self.results:
            return self.results[rkey]
        if self.args.cache_only:
            return None
        calib = calib_fn()
        base, *mods = scheme.split("+")
        recon = "recon" in mods
        t = time.monotonic()
        # "+c": fc2's input centred per channel (QuantizeConfig.centre_fc2, calibrators/centre.py)
        q = calibrators.quantize_model(
            self.fp, calibrators.get_scheme(base).with_options(centre_fc2="c" in mods)
        )
        calibrators.calibrate(q, calib.images, method=self.args.range, progress=False)
        if "bc" in mods:  # "+bc": empirical bias correction (calibrators.bias_correct)
            calibrators.correct_biases(q, self.fp, calib.images)
        if recon:
            calibrators.reconstruct_blocks(q, self.fp, calib, progress=False)
        acc = self.top1(q)
        print(f"{rkey}: {acc:.2f}  ({time.monotonic() - t:.0f} s)", flush=True)
        self.results[rkey] = acc
        self.save()
        return acc

    def run_psaq2(self, seed: int, scheme: str) -> float | None:
        """top-1 of PSAQ-ViT V2's distilled student for ``scheme`` (cached like the other cells).

        Same ranges as the other rows (``--range`` for activations, min-max weights, nearest
        rounding); ``+recon`` reconstructs blocks on V2's images afterwards."""
        import sardfq_export as sx

        a = self.args
        tag = f"psaq2-s{seed}-r{a.psaq2_rounds}-bf{int(a.bf16)}"
        rkey = f"{tag}|{scheme}|{a.range}|n{len(self.test_y)}"
        if rkey in self.results:
            return self.results[rkey]
        if a.cache_only:
            return None
        base, _, recon = scheme.partition("+")
        if recon not in ("", "recon"):
            raise SystemExit(f"psaq2 rows take {base} or {base}+recon, not {scheme}")
        t = time.monotonic()
        print(f"psaq2 {tag} {scheme}", flush=True)
        adapted = sx.psaq2(self.loaded, scheme=base, range=a.range, weight_range="minmax", weight_rounding="nearest",
                           finetune="recon" if recon else "none", seed=seed, num_images=a.num_images,
                           iters=a.psaq2_rounds, synth=SynthConfig(bf16=a.bf16), progress=False,
                           out=a.work / f"{tag}-{scheme}.safetensors", resume=True)  # fmt: skip
        acc = self.top1(adapted.quantized.model)
        self.synth_times[f"{tag}-{scheme}"] = adapted.calib.meta["wall_time_s"]
        print(f"{rkey}: {acc:.2f}  ({time.monotonic() - t:.0f} s)", flush=True)
        self.results[rkey] = acc
        self.save()
        return acc


def fmt(values: list[float], expected: int | None = None) -> str:
    if not values:
        return "–"
    tail = f" (n={len(values)})" if expected is not None and len(values) < expected else ""
    if len(values) == 1:
        return f"{values[0]:.2f}{tail}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}{tail}"


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.monotonic()
    b = Bench(args)
    fp_top1 = b.results.get(f"fp|n{len(b.test_y)}") or b.top1(b.fp)
    b.results[f"fp|n{len(b.test_y)}"] = fp_top1
    b.save()
    schemes = list(args.schemes) + [f"{s}+recon" for s in args.recon]
    main_rows: dict[str, dict[str, list[float]]] = {m: {s: [] for s in schemes} for m in METHODS}
    # Cheap schemes for every seed first, reconstruction after: a stopped run leaves a complete table.
    for pass_schemes in (list(args.schemes), [f"{s}+recon" for s in args.recon]):
        for seed in args.seeds:
            for m in (m for m in METHODS if m in args.methods):
                cache: dict[str, CalibSet] = {}

                def get(m=m, seed=seed, cache=cache):
                    if "c" not in cache:
                        cache["c"] = b.calib(m, seed, iters=args.iters)
                    return cache["c"]

                for s in pass_schemes:
                    if m == "psaq2":  # V2 makes the quantized model itself, not a calibration set
                        v = b.run_psaq2(seed, s)
                    else:
                        v = b.run(f"{m}-s{seed}-i{args.iters}-bf{int(args.bf16)}", get, s)
                    if v is not None:
                        main_rows[m][s].append(v)
    if args.samples:
        from sardfq_export.synthesis.samples import save_samples

        for m in ("noise", "psaq", "sardfq"):
            path = args.out.parent / f"synthesis-samples-{m}.png"
            save_samples(path, b.calib(m, args.seeds[0], iters=args.iters), b.loaded, max_images=16)
            print(f"wrote {path}")
    abl_rows: dict[tuple[int, int, int], dict[str, list[float]]] = {}
    abl_iters = args.ablation_iters if args.ablation_iters is not None else args.iters
    if args.ablation:
        for flags in ABLATION:
            abl_rows[flags] = {s: [] for s in args.ablation_schemes}
            for seed in args.ablation_seeds if args.ablation_seeds is not None else args.seeds:
                cache = {}

                def get(flags=flags, seed=seed, cache=cache):
                    if "c" not in cache:
                        cache["c"] = b.calib("sardfq", seed, flags, iters=abl_iters)
                    return cache["c"]

                tag = "sardfq" + ("" if flags == (1, 1, 1) else "-" + "".join(map(str, flags)))
                for s in args.ablation_schemes:
                    v = b.run(f"{tag}-s{seed}-i{abl_iters}-bf{int(args.bf16)}", get, s)
                    if v is not None:
                        abl_rows[flags][s].append(v)
    write_doc(args, b, fp_top1, schemes, main_rows, abl_rows, time.monotonic() - t_start)


def write_doc(args, b: Bench, fp_top1, schemes, main_rows, abl_rows, elapsed) -> None:
    abl_iters = args.ablation_iters if args.ablation_iters is not None else args.iters
    cmd = "bash tools/dev.sh python bench/synthesis_table.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    iters = args.iters if args.iters is not None else "the methods' defaults (1000)"
    lines = [
        "# Synthetic calibration data vs quantized accuracy (reference model, Fashion-MNIST)",
        "",
        f"Produced by (results and synthetic sets cached in `{args.work}`):",
        "",
        f"    {cmd}",
        "",
        f"- model: {b.loaded.name} ({b.loaded.source}); FP32 top-1 **{fp_top1:.2f}** on the real test set "
        f"(n = {len(b.test_y)})",
        f"- calibration: {args.num_images} images per set; seeds {args.seeds}; synthesis iterations: {iters}"
        f"{'; bf16 autocast' if args.bf16 else ''}; `real` = {args.num_images} random Fashion-MNIST *train* images",
        f"- quantization: `calibrators.quantize_model` + `calibrate(method={args.range!r})`; `+recon` adds "
        "`calibrators.reconstruct_blocks` (block-wise MSE to the FP model, 100 it/block, lr 4e-5); `+c` centres "
        "`mlp.fc2`'s input per channel first (`centre_fc2`, calibrators/centre.py); `+bc` corrects every "
        "quantized Linear's bias after calibration (`calibrators.correct_biases`)",
        "- `psaq2` (PSAQ-ViT V2): not a calibration set but the student `sx.psaq2` distills per scheme "
        "(same ranges, calibrated on its warm-up images, then its teacher-student rounds: "
        f"{args.psaq2_rounds if args.psaq2_rounds is not None else 'the default'}; schedule in "
        "`calibrators.adaptive.AdaptiveConfig`); `+recon` reconstructs blocks on its images afterwards",
        f"- machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"total wall time {elapsed / 60:.1f} min",
        "",
        "## Top-1 (%) on the real test set, mean ± std over seeds",
        "",
        "| calibration data | " + " | ".join(schemes) + " |",
        "|---|" + "---|" * len(schemes),
    ]
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(fmt(main_rows[m][s], len(args.seeds)) for s in schemes) + " |")
    if abl_rows:
        cols = args.ablation_schemes
        ai = abl_iters if abl_iters is not None else "the default (1000)"
        lines += [
            "",
            f"## SARDFQ ablation (top-1 %, mean ± std; {ai} synthesis iterations)",
            "",
            "| APA | MSR | SL | " + " | ".join(cols) + " |",
            "|---|---|---|" + "---|" * len(cols),
        ]
        for flags, row in abl_rows.items():
            marks = " | ".join("✓" if f else "–" for f in flags)
            lines.append(f"| {marks} | " + " | ".join(fmt(row[s]) for s in cols) + " |")
    if b.synth_times:
        lines += ["", "## Synthesis wall time per set (s)", ""]
        for k, v in sorted(b.synth_times.items()):
            lines.append(f"- {k}: {v:.0f}")
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw = args.out.with_suffix(".json")
    raw.write_text(
        json.dumps(
            {
                "command": cmd,
                "fp_top1": fp_top1,
                "main": main_rows,
                "ablation": {"".join(map(str, k)): v for k, v in abl_rows.items()},
                "synthesis_wall_s": b.synth_times,
            },
            indent=1,
            sort_keys=True,
        )
    )
    notes = ""
    if args.out.exists() and NOTES_MARK in args.out.read_text():
        notes = args.out.read_text().split(NOTES_MARK, 1)[1]
    args.out.write_text("\n".join(lines) + "\n" + NOTES_MARK + (notes or "\n"))
    print(f"wrote {args.out} and {raw}")


if __name__ == "__main__":
    main()
