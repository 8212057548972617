"""How close the CPU's and a GPU's build of one recipe are (the thresholds of the gpu-marked tests in
tests/test_runtime.py come from this), on a random-init tiny ViT and noise images:

    python bench/gpu_build_match.py          # on a GPU host, from outside the checkout (see docs/gpu-check.md)

1. w8a8 + 5 block-reconstruction steps, 8 and 64 images, fine-tuning precision auto / fp32, cuDNN
   TF32 on / off: argmax agreement, min logit cosine, max relative scale difference, and the CPU
   model's smallest top-2 logit margin (why argmax agreement measures ties here, not the build).
2. The product's other recipes (SmoothQuant, auto-keep-fp, recon + KD, KD): min logit cosine, and
   which Linears each build kept float.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import tiny_vit  # noqa: E402

import sardfq_export as sx  # noqa: E402


def _cosine(
    a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    with torch.no_grad():
        za, zb = a(x), b(x)
    return za, zb, torch.nn.functional.cosine_similarity(za, zb).min().item()


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    torch.manual_seed(0)
    model = tiny_vit()
    for n in (8, 64):
        cal = sx.synthesize(model, method="noise", num_images=n, progress=False, device="cpu")
        for prec in ("auto", "fp32"):
            for tf32 in (True, False):
                torch.backends.cudnn.allow_tf32 = tf32
                torch.backends.cuda.matmul.allow_tf32 = False
                kw = dict(scheme="w8a8", finetune="recon", iters=5, progress=False, precision=prec)
                c = sx.quantize(model, cal, device="cpu", **kw)
                g = sx.quantize(model, cal, device="cuda", **kw)
                a, b, cos = _cosine(c.model, g.model, cal.images)
                agree = (a.argmax(1) == b.argmax(1)).float().mean().item()
                sc, sg = c.model.state_dict(), g.model.state_dict()
                rel = max(((sc[k] - sg[k]).abs() / sc[k].abs().clamp(min=1e-12)).max().item()
                          for k in sc if k.endswith(".scale") and sc[k].numel())  # fmt: skip
                top2 = a.topk(2, 1).values
                print(f"n={n} precision={prec} cudnn_tf32={tf32}: agreement {agree:.4f}, min logit cosine "
                      f"{cos:.6f}, max scale rel diff {rel:.2e}, cpu min top-2 margin "
                      f"{(top2[:, 0] - top2[:, 1]).min().item():.4f}", flush=True)  # fmt: skip
    cal = sx.synthesize(model, method="noise", num_images=16, progress=False, device="cpu")
    for recipe in ({"scheme": "w8a8", "smoothquant": 0.8, "smooth_fc2": True}, {"scheme": "w4a8", "auto_keep_fp": 0.99},
                   {"scheme": "w8a8", "finetune": "recon+kd", "iters": 5}, {"scheme": "w8a8", "finetune": "kd", "iters": 5}):  # fmt: skip
        c = sx.quantize(model, cal, progress=False, device="cpu", **recipe)
        g = sx.quantize(model, cal, progress=False, device="cuda", **recipe)
        print(recipe, f"min logit cosine {_cosine(c.model, g.model, cal.images)[2]:.5f}, kept float: cpu",
              list(c.scheme.keep_fp), "gpu", list(g.scheme.keep_fp), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
