"""Instrumentation: a float timm ViT/DeiT/Swin → its fake-quant copy, as the scheme says.

Handled (exact types, not subclasses, so an overridden forward is never silently kept in float):
``VisionTransformer`` (incl. ``VisionTransformerDistilled``, LayerScale, register/prefix tokens)
with ``Block`` + ``Attention`` + ``Mlp``; ``SwinTransformer`` with ``SwinTransformerBlock`` +
``WindowAttention`` (relative position bias, shift masks) + ``Mlp``, and ``PatchMerging``.
Anything else inside a block (or an attention-pooling head) raises ``UnsupportedModelError``
naming the module and its type.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterator

import torch.nn as nn
from sardfq_export.calibrators.modules import (
    QuantAttention,
    QuantBlock,
    QuantConv2d,
    QuantLinear,
    QuantSwinBlock,
    QuantWindowAttention,
)
from sardfq_export.calibrators.quantizer import TensorQuantizer
from sardfq_export.calibrators.scheme import Scheme, get_scheme
from timm.layers import LayerScale, Mlp, PatchEmbed
from timm.layers.attention import Attention
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block

from sardfq_export.core.errors import UserInputError
from sardfq_export.models.families import Family, family_of


class UnsupportedModelError(UserInputError):
    """The model holds a module type calibrators cannot quantize faithfully."""


# Block type → (its attention type, the attention's quantized class, the block's residual-quant class)
BLOCK_HANDLERS: dict[type, tuple[type, type, type]] = {
    Block: (Attention, QuantAttention, QuantBlock),
    SwinTransformerBlock: (WindowAttention, QuantWindowAttention, QuantSwinBlock),
}
# Leaf modules that may sit in a block next to the Linears (no weights to quantize, or handled).
SAFE_LEAVES = (
    nn.Linear, nn.LayerNorm, nn.Identity, nn.Dropout, nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid,
    nn.Softmax, LayerScale, Mlp,
)  # fmt: skip


def _is_plain_activation(m: nn.Module) -> bool:
    """A parameter-free torch activation (GELU(tanh), Hardswish...): nothing to quantize in it."""
    return type(m).__module__ == "torch.nn.modules.activation" and not any(True for _ in m.parameters())


def _check_block(name: str, block: nn.Module) -> None:
    if type(block) not in BLOCK_HANDLERS:
        raise UnsupportedModelError(
            f"block {name} is a {type(block).__module__}.{type(block).__name__}, which calibrators does "
            f"not quantize (handled: {', '.join(t.__name__ for t in BLOCK_HANDLERS)}); refusing to leave it in float"
        )
    attn_type = BLOCK_HANDLERS[type(block)][0]
    for sub_name, sub in block.named_modules():
        if not sub_name:
            continue
        path = f"{name}.{sub_name}"
        if isinstance(sub, (Attention, WindowAttention)) or sub_name == "attn":
            if type(sub) is not attn_type:
                raise UnsupportedModelError(
                    f"{path} is a {type(sub).__name__}: calibrators handles {attn_type.__name__} in "
                    f"{type(block).__name__}; refusing to leave it in float"
                )
            continue
        if sub_name.startswith("attn."):
            continue  # the attention's own children (qkv, proj, norms) are handled with it
        if type(sub) in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
            continue  # containers: their children are checked one by one
        if type(sub) in SAFE_LEAVES or isinstance(sub, nn.LayerNorm) or type(sub).__name__ == "DropPath":
            continue
        if _is_plain_activation(sub):
            continue
        raise UnsupportedModelError(
            f"{path} is a {type(sub).__module__}.{type(sub).__name__} inside {type(block).__name__}, which "
            "calibrators does not quantize; refusing to leave it in float"
        )


def kept_float(name: str, scheme: Scheme) -> bool:
    """Whether the Linear ``name`` stays float (it matches one of the scheme's keep_fp globs)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in scheme.keep_fp)


def _convert_block(name: str, block: nn.Module, scheme: Scheme) -> None:
    _, _, residual_cls = BLOCK_HANDLERS[type(block)]
    quant_attn_cls = BLOCK_HANDLERS[type(block)][1]
    for sub_name, sub in list(block.named_modules()):
        if type(sub) is nn.Linear and not kept_float(f"{name}.{sub_name}", scheme):
            QuantLinear.convert(sub, scheme, f"{name}.{sub_name}")
            if (scheme.smooth_explicit or scheme.awq) and sub_name == "mlp.fc2":
                sub.add_input_smoothing()
            if scheme.centre_fc2 and sub_name == "mlp.fc2":
                sub.add_input_shift()
    quant_attn_cls.convert(block.attn, scheme, f"{name}.attn")
    if scheme.quantize_residual:
        residual_cls.convert(block, scheme, name)


def _family(model: nn.Module) -> Family:
    try:
        return family_of(model)
    except UserInputError:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a timm VisionTransformer/SwinTransformer: calibrators quantizes "
            "ViT, DeiT and Swin models"
        ) from None


def block_names(model: nn.Module) -> list[str]:
    """Names of the transformer blocks (and Swin PatchMerging layers) in forward order.

    Running these modules one after the other maps the first one's input to the last one's
    output: the units of block-wise reconstruction.
    """
    return _family(model).recon_units(model)


def _vit_extras(model: nn.Module, scheme: Scheme | None) -> None:
    """ViT: an attention-pooling head would stay float."""
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError(
            f"attn_pool ({type(model.attn_pool).__name__}, global_pool='map') is not handled by calibrators"
        )


