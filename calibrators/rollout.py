"""Which tokens a ViT's Linear inputs matter for: attention rollout to the model's readout.

GPTQ minimizes ``Σ_t ‖(W − Q) x_t‖²`` over every token ``t`` of the calibration images, as if each
token's output error reached the prediction equally. In a ViT with CLS-token pooling it does not:
the head reads one token, so in the last block the patch tokens' outputs of ``attn.proj``,
``mlp.fc1`` and ``mlp.fc2`` are never read at all, and in earlier blocks a token's error reaches the
readout only through the attention that follows it. Attention rollout (Abnar & Zuidema, 2020)
estimates that reach from the float model: each block's head-averaged attention mixed half and
half with the residual identity, rows renormalized, multiplied from the last block back to the
layer. Weighting each token's term of GPTQ's Hessian by it (``calibrators.gptq``, ``tokens=
"rollout"``) spends the rounding's freedom where the prediction looks.

Measured on the DINOv2 ViT-S/14 benchmark, w4a16, GPTQ over 4 views of 32 SARDFQ images, 2,000
test images (docs/dinov2-accuracy.md): drop 10.15 → 4.55 points on one synthetic set and
4.50 → 3.80 on another.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sardfq_export.core.errors import UserInputError

ROLES_AFTER_ATTENTION = ("attn.proj", "mlp.fc1", "mlp.fc2")


def _readout(model: nn.Module, tokens: int, option: str = "--gptq-tokens") -> torch.Tensor:
    """(T,) weights of the final tokens in the prediction: the CLS token, or the mean of the patch
    tokens (timm ``global_pool`` 'token' / 'avg')."""
    pool = getattr(model, "global_pool", None)
    prefix = int(getattr(model, "num_prefix_tokens", 1 if pool == "token" else 0))
    row = torch.zeros(tokens)
    if pool == "token":
        row[0] = 1.0
    elif pool == "avg":
        row[prefix:] = 1.0 / (tokens - prefix)
    else:
        raise UserInputError(
            f"rollout token weights need a timm VisionTransformer pooled by its CLS token or by the "
            f"mean of its tokens (global_pool 'token' or 'avg'), got global_pool={pool!r}: use "
            f"uniform token weights ({option} uniform)"
        )
    return row


def _attention_blocks(model: nn.Module, option: str = "--gptq-tokens") -> list[nn.Module]:
    blocks = list(getattr(model, "blocks", []))
    need = ("qkv", "num_heads", "scale", "q_norm", "k_norm")
    if not blocks or not all(all(hasattr(getattr(b, "attn", None), a) for a in need) for b in blocks):
        raise UserInputError(
            "rollout token weights need a timm VisionTransformer (blocks[i].attn with a fused qkv); "
            "this model has none (Swin's windowed attention is not supported): use uniform token "
            f"weights ({option} uniform)"
        )
    return blocks


@torch.no_grad()
def rollout_token_weights(
    model: nn.Module, images: torch.Tensor, batch_size: int = 32, option: str = "--gptq-tokens"
) -> dict[str, torch.Tensor]:
    """``{"blocks.{i}.{role}": (N, T)}``: each image's token weights at the input of every block
    Linear of the *float* ``model``, scaled to mean 1 per image (so uniform weights are all ones).

    ``attn.qkv``'s tokens pass through their own block's attention; ``attn.proj``, ``mlp.fc1`` and
    ``mlp.fc2`` act after it, so their reach starts at the next block (in the last block: the
    readout itself). The images are the ones the Hessian sees, in the same order.
    """
    blocks = _attention_blocks(model, option)
    # A read-only pre-hook recomputes each block's probabilities from its input: the synthesis
    # Recorder (synthesis.attention) swaps the attention modules for a differentiable explicit
    # forward, which a no-grad pass over the float model does not need.
    probs: list[torch.Tensor] = []

    def grab(attn, args):
        x = args[0]
        b, t, c = x.shape
        head_dim = getattr(attn, "head_dim", c // attn.num_heads)
        qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        probs.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1).double())

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    handles = [blk.attn.register_forward_pre_hook(grab) for blk in blocks]
    out: dict[str, list[torch.Tensor]] = {}
    try:
        for batch in images.split(batch_size):
            probs.clear()
            model(batch.to(device))
            n, t = probs[0].shape[0], probs[0].shape[-1]
            eye = torch.eye(t, dtype=torch.float64, device=device)
            row = _readout(model, t, option).to(device, torch.float64).expand(n, t)
            for i in range(len(blocks) - 1, -1, -1):
                for role in ROLES_AFTER_ATTENTION:
                    out.setdefault(f"blocks.{i}.{role}", []).append(row * t)
                mixed = 0.5 * probs[i] + 0.5 * eye
                row = torch.einsum("bt,bts->bs", row, mixed / mixed.sum(-1, keepdim=True))
                out.setdefault(f"blocks.{i}.attn.qkv", []).append(row * t)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: torch.cat(v).float().cpu() for k, v in out.items()}
