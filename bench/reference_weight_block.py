"""4-bit weight blocks nested on the channel's INT8 step (``--weight-block`` at w4a8 / w4a4) on the
embedded reference model: per channel (0) against blocks of 64 and 128.

    bash tools/dev.sh python bench/reference_weight_block.py > docs/reference-weight-block.jsonl

32 real training images and 32 SARDFQ images (seed 0, the model's default iterations), schemes w4a8
and w4a4 with the product's recipe; all 10,000 Fashion-MNIST test images: top-1, logit KL to FP32
and top-1 agreement with FP32. One JSON line per cell (the runner is bench/reference_gptq_tokens.py's).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from reference_gptq_tokens import sweep  # noqa: E402

if __name__ == "__main__":
    sweep("weight_block", (0, 64, 128), schemes=("w4a8", "w4a4"))
