"""Our own explicit attention forward, recording what the synthesis losses read.

timm's attention modules may run fused SDPA and never expose the attention matrix. Instead of
patching timm internals, :func:`recording` swaps each block's ``attn`` module for a small wrapper
that computes ``softmax(q·kᵀ·scale + bias) · v`` itself from the module's public parameters
(``qkv``, ``proj``, norms, relative-position table) and records:

* ``attn[i]``: the post-softmax attention of block ``i`` (B·windows, heads, N, N); for ViT/DeiT
  only the CLS query row (B, heads, 1, N) unless ``full_maps`` is asked for: it is all APA reads;
* ``out[i]``: the softmax·V output of block ``i`` (B·windows, heads, N, head_dim).

Either way only the CLS row is kept for APA. With ``fused`` (the runner's choice on GPUs) ViT/DeiT
blocks run ``scaled_dot_product_attention`` for softmax·V and compute that one row on the side, so
no N×N map is materialized; on CPU the explicit matmuls measured as fast or faster per step.

The wrapper's output equals timm's (tested), so the model's logits are unchanged. The original
modules are put back when the context exits, even on error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from sardfq_export.core.errors import UserInputError
from sardfq_export.models.families import get_family
from sardfq_export.synthesis.patch_matmul import autocast_operands


@dataclass
class BlockInfo:
    """Where a block's attention lives and how to read it back onto the patch grid."""

    index: int  # 0-based block index over the whole network
    heads: int
    window: tuple[int, int] | None = None  # Swin window size; None for global (ViT) attention
    shift: tuple[int, int] = (0, 0)  # Swin cyclic shift of this block
    grid: tuple[int, int] | None = None  # patch grid of the block input (set on every forward)


