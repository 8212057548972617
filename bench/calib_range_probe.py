"""Why one calibration set beats another: how far its activation ranges are from real data's.

    bash tools/dev.sh python bench/calib_range_probe.py [--scheme w4a4] [--work bench-out/synthesis]

For every cached 1000-iteration set of ``bench/synthesis_table.py`` (noise / psaq / sardfq and the
SARDFQ ablation variants, all seeds) and for 32 real Fashion-MNIST train images per seed, the
scheme's activation quantizers are calibrated (the table's ``mse`` method) and each quantizer's
scale is compared with the real-data scale of the same seed: mean |log2(scale / real scale)| over
the quantizers (0 = same ranges as real data; 1 = a factor of 2 off on average), plus the share of
quantizers whose range is narrower than real data's (those clip real activations). Also the
teacher's mean max-softmax confidence on each set. Prints a markdown table (and JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sardfq_export import calibrators  # noqa: E402
from sardfq_export.core.calibset import CalibSet  # noqa: E402
from sardfq_export.models import load_model  # noqa: E402


def act_scales(fp, images: torch.Tensor, scheme: str, method: str) -> dict[str, float]:
    q = calibrators.quantize_model(fp, scheme)
    calibrators.calibrate(q, images, method=method, progress=False)
    return {
        name: float(qz.scale)
        for name, qz in calibrators.iter_quantizers(q)
        if qz.enabled and qz.scale.numel() == 1 and "weight" not in name and float(qz.scale) > 0
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="w4a4")
    ap.add_argument("--range", default="mse")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "synthesis")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from sardfq_export.data import load_dataset

    loaded = load_model()
    fp = loaded.model
    train = load_dataset("fashion-mnist", loaded.data_config, split="train")
    rows: dict[str, list[dict]] = {}
    for path in sorted(args.work.glob("*-s[0-9]-idefault-bf16.safetensors")):
        name, seed = path.stem.split("-s")[0], int(path.stem.split("-s")[1].split("-")[0])
        g = torch.Generator().manual_seed(seed)  # the table's real images for this seed
        idx = torch.randperm(len(train), generator=g)[:32].numpy()
        real_images, _ = train.take(idx)
        real = act_scales(fp, real_images, args.scheme, args.range)
        calib = CalibSet.load(path)
        got = act_scales(fp, calib.images, args.scheme, args.range)
        logs = [abs(torch.log2(torch.tensor(got[k] / real[k])).item()) for k in real if k in got]
        narrower = sum(got[k] < real[k] for k in real if k in got) / len(logs)
        with torch.no_grad():
            conf = fp(calib.images).softmax(-1).max(-1).values.mean().item()
        rows.setdefault(name, []).append({"seed": seed, "mean_abs_log2": statistics.mean(logs),
                                          "narrower": narrower, "confidence": conf})  # fmt: skip
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        real_images, _ = train.take(torch.randperm(len(train), generator=g)[:32].numpy())
        real_conf = fp(real_images).softmax(-1).max(-1).values.mean().item()
    if args.json:
        print(json.dumps({"rows": rows, "real_confidence": real_conf}, indent=1))
        return 0
    print(f"| calibration set ({args.scheme}, {args.range}) | mean abs log2(scale / real scale) "
          "| quantizers narrower than real | teacher confidence |")  # fmt: skip
    print("|---|---|---|---|")
    for name, rs in rows.items():

        def ms(key, rs=rs):
            v = [r[key] for r in rs]
            return f"{statistics.mean(v):.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")

        print(f"| {name} (n={len(rs)}) | {ms('mean_abs_log2')} | {ms('narrower')} | {ms('confidence')} |")
    print(f"| real (seed 0) | 0 | – | {real_conf:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
