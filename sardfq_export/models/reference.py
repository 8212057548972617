"""The embedded reference model: a DeiT-style timm ViT trained on Fashion-MNIST.

It is what ``--model`` means when omitted: it works offline, in seconds, and has real accuracy
on real data (the model card next to the weights says how it was trained and what it reached).
Retrain with ``python tools/train_reference.py`` (deterministic on a given machine).
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from sardfq_export.data import FASHION_MNIST_CLASSES

REFERENCE_NAME = "reference"
# Synthesis iterations when --iters is not given, for this model only (ImageNet ViTs keep the
# methods' 1000). On this 28×28, 49-patch model 200 iterations calibrate the deployable schemes as
# well as 1000 (SARDFQ w8a8 89.46 vs 89.43, w4a4 88.48 vs 88.43, 3 seeds, 10k test images:
# docs/synthesis-results-200it.md vs docs/synthesis-results.md) and the offline main job takes ~80 s.
SYNTH_ITERS = 200
ASSETS = Path(__file__).resolve().parents[1] / "assets"
WEIGHTS = ASSETS / "reference_vit.safetensors"
CARD = ASSETS / "reference_vit.md"

# Fashion-MNIST train-split statistics (computed by tools/train_reference.py).
MEAN, STD = (0.2860,), (0.3530,)

# A timm VisionTransformer config: CLS token + token pooling (DeiT-style), 1-channel 28x28 input.
ARCH = dict(
    img_size=28,
    patch_size=4,
    in_chans=1,
    num_classes=10,
    embed_dim=128,
    depth=6,
    num_heads=4,
    mlp_ratio=2.0,
    class_token=True,
    global_pool="token",
)

PRETRAINED_CFG = dict(
    input_size=(1, 28, 28),
    mean=MEAN,
    std=STD,
    interpolation="bilinear",
    crop_pct=1.0,
    num_classes=10,
    label_names=FASHION_MNIST_CLASSES,
)


def build_reference(drop_path_rate: float = 0.0) -> nn.Module:
    """The reference architecture with random weights and its preprocessing attached."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**ARCH, drop_path_rate=drop_path_rate)
    model.pretrained_cfg = dict(PRETRAINED_CFG, architecture="vit_fmnist_reference")
    model.default_cfg = model.pretrained_cfg
    return model