def _swin_extras(model: nn.Module, scheme: Scheme | None) -> None:
    """Swin: PatchMerging's reduction Linear between stages (checked; quantized when ``scheme``)."""
    for i, stage in enumerate(model.layers):
        ds = stage.downsample
        if not isinstance(ds, (nn.Identity, PatchMerging)) or (
            isinstance(ds, PatchMerging) and type(ds.reduction) is not nn.Linear
        ):
            raise UnsupportedModelError(
                f"layers.{i}.downsample is a {type(ds).__name__}, not handled by calibrators"
            )
        where = f"layers.{i}.downsample.reduction"
        if scheme is not None and isinstance(ds, PatchMerging) and not kept_float(where, scheme):
            QuantLinear.convert(ds.reduction, scheme, where)


# This stage's per-family code (the structural facts live in models.families): what besides the
# blocks must be checked, and quantized, for each family.
FAMILY_EXTRAS = {"vit": _vit_extras, "swin": _swin_extras}


def check_model(model: nn.Module) -> None:
    """Raise UnsupportedModelError if anything in ``model`` would stay float against the scheme."""
    fam = _family(model)
    FAMILY_EXTRAS[fam.name](model, None)
    for name, blk in fam.blocks(model):
        _check_block(name, blk)


def _heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for n in _family(model).heads:
        try:
            m = model.get_submodule(n)
        except AttributeError:
            continue
        if isinstance(m, nn.Linear):
            out.append((n, m))
        elif not isinstance(m, nn.Identity):
            raise UnsupportedModelError(f"head {n} is a {type(m).__name__}, not handled by calibrators")
    return out


def quantize_model(model: nn.Module, scheme: Scheme | str | None = None) -> nn.Module:
    """The fake-quant copy of ``model`` for ``scheme`` (uncalibrated: it still computes float).

    ``model`` itself is untouched. The copy carries ``.scheme`` and the fingerprint of the float
    model it came from (checked again by :func:`calibrators.load_quantized`).
    """
    from sardfq_export.calibrators.persist import model_fingerprint

    scheme = get_scheme(scheme)
    check_model(model)
    fingerprint = model_fingerprint(model)
    qmodel = copy.deepcopy(model)
    fam = _family(qmodel)
    FAMILY_EXTRAS[fam.name](qmodel, scheme)
    for name, blk in fam.blocks(qmodel):
        _convert_block(name, blk, scheme)
    if scheme.quantize_patch_embed:
        pe = qmodel.patch_embed
        if type(pe) is not PatchEmbed or type(pe.proj) is not nn.Conv2d:
            raise UnsupportedModelError(
                f"patch_embed is a {type(pe).__name__}: only timm PatchEmbed (Conv2d) is handled"
            )
        QuantConv2d.convert(pe.proj, scheme, "patch_embed.proj")
    if scheme.quantize_head:
        for n, m in _heads(qmodel):
            QuantLinear.convert(m, scheme, n)
    _check_keep_fp(model, scheme)
    # The new quantizers' buffers are made on the CPU: they go where the weights are (a model being
    # quantized on a GPU mixed devices here; found by bench/gpu_check.sh on an H200).
    weight = next(qmodel.parameters(), None)
    if weight is not None:
        qmodel.to(weight.device)
    qmodel.scheme = scheme
    qmodel.sardfq_quant = {"fingerprint": fingerprint, "modified": set(), "calibration": {}}
    qmodel.eval()
    return qmodel


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the Linears a scheme quantizes in ``model`` (blocks, Swin merges), forward order."""
    fam = _family(model)
    names = [
        f"{b}.{n}" for b, blk in fam.blocks(model) for n, m in blk.named_modules() if type(m) is nn.Linear
    ]
    if fam.name == "swin":
        names += [f"layers.{i}.downsample.reduction" for i, st in enumerate(model.layers)
                  if isinstance(st.downsample, PatchMerging)]  # fmt: skip
    return names


def _check_keep_fp(model: nn.Module, scheme: Scheme) -> None:
    """A keep_fp pattern that matches no quantizable Linear is a typo: say so, with real names."""
    if not scheme.keep_fp:
        return
    names = quantizable_linears(model)
    for pattern in scheme.keep_fp:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise UserInputError(
                f"--keep-fp {pattern!r} matches no quantized Linear of this model (names look like "
                f"{', '.join(names[:4])}; globs such as 'blocks.11.*' or '*.fc2')"
            )


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    """Every TensorQuantizer in ``model`` with its qualified name, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            yield name, m


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    """Off: every quantizer off (the model computes exactly the float model). On: back to what
    the scheme enabled (quantizers the scheme leaves off stay off)."""
    for _, q in iter_quantizers(model):
        q.enabled = q.default_enabled if enabled else False


def set_explicit_attention(model: nn.Module, explicit: bool = True) -> None:
    """Force the explicit q·kᵀ/softmax/·v path in every quantized attention (capture, export)."""
    for m in model.modules():
        if isinstance(m, (QuantAttention, QuantWindowAttention)):
            m.force_explicit = explicit


def mark_modified(model: nn.Module, names: set[str] | list[str]) -> None:
    """Record parameters changed after instrumentation (fine-tuning): they get saved with the scales."""
    info = getattr(model, "sardfq_quant", None)
    if info is not None:
        info["modified"].update(names)


def quant_summary(model: nn.Module) -> dict[str, int]:
    """Counts for people and tests: quantized Linears/Convs, float Linears left, enabled quantizers."""
    out = {
        "quant_linear": 0,
        "quant_conv": 0,
        "float_linear": 0,
        "enabled_activation": 0,
        "enabled_weight": 0,
    }
    for m in model.modules():
        if isinstance(m, QuantLinear):
            out["quant_linear"] += 1
        elif isinstance(m, QuantConv2d):
            out["quant_conv"] += 1
        elif type(m) is nn.Linear:
            out["float_linear"] += 1
    for _, q in iter_quantizers(model):
        if q.enabled:
            out[f"enabled_{q.role}"] += 1
    return out
