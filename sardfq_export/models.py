"""The one way to load a model: timm names and aliases, checkpoints, the embedded reference model.

Whatever the source, the result carries the model's preprocessing (timm's data config), so every
later stage (synthesis clipping, evaluation, export input shape) agrees on it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from sardfq_export.errors import UserInputError
from sardfq_export.reference import CARD, REFERENCE_NAME, SYNTH_ITERS, WEIGHTS, build_reference

# Short names people type → timm's ImageNet model names.
ALIASES = {
    "deit_t": "deit_tiny_patch16_224",
    "deit_s": "deit_small_patch16_224",
    "deit_b": "deit_base_patch16_224",
    "vit_s": "vit_small_patch16_224",
    "vit_b": "vit_base_patch16_224",
    "swin_t": "swin_tiny_patch4_window7_224",
    "swin_s": "swin_small_patch4_window7_224",
    "swin_b": "swin_base_patch4_window7_224",
}


@dataclass
class LoadedModel:
    """A float model in ``eval()`` mode plus what later stages need to know about it."""

    model: nn.Module
    name: str  # the resolved timm name, or "reference"
    data_config: dict  # timm.data.resolve_data_config(): input_size, mean, std, interpolation...
    family: str  # "vit" (ViT/DeiT) or "swin"
    source: str  # where the weights came from: "random-init", "pretrained", a checkpoint path
    extra: dict = field(default_factory=dict)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.data_config["input_size"])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0))


def model_family(model: nn.Module) -> str:
    """'vit' or 'swin'; anything else is refused with a message naming what it is."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, SwinTransformer):
        return "swin"
    raise UserInputError(
        f"{type(model).__name__} is not a ViT/DeiT/Swin model: sardfq-export quantizes timm "
        "VisionTransformer and SwinTransformer models (e.g. --model deit_s or swin_t)"
    )


def resolve_name(name: str) -> str:
    """Alias or timm name → timm name; an unknown name gets close matches suggested."""
    import timm

    name = ALIASES.get(name, name)
    if timm.is_model(name):
        return name
    candidates = list(ALIASES) + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserInputError(
        f"unknown model {name!r}.{hint} Use a timm name (timm.list_models('*vit*')), an alias "
        f"({', '.join(ALIASES)}), or omit --model for the embedded reference model"
    )


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (``weights_only=True``: nothing unpickled)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserInputError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any parse failure is the file's fault, not ours
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"cannot read checkpoint {path} ({first[:160]}): pass a .safetensors file or a "
            "torch state_dict saved with torch.save"
        ) from None
    for key in ("state_dict", "model", "model_ema", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"checkpoint {path} does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _apply_checkpoint(model: nn.Module, path: str | Path, what: str) -> None:
    state = read_checkpoint(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        line = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc))
        raise UserInputError(
            f"checkpoint {path} does not fit {what}: {line[:200]}. Pass the --model the "
            "checkpoint was trained with"
        ) from None
    if missing or unexpected:
        raise UserInputError(
            f"checkpoint {path} does not fit {what}: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}). "
            "Pass the --model the checkpoint was trained with"
        )


def load_model(
    name: str | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    **timm_kwargs,
) -> LoadedModel:
    """Load ``name`` (alias, timm name, or None/'reference'), optionally with a checkpoint.

    ``pretrained`` downloads timm's weights (real users); without network that fails with a
    one-line message suggesting ``--checkpoint``. ``timm_kwargs`` go to ``timm.create_model``
    (e.g. ``img_size``, ``num_classes``) for custom checkpoints.
    """
    import timm
    from timm.data import resolve_data_config

    if name not in (None, REFERENCE_NAME) and _is_quantized_dir(name):
        return _load_quantized(name)
    if name in (None, REFERENCE_NAME):
        model = build_reference()
        if checkpoint is None:
            if not WEIGHTS.exists():
                raise UserInputError(
                    f"reference weights {WEIGHTS} are missing: run 'python tools/train_reference.py'"
                )
            checkpoint, source = WEIGHTS, f"embedded ({CARD.name})"
        else:
            source = str(checkpoint)
        _apply_checkpoint(model, checkpoint, "the reference model")
        resolved = REFERENCE_NAME
    else:
        resolved = resolve_name(name)
        with torch.device("meta"):
            model_family(timm.create_model(resolved, pretrained=False, **timm_kwargs))
        use_hub = pretrained and checkpoint is None
        try:
            model = timm.create_model(resolved, pretrained=use_hub, **timm_kwargs)
        except (OSError, RuntimeError, ValueError) as exc:
            if not use_hub:
                raise UserInputError(f"cannot build {resolved}: {exc}") from None
            raise UserInputError(
                f"cannot download pretrained weights for {resolved} (offline or hub unreachable): "
                "pass --checkpoint FILE, or --random-init for a structural run"
            ) from None
        source = "pretrained" if use_hub else "random-init"
        if checkpoint is not None:
            _apply_checkpoint(model, checkpoint, resolved)
            source = str(checkpoint)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    data_config = resolve_data_config(model=model)
    # timm's pretrained cfg keeps the registered size (224) when img_size/in_chans are overridden:
    # the patch embedding knows what the model really takes.
    embed = getattr(model, "patch_embed", None)
    if embed is not None and getattr(embed, "img_size", None) is not None:
        in_chans = getattr(getattr(embed, "proj", None), "in_channels", data_config["input_size"][0])
        data_config["input_size"] = (int(in_chans), *(int(v) for v in embed.img_size))
    extra = {"synthesis_iters": SYNTH_ITERS} if resolved == REFERENCE_NAME else {}
    return LoadedModel(model, resolved, data_config, model_family(model), source, extra)


def _is_quantized_dir(name: str | Path) -> bool:
    path = Path(name).expanduser()
    return path.is_dir() and (
        (path / "quantized" / "quantized.json").is_file() or (path / "quantized.json").is_file()
    )


def _load_quantized(path: str | Path) -> LoadedModel:
    """``--model DIR`` (written by ``quantize --out DIR``): the base model named in it + its fake-quant copy."""
    import calibrators

    meta = calibrators.read_meta(path)
    ref = meta.get("base_model") or {}
    base = load_model(ref.get("name"), ref.get("checkpoint"), pretrained=not ref.get("random_init", False))
    qmodel = calibrators.load_quantized(path, base.model)
    for p in qmodel.parameters():
        p.requires_grad_(False)
    scheme = qmodel.scheme
    extra = {"runner_name": "torch-fakequant", "scheme": scheme.name, "quantized_dir": str(Path(path).expanduser()),
             "float_model": base.model}  # fmt: skip
    return LoadedModel(qmodel, base.name, base.data_config, base.family, f"{base.source} + {path}", extra)
