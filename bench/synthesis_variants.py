"""Seconds per SARDFQ iteration for the attention path and precision choices (benchmark, not a test).

    bash tools/dev.sh python bench/synthesis_variants.py [--models reference,deit_tiny_patch16_224] [--compile]

For each model (batch 32; ``reference`` = the embedded model, others random-init timm at their
default size): fused SDPA vs explicit attention matmuls (``recording(fused=...)``, the runner's
switch), each in fp32 and with bf16 autocast. ``--compile`` adds bf16 with the teacher wrapped in
``torch.compile`` and reports its compile time (the first timed iteration). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sardfq_export.synthesis.methods as methods  # noqa: E402
import sardfq_export.synthesis.runner as runner  # noqa: E402
from sardfq_export.models import load_model  # noqa: E402
from sardfq_export.synthesis import SynthConfig, synthesize  # noqa: E402


def _load(name: str):
    if name == "reference":
        return load_model()
    torch.manual_seed(0)
    return load_model(name, pretrained=False)


def seconds_per_iter(loaded, iters: int, bf16: bool, fused: bool, compiled: bool = False) -> dict:
    stamps: list[float] = []
    original_recording, original_init = runner.recording, methods.Objective.__init__

    def forced(*args, **kwargs):  # overrides the runner's own device-based choice
        return original_recording(*args, **{**kwargs, "fused": fused})

    runner.recording = forced
    if compiled:
        cache: dict = {}

        def init(self, model, *args, **kwargs):
            original_init(self, model, *args, **kwargs)
            self.model = cache.setdefault("m", torch.compile(model))

        methods.Objective.__init__ = init
    try:
        cfg = SynthConfig(method="sardfq", num_images=32, seed=0, iters=iters + 2, bf16=bf16)
        start = time.perf_counter()
        synthesize(
            loaded, cfg, None, progress=False, callback=lambda b, i: stamps.append(time.perf_counter())
        )
    finally:
        runner.recording, methods.Objective.__init__ = original_recording, original_init
    return {
        "s_per_iter": (stamps[-1] - stamps[1]) / (len(stamps) - 2),  # after 2 warm-up iterations
        "first_iter_s": stamps[0] - start,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="reference,deit_tiny_patch16_224")
    ap.add_argument("--iters", default="20,4", help="timed iterations per model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {}
    for name, iters in zip(args.models.split(","), map(int, args.iters.split(",")), strict=True):
        loaded = _load(name)
        rows = {}
        for fused in (False, True):
            for bf16 in (False, True):
                key = f"{'fused' if fused else 'explicit'}_{'bf16' if bf16 else 'fp32'}"
                rows[key] = seconds_per_iter(loaded, iters, bf16, fused)
                print(name, key, f"{rows[key]['s_per_iter']:.3f} s/it", file=sys.stderr, flush=True)
        if args.compile:
            rows["explicit_bf16_compiled"] = seconds_per_iter(loaded, iters, True, False, compiled=True)
        out[name] = rows
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