@dataclass
class Recorder:
    """What one forward recorded, per block index. Which blocks record what is chosen up front."""

    blocks: list[BlockInfo]
    want_attn: set[int] = field(default_factory=set)
    want_out: set[int] = field(default_factory=set)
    fused: bool = True  # ViT: fused SDPA for softmax·V (+ the CLS row alone where APA reads it)
    full_maps: bool = False  # ViT: record the whole N×N map (tests, pictures) instead of the CLS row
    attn: dict[int, torch.Tensor] = field(default_factory=dict)
    out: dict[int, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.attn.clear()
        self.out.clear()

    def keep(self, index: int, attn: torch.Tensor, out: torch.Tensor) -> None:
        """Keep block ``index``'s post-softmax attention and softmax·V output if asked for."""
        if index in self.want_attn:
            self.attn[index] = attn
        if index in self.want_out:
            self.out[index] = out


def _split_qkv(qkv: nn.Linear, x: torch.Tensor, heads: int, head_dim: int):
    """q, k, v as (B, heads, N, head_dim) from three row-slices of the fused qkv Linear.

    Same numbers as timm's ``qkv(x).reshape(...).permute(...).unbind(0)``, but the backward pass
    needs no stack/permute copies of the fused (B, N, 3C) tensor (about half the step time of a
    small ViT on CPU).
    """
    b, n, _ = x.shape
    c = heads * head_dim
    # Cast once, not once per slice: autocast would cast x three times forward and sum three
    # casts' gradients backward.
    x, weight, bias = autocast_operands(x, qkv.weight, qkv.bias)
    out = []
    for i in range(3):
        y = F.linear(x, weight[i * c : (i + 1) * c], None if bias is None else bias[i * c : (i + 1) * c])
        out.append(y.view(b, n, heads, head_dim).transpose(1, 2))
    return out


class _ExplicitViTAttention(nn.Module):
    """Explicit forward of timm's ``Attention`` (ViT/DeiT), recording attn and softmax·V."""

    def __init__(self, inner: nn.Module, info: BlockInfo, rec: Recorder):
        super().__init__()
        self.inner, self.info, self.rec = inner, info, rec

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        m = self.inner
        b, n, _c = x.shape
        gate = m.gate(x).sigmoid() if getattr(m, "gate", None) is not None else None
        q, k, v = _split_qkv(m.qkv, x, m.num_heads, m.head_dim)
        q, k = m.q_norm(q), m.k_norm(k)
        rec, index = self.rec, self.info.index
        if rec.fused and not rec.full_maps and (attn_mask is None or index not in rec.want_attn):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=m.scale)
            row = None
            if index in rec.want_attn:  # the CLS query's row: (B, heads, 1, N)
                row = ((q[:, :, :1] * m.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            rec.keep(index, row, out)
            return self._project(out, b, n, gate)
        logits = (q * m.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            logits = (
                logits + attn_mask
                if attn_mask.dtype != torch.bool
                else logits.masked_fill(~attn_mask, float("-inf"))
            )
        attn = logits.softmax(dim=-1)
        out = attn @ v
        rec.keep(index, attn if rec.full_maps else attn[:, :, :1], out)
        return self._project(out, b, n, gate)

    def _project(self, out: torch.Tensor, b: int, n: int, gate: torch.Tensor | None) -> torch.Tensor:
        m = self.inner
        y = out.transpose(1, 2).reshape(b, n, m.num_heads * m.head_dim)
        y = m.norm(y) if hasattr(m, "norm") else y
        if gate is not None:
            y = y * gate
        return m.proj(y)


class _ExplicitWindowAttention(nn.Module):
    """Explicit forward of timm's Swin ``WindowAttention`` (relative-position bias + shift mask)."""

    def __init__(self, inner: nn.Module, info: BlockInfo, rec: Recorder):
        super().__init__()
        self.inner, self.info, self.rec = inner, info, rec

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        m = self.inner
        b_, n, _c = x.shape
        q, k, v = _split_qkv(m.qkv, x, m.num_heads, m.qkv.out_features // (3 * m.num_heads))
        logits = (q * m.scale) @ k.transpose(-2, -1)
        area = n
        bias = m.relative_position_bias_table[m.relative_position_index.view(-1)].view(area, area, -1)
        logits = logits + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            logits = logits.view(-1, nw, m.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            logits = logits.view(-1, m.num_heads, n, n)
        attn = logits.softmax(dim=-1)
        out = attn @ v
        self.rec.keep(self.info.index, attn, out)
        return m.proj(out.transpose(1, 2).reshape(b_, n, -1))


def _blocks(model: nn.Module, family: str) -> list[nn.Module]:
    return [blk for _, blk in get_family(family).blocks(model)]


def _vit_info(i: int, blk: nn.Module) -> BlockInfo:
    return BlockInfo(i, blk.attn.num_heads)


def _swin_info(i: int, blk: nn.Module) -> BlockInfo:
    return BlockInfo(i, blk.attn.num_heads, tuple(blk.window_size), tuple(blk.shift_size))


def _swin_grid_hook(blk: nn.Module, info: BlockInfo):
    def grab(_mod, args):  # Swin blocks take x as (B, H, W, C)
        info.grid = (int(args[0].shape[1]), int(args[0].shape[2]))

    return blk.register_forward_pre_hook(grab)


# Per-family code of this stage (the facts are in models.families): how a block's attention is
# described, which explicit forward replaces it, and how the block's token grid is learned.
_FAMILY_CODE = {
    "vit": (_vit_info, lambda orig, info, rec: _ExplicitViTAttention(orig, info, rec), None),
    "swin": (_swin_info, lambda orig, info, rec: _ExplicitWindowAttention(orig, info, rec), _swin_grid_hook),
}


def block_infos(model: nn.Module, family: str) -> list[BlockInfo]:
    """One :class:`BlockInfo` per transformer block, in network order (no forward needed)."""
    fam = get_family(family)
    attention = fam.attention_class()
    describe = _FAMILY_CODE[fam.name][0]
    infos = []
    for i, blk in enumerate(_blocks(model, family)):
        attn = getattr(blk, "attn", None)
        if type(attn) is not attention:
            raise UserInputError(
                f"block {i} has attention of type {type(attn).__name__}: synthesis reads the attention of "
                f"{fam.description} blocks only ({attention.__name__})"
            )
        infos.append(describe(i, blk))
    return infos


@contextmanager
def recording(
    model: nn.Module, family: str, want_attn=(), want_out=(), *, fused: bool = True, full_maps: bool = False
) -> Iterator[Recorder]:
    """Swap in the explicit attention for the duration of the context; yields the :class:`Recorder`."""
    blocks = _blocks(model, family)
    rec = Recorder(block_infos(model, family), set(want_attn), set(want_out), fused, full_maps)
    originals = [blk.attn for blk in blocks]
    hooks = []
    try:
        _, explicit, grid_hook = _FAMILY_CODE[get_family(family).name]
        for blk, info, orig in zip(blocks, rec.blocks, originals, strict=True):
            blk.attn = explicit(orig, info, rec)
            if grid_hook is not None:
                hooks.append(grid_hook(blk, info))
        yield rec
    finally:
        for h in hooks:
            h.remove()
        for blk, orig in zip(blocks, originals, strict=True):
            blk.attn = orig


def cls_attention(rec: Recorder, index: int, batch: int, num_prefix: int) -> torch.Tensor:
    """ViT: the CLS row over the patch tokens (CLS→prefix entries dropped): (batch, heads, N').

    Works on the recorded CLS row (B, heads, 1, N) as on a full map (B, heads, N, N)."""
    return rec.attn[index][:batch, :, 0, num_prefix:]


def swin_key_attention(rec: Recorder, index: int, batch: int) -> torch.Tensor:
    """Swin: query-averaged attention each key receives per window, stitched back to the stage grid.

    Returns (batch, heads, H·W) in the block's (unshifted) patch order; every window contributes
    mass 1 per head, so the map sums to the number of windows.
    """
    info = rec.blocks[index]
    if info.grid is None:
        raise RuntimeError("swin_key_attention needs a forward inside recording() first")
    h, w = info.grid
    wh, ww = info.window
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww  # padded to whole windows, as timm does
    nwh, nww = hp // wh, wp // ww
    a = rec.attn[index][: batch * nwh * nww].mean(dim=-2)  # (batch·nW, heads, wh·ww)
    heads = a.shape[1]
    a = a.view(batch, nwh, nww, heads, wh, ww).permute(0, 3, 1, 4, 2, 5).reshape(batch, heads, hp, wp)
    a = a[:, :, :h, :w]
    if any(info.shift):
        a = torch.roll(a, shifts=info.shift, dims=(2, 3))
    return a.reshape(batch, heads, h * w)


def prior_attention(rec: Recorder, index: int, batch: int, num_prefix: int) -> torch.Tensor:
    """The attention map APA aligns with its prior, (batch, heads, patches): a ViT's CLS row over
    the patch tokens, Swin's per-key attention stitched back to the stage grid."""
    if rec.blocks[index].window is None:
        return cls_attention(rec, index, batch, num_prefix)
    return swin_key_attention(rec, index, batch)


def token_grids(
    model: nn.Module, family: str, input_size: tuple[int, int, int], device
) -> list[tuple[int, int]]:
    """Patch grid each block sees (one tiny forward: Swin's grids shrink stage by stage)."""
    with recording(model, family) as rec, torch.no_grad():
        model(torch.zeros(1, *input_size, device=device))
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        return [info.grid or tuple(int(v) for v in grid) for info in rec.blocks]


def tokens_for_similarity(
    rec: Recorder, index: int, family: str, batch: int, num_prefix: int
) -> torch.Tensor:
    """Head-averaged softmax·V tokens for PSE: (batch, groups, tokens, dim).

    ViT: one group of the patch tokens (prefix tokens dropped). Swin: one group per window
    (similarities are taken inside windows, where tokens interact) [default].
    """
    out = rec.out[index].mean(dim=1)  # (B·nW, N, d)
    if rec.blocks[index].window is None:  # global attention (ViT): one group, prefix tokens dropped
        return out[:batch, num_prefix:].unsqueeze(1)
    return out.reshape(batch, -1, out.shape[-2], out.shape[-1])
