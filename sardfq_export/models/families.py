"""The model-family registry: what differs between ViT/DeiT and Swin, written once.

A :class:`Family` holds the structural facts every stage needs (which modules are the transformer
blocks, the units of block-wise reconstruction, the classifier heads, prefix tokens, the patch grid)
and the family's synthesis defaults. Stages keep their own per-family *code* (synthesis's explicit
attention forward, calibrators' quantized wrappers) in small dicts keyed by ``Family.name``; they
never test ``isinstance(model, SwinTransformer)`` or ``family == "swin"`` themselves. Adding a
family adds an entry here and one entry in each of those dicts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from sardfq_export.core.errors import UserInputError


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring)."""

    name: str
    description: str
    model_class: Callable[[], type]  # the timm model class (imported lazily)
    attention_class: Callable[[], type]  # the timm attention module every block must have
    blocks: Callable[[nn.Module], list[tuple[str, nn.Module]]]  # transformer blocks, forward order
    recon_units: Callable[[nn.Module], list[str]]  # block-wise reconstruction units, forward order
    heads: tuple[str, ...]  # classifier module names (may be absent)
    prefix_tokens: Callable[[nn.Module], int]  # tokens before the patch tokens (CLS, dist, registers)
    synth_lr: float  # Adam lr of synthesis [paper: PSAQ-ViT code, 0.20 DeiT/ViT, 0.25 Swin]
    # APA weight α [default; the paper uses 1..1e5 per model and does not list them]. A ViT's CLS
    # attention is a probability over N' patches (MSE ~ 1/N'^2); Swin's stitched per-window maps hold
    # mass 1 per window of 49 keys and are summed over many more heads.
    apa_weight: float


def _vit_class() -> type:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def _vit_attention() -> type:
    from timm.layers import Attention

    return Attention


def _swin_class() -> type:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer


def _swin_attention() -> type:
    from timm.models.swin_transformer import WindowAttention

    return WindowAttention


def _vit_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"blocks.{i}", blk) for i, blk in enumerate(model.blocks)]


def _swin_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"layers.{i}.blocks.{j}", blk) for i, stage in enumerate(model.layers)
            for j, blk in enumerate(stage.blocks)]  # fmt: skip


def _swin_units(model: nn.Module) -> list[str]:
    names = []
    for i, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, nn.Identity):  # PatchMerging runs before the stage's blocks
            names.append(f"layers.{i}.downsample")
        names += [f"layers.{i}.blocks.{j}" for j in range(len(stage.blocks))]
    return names


FAMILIES: dict[str, Family] = {
    "vit": Family(
        name="vit",
        description="ViT / DeiT (timm VisionTransformer)",
        model_class=_vit_class,
        attention_class=_vit_attention,
        blocks=_vit_blocks,
        recon_units=lambda m: [n for n, _ in _vit_blocks(m)],
        heads=("head", "head_dist"),
        prefix_tokens=lambda m: int(getattr(m, "num_prefix_tokens", 0)),
        synth_lr=0.20,
        apa_weight=1000.0,
    ),
    "swin": Family(
        name="swin",
        description="Swin (timm SwinTransformer)",
        model_class=_swin_class,
        attention_class=_swin_attention,
        blocks=_swin_blocks,
        recon_units=_swin_units,
        heads=("head.fc",),
        prefix_tokens=lambda m: 0,
        synth_lr=0.25,
        apa_weight=100.0,
    ),
}


def family_of(model: nn.Module) -> Family:
    """The family of ``model``; anything else is refused with a message naming what it is."""
    for fam in FAMILIES.values():
        if isinstance(model, fam.model_class()):
            return fam
    raise UserInputError(
        f"{type(model).__name__} is not a ViT/DeiT/Swin model: sardfq-export quantizes timm "
        "VisionTransformer and SwinTransformer models (e.g. --model deit_s or swin_t)"
    )


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserInputError(f"unknown model family {name!r}: known are {', '.join(FAMILIES)}")
    return FAMILIES[name]
