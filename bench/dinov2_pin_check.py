"""Does the DINOv2 model's recipe reproduce its pinned head with the *other* feature precision?

The 112-px build with `--check-recipe` trains its head on this CPU's features (bf16 where the CPU has native bf16, else
fp32) and checks it against the pinned head (sardfq_export/assets/, trained with bf16 features)
before shipping the pinned one (docs/dinov2-model.md, "Pinned head"). This builds the model once
more, in a throw-away cache, with the given feature precision forced, and prints what the check
measured: how often the head trained here agrees with the pinned one on the 10,000 test images.

    nice bash tools/dev.sh python bench/dinov2_pin_check.py --features fp32    # ~15 min on 2 cores (23 on AVX2 only)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", choices=("fp32", "bf16"), required=True)
    a = ap.parse_args(argv)
    downloads = (
        Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "sardfq-export/models/downloads"
    )
    with tempfile.TemporaryDirectory(prefix="dinov2-pin-") as tmp:
        os.environ["XDG_CACHE_HOME"] = tmp
        from sardfq_export.models import dinov2

        if downloads.exists():  # no second download of the 90 MB wheel
            shutil.copytree(downloads, dinov2.cache_root() / "downloads")
        dinov2.feature_precision = lambda: a.features  # what a CPU with (without) native bf16 picks
        bar, dinov2.PIN_MIN_AGREEMENT = dinov2.PIN_MIN_AGREEMENT, 0.0  # measure, then judge against the bar
        folder = dinov2.build(112, progress=True, check_recipe=True)  # the pinned model, recipe re-run
        build = json.loads((folder / "config.json").read_text())["build"]
        out = {
            "features": a.features,
            "pinned": build["head"].get("pinned"),
            "passes_the_build_check": build["head"]["pinned"]["agreement"] >= bar,
            "bar": bar,
            "test_top1": build["test_top1"],
            "build_seconds": round(build["build_seconds"]),
        }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
