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


def save_samples(
    path: str | Path, calib: CalibSet, loaded=None, max_images: int = 32, cell: int | None = None
) -> Path:
    """Write the grid to ``path``; with ``loaded`` and an APA run, add attention | prior per image."""
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
    per_group = len(tiles[0]) if tiles else 1
    cols = max(1, (12 if show_apa else 8) // per_group)
    rows = -(-n // cols)
    gap, top = 4, 18
    gw = per_group * cell + (per_group - 1) + gap
    canvas = Image.new("RGB", (cols * gw + gap, top + rows * (cell + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 3), title, fill=(0, 0, 0))
    for i, group in enumerate(tiles):
        r, c = divmod(i, cols)
        x0, y0 = gap + c * gw, top + r * (cell + gap)
        for j, im in enumerate(group):
            canvas.paste(im, (x0 + j * (cell + 1), y0))
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
