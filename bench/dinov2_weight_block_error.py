"""How much of 4-bit weight error blocks remove on DINOv2, free and nested on the channel's INT8 step.

    bash tools/dev.sh python bench/dinov2_weight_block_error.py > docs/dinov2-weight-block-error.jsonl

No data: each quantized Linear of blocks 0-9 (w4a8's default leaves 10 and 11 float) gets 4-bit MSE
ranges (calibrators.calibrate_weight, as the product's default ``weight_range``) per output channel,
per free block of 64 / 128 inputs (INT4 blocks: weight-only in TensorRT) and per block nested on the
channel's INT8 step (``--weight-block`` at w4a8: an INT8 GEMM). One JSON line per Linear: its relative
squared error ‖Q(W) − W‖² / ‖W‖² per grid, and the histogram of the nested multiples m = 1..15 (blocks of 128); a
last line sums the relative errors over the Linears.
"""

from __future__ import annotations

import json

import torch
from sardfq_export.calibrators import PerBlock, PerChannel
from sardfq_export.calibrators.calibrate import NEST_MULTIPLES, calibrate_weight
from sardfq_export.calibrators.quantizer import TensorQuantizer

import sardfq_export as sx


def grids(out: int, fan_in: int):
    yield "per_channel", PerChannel(0), (out,)
    for size in (128, 64):
        yield f"free_{size}", PerBlock(size), (out, fan_in // size)
        yield f"nested_{size}", PerBlock(size, nested=True), (out, fan_in // size)


@torch.no_grad()
def main() -> None:
    model = sx.load_model("dinov2_s14_fmnist").model
    total: dict[str, float] = {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, torch.nn.Linear) and name.startswith("blocks.")):
            continue
        if int(name.split(".")[1]) >= 10:
            continue
        w = mod.weight.detach().float()
        row: dict = {"linear": name}
        for tag, gran, shape in grids(*w.shape):
            q = TensorQuantizer(4, gran, shape=shape, role="weight")
            calibrate_weight(q, w, "mse")
            rel = float((q(w) - w).pow(2).sum() / w.pow(2).sum())
            row[tag] = round(rel, 6)
            total[tag] = total.get(tag, 0.0) + rel
            if tag == "nested_128":
                m = (q.scale / (q.scale.amax(1, keepdim=True) / NEST_MULTIPLES)).round().long()
                row["nested_128_m_histogram"] = torch.bincount(m.flatten(), minlength=NEST_MULTIPLES + 1)[
                    1:
                ].tolist()
        print(json.dumps(row), flush=True)
    print(json.dumps({"sum_over_linears": {k: round(v, 4) for k, v in total.items()}}), flush=True)


if __name__ == "__main__":
    main()
