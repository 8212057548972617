"""samples.png: a grid of synthetic images; for SARDFQ each image's CLS attention next to its prior.

Drawn with PIL only. Attention and prior share one colour scale per pair, so a person sees both
where APA moved the attention and how closely it matches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sardfq_export.core.calibset import CalibSet
from sardfq_export.core.io import atomic_path

# A perceptual dark→bright ramp (inferno-like anchors), interpolated linearly.
_RAMP = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float32)


def _colormap(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.0, 1.0) * (len(_RAMP) - 1)
    i = np.minimum(v.astype(int), len(_RAMP) - 2)
    f = (v - i)[..., None]
    return ((1 - f) * _RAMP[i] + f * _RAMP[i + 1]).astype(np.uint8)


def _to_pixels(images: torch.Tensor, mean, std) -> np.ndarray:
    """Normalized (N, C, H, W) → uint8 (N, H, W, 3)."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    x = (images.float().cpu() * s + m).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x[:, :3].permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def attention_vs_prior(
    loaded, calib: CalibSet, block: int = -1, head: int = 0
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The recorded APA map and its prior for every image: (N, h, w) each, and the 1-based block.

    Re-runs the teacher on the final images and re-draws the priors from the set's own seed.
    """
    from sardfq_export.models.families import get_family
    from sardfq_export.synthesis.attention import block_infos, prior_attention, recording, token_grids
    from sardfq_export.synthesis.config import SynthConfig
    from sardfq_export.synthesis.methods import apa_blocks
    from sardfq_export.synthesis.plan import draw_priors
    from sardfq_export.synthesis.runner import model_input_size

    cfg = SynthConfig.from_dict(calib.meta["config"])
    model, family = loaded.model, loaded.family
    infos = block_infos(model, family)
    idx = apa_blocks(len(infos), cfg.apa_start)[block]
    dev = next(model.parameters()).device
    grid = token_grids(model, family, model_input_size(loaded), dev)[idx]
    prior = draw_priors(cfg, range(len(calib)), {idx: (infos[idx].heads, grid)})[idx][:, head]
    prefix = get_family(family).prefix_tokens(model)
    with recording(model, family, want_attn=[idx]) as rec, torch.no_grad():
        maps = []
        for b in calib.images.split(32):
            model(b.to(dev))
            a = prior_attention(rec, idx, len(b), prefix)
            maps.append(a[:, head].float().cpu())
    attn = torch.cat(maps)
    attn = attn / attn.sum(-1, keepdim=True)
    return attn.view(-1, *grid), prior.view(-1, *grid), idx + 1


def label_names(loaded) -> list[str] | None:
    """The model's class names: its data config's or timm's ``pretrained_cfg["label_names"]``, else
    ImageNet's (first synonym) for a timm ImageNet classifier; None when it has none."""
    if loaded is None:
        return None
    cfg = getattr(loaded.model, "pretrained_cfg", None) or {}
    names = loaded.data_config.get("label_names") or cfg.get("label_names")
    if names:
        return [str(n) for n in names]
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(loaded.model)
        if subset:
            info = ImageNetInfo(subset)
            return [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]
    except Exception:  # names are a nicety: never fail a picture over them
        pass
    return None


def _class_name(c: int, names) -> str:
    return f"{c} {names[c]}" if names is not None and 0 <= c < len(names) else f"class {c}"


@torch.no_grad()
def captions(calib: CalibSet, loaded=None, n: int | None = None) -> list[tuple[str, bool]]:
    """One caption per image (the first ``n``): the class it was synthesized for (``labels``) with
    its name when the model has ``label_names``, else the teacher's top-1; ``(text, agrees)``,
    where ``agrees`` is False when the teacher's top-1 is another class (named in the text)."""
    n = len(calib) if n is None else min(n, len(calib))
    names = label_names(loaded) or calib.meta.get("label_names")
    top1 = None
    if loaded is not None and n:
        model = loaded.model
        dev = next(model.parameters()).device
        top1 = torch.cat([model(b.to(dev)).argmax(-1).cpu() for b in calib.images[:n].split(32)]).tolist()
    labels = calib.labels[:n].tolist() if calib.labels is not None else None
    out = []
    for i in range(n):
        if labels is None:
            out.append((f"top-1 {_class_name(top1[i], names)}" if top1 is not None else "", True))
        elif top1 is None or top1[i] == labels[i]:
            out.append((_class_name(labels[i], names), True))
        else:
            out.append((f"{_class_name(labels[i], names)} (top-1 {_class_name(top1[i], names)})", False))
    return out


def _fit(draw, text: str, width: int) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels in the default font."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def save_samples(
    path: str | Path, calib: CalibSet, loaded=None, max_images: int = 32, cell: int | None = None
) -> Path:
    """Write the grid to ``path``; with ``loaded`` and an APA run, add attention | prior per image.

    Each image is captioned with its class (:func:`captions`): red when the teacher's top-1 differs.
    """
    from PIL import Image, ImageDraw

    n = min(len(calib), max_images)
    pix = _to_pixels(calib.images[:n], calib.meta.get("mean", (0.5,)), calib.meta.get("std", (0.5,)))
    h = pix.shape[1]
    cell = cell or int(min(128, max(84, h)))
    show_apa = loaded is not None and calib.meta.get("components", {}).get("apa", False)
    tiles = []
    title = f"{calib.meta.get('method', '?')} on {calib.meta.get('model', '?')}: {len(calib)} images, seed {calib.meta.get('seed')}"
    if show_apa:
        attn, prior, blk = attention_vs_prior(loaded, calib.split(n)[0])
        title += f"  |  each: image, CLS attention (block {blk}, head 1), its prior"
    for i in range(n):
        group = [Image.fromarray(pix[i]).resize((cell, cell), Image.NEAREST if h < cell else Image.BILINEAR)]
        if show_apa:
            vmax = float(max(attn[i].max(), prior[i].max())) or 1.0
            for m in (attn[i], prior[i]):
                rgb = _colormap((m / vmax).numpy())
                group.append(Image.fromarray(rgb).resize((cell, cell), Image.NEAREST))
        tiles.append(group)
    caps = captions(calib, loaded, n)
    what = "synthesized for" if calib.labels is not None else "given by the teacher's top-1"
    legend = f"caption: the class each image was {what}" + (
        "; red: the teacher's top-1 is another class" if any(not ok for _, ok in caps) else ""
    )
    per_group = len(tiles[0]) if tiles else 1
    cols = max(1, (12 if show_apa else 8) // per_group)
    rows = -(-n // cols)
    gap, top, label_h = 4, 30, 13
    gw = per_group * cell + (per_group - 1) + gap
    row_h = cell + label_h + gap
    canvas = Image.new("RGB", (cols * gw + gap, top + rows * row_h + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 3), title, fill=(0, 0, 0))
    draw.text((gap, 15), legend, fill=(80, 80, 80))
    for i, group in enumerate(tiles):
        r, c = divmod(i, cols)
        x0, y0 = gap + c * gw, top + r * row_h
        for j, im in enumerate(group):
            canvas.paste(im, (x0 + j * (cell + 1), y0))
        text, ok = caps[i]
        draw.text(
            (x0 + 1, y0 + cell + 1), _fit(draw, text, gw - gap - 2), fill=(0, 0, 0) if ok else (192, 57, 43)
        )
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
