"""GPTQ's target on the embedded reference model: the quantized inputs' float output vs the float model's.

    bash tools/dev.sh python bench/reference_gptq_target.py > docs/reference-gptq-target.jsonl

32 real training images and 32 SARDFQ images (seed 0, the model's default iterations), schemes
w4a16 / w4a8 / w4a4 with the product's recipe, GPTQ with ``gptq_target`` 0 (the paper's), 0.25 and 1
(the float model's output; calibrators.gptq, GPTAQ-style); all 10,000 Fashion-MNIST test images:
top-1, logit KL to FP32 and top-1 agreement with FP32. One JSON line per cell (the runner is
bench/reference_gptq_tokens.py's).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from reference_gptq_tokens import sweep  # noqa: E402

if __name__ == "__main__":
    sweep("gptq_target", (0.0, 0.25, 1.0))
