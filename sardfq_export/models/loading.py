"""The one way to load a model: timm names and aliases, ``hf-hub:`` / ``local-dir:``, checkpoints,
the zoo (the embedded reference model, the benchmark models).

Whatever the source, the result carries the model's preprocessing (timm's data config), so every
later stage (synthesis clipping, evaluation, export input shape) agrees on it, and the settings it
was built from (:class:`ModelSettings`), so a later stage rebuilds the same model from an artifact.
Checkpoint reading, unwrapping and shape inference live in :mod:`sardfq_export.models.checkpoint`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from sardfq_export.core.errors import MissingComponentError, UserInputError
from sardfq_export.models.checkpoint import (
    Checkpoint,
    find_weights,
    infer_settings,
    load_into,
    open_checkpoint,
)
from sardfq_export.models.families import family_of
from sardfq_export.models.reference import CARD, REFERENCE_NAME, SYNTH_ITERS, WEIGHTS, build_reference

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

# Our own models by name: loader(img_size or None) -> (model, data_config, source). A fixed
# architecture (no num_classes / in_chans / model_kwargs); a --checkpoint still loads on top.
# The DINOv2 benchmark model registers here (dinov2_s14_fmnist, dinov2_s14_fmnist@224).
ZooLoader = Callable[[Any], tuple[nn.Module, dict, str]]
ZOO: dict[str, ZooLoader] = {}

SOURCES = ("hf-hub", "local-dir")
_SHAPE_KEYS = ("num_classes", "img_size", "in_chans")


def _size(value) -> int | tuple[int, int]:
    """An image size as timm takes it: an int when square, else (h, w)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UserInputError(f"img_size {value!r} is not a size: pass N or (H, W)") from None
    return h if h == w else (h, w)


def _freeze(key: str, value):
    """A model_kwargs value, hashable (lists → tuples); dicts and objects are refused."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(key, v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UserInputError(
        f"model_kwargs {key}={value!r}: values must be numbers, strings, booleans, None or lists of them"
    )


def _thaw(value):
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class ModelSettings:
    """How a model was loaded, resolved: ``load_model(**settings.to_dict())`` rebuilds it.

    ``None`` means the model's default. Values read off a checkpoint are filled in (and named in
    ``inferred``), so the rebuild does not depend on inference. Saved into artifacts as ``to_dict()``.
    """

    name: str  # 'reference', a timm name, 'hf-hub:org/name', 'local-dir:/abs/dir', or a ZOO name
    checkpoint: str | None = None  # absolute path of a weights file; None: the name's own weights
    pretrained: bool = True  # the name's own weights (timm hub, local-dir file, embedded), else random
    num_classes: int | None = None  # classifier outputs (0: no head)
    img_size: int | tuple[int, int] | None = None  # input size (int when square)
    in_chans: int | None = None  # input channels
    model_kwargs: tuple[tuple[str, Any], ...] = ()  # other timm.create_model kwargs, sorted pairs
    use_ema: bool = False  # the checkpoint's EMA weights (state_dict_ema / model_ema)
    # Preprocessing overrides as timm's validate.py takes them (interpolation, crop_pct, crop_mode,
    # mean, std), sorted pairs; they win over the checkpoint's pretrained_cfg and the model's default.
    preprocessing: tuple[tuple[str, Any], ...] = ()
    inferred: tuple[str, ...] = field(default=(), compare=False)  # which values came from the checkpoint

    def __post_init__(self) -> None:
        pairs = self.model_kwargs.items() if isinstance(self.model_kwargs, dict) else self.model_kwargs
        kwargs = tuple(sorted((str(k), _freeze(str(k), v)) for k, v in pairs))
        object.__setattr__(self, "model_kwargs", kwargs)
        pre = self.preprocessing.items() if isinstance(self.preprocessing, dict) else self.preprocessing
        pre = tuple(sorted((str(k), _freeze(str(k), v)) for k, v in pre if v is not None))
        object.__setattr__(self, "preprocessing", pre)
        if self.img_size is not None:
            object.__setattr__(self, "img_size", _size(self.img_size))
        object.__setattr__(self, "inferred", tuple(self.inferred))

    @property
    def kwargs(self) -> dict[str, Any]:
        """``model_kwargs`` as the dict timm takes."""
        return dict(self.model_kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; also ``load_model``'s keyword arguments."""
        return {
            "name": self.name,
            "checkpoint": self.checkpoint,
            "pretrained": self.pretrained,
            "num_classes": self.num_classes,
            "img_size": list(self.img_size) if isinstance(self.img_size, tuple) else self.img_size,
            "in_chans": self.in_chans,
            "model_kwargs": {k: _thaw(v) for k, v in self.model_kwargs},
            "use_ema": self.use_ema,
            "preprocessing": {k: _thaw(v) for k, v in self.preprocessing},
            "inferred": list(self.inferred),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSettings:
        """The inverse of :meth:`to_dict` (as read back from JSON)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown or "name" not in data:
            raise UserInputError(
                f"model settings {sorted(data)} are not ModelSettings (unknown {unknown}): "
                "rewrite the artifact with this version"
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def describe_inferred(self) -> str:
        """'inferred num_classes=10, img_size=64 from the checkpoint', or '' when nothing was."""
        parts = [f"{k}={getattr(self, k)}" for k in _SHAPE_KEYS if k in self.inferred]
        return f"inferred {', '.join(parts)} from the checkpoint" if parts else ""


@dataclass
class LoadedModel:
    """A float model in ``eval()`` mode plus what later stages need to know about it."""

    model: nn.Module
    name: str  # the resolved name: timm name, 'hf-hub:…', 'local-dir:…', a zoo name, or "reference"
    data_config: dict  # timm.data.resolve_data_config(): input_size, mean, std, interpolation...
    family: str  # "vit" (ViT/DeiT) or "swin"
    source: str  # where the weights came from: "random-init", "pretrained", a checkpoint path
    extra: dict = field(default_factory=dict)
    settings: ModelSettings | None = None  # what load_model() resolved; None when built by hand

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.data_config["input_size"])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0))

    def describe_inferred(self) -> str:
        return self.settings.describe_inferred() if self.settings is not None else ""


def model_family(model: nn.Module) -> str:
    """'vit' or 'swin' (models.families); anything else is refused with a message naming what it is."""
    return family_of(model).name


def _dinov2(default_size: int) -> ZooLoader:
    """The DINOv2 benchmark model, imported only when named (its builder needs onnx); built on first use."""

    def load(img_size):
        from sardfq_export.models import dinov2

        return dinov2.load(img_size or default_size)

    return load


ZOO.update({"dinov2_s14_fmnist": _dinov2(112), "dinov2_s14_fmnist@224": _dinov2(224)})
# Per-model defaults of ZOO entries (LoadedModel.extra), measured on that model.
# DINOv2 ViT-S/14: SARDFQ for 100 iterations, not the methods' 1000 (an ImageNet ViT's default).
# Measured (docs/dinov2-iterations.md, bench/dinov2_iters_compare.py; 2 seeds paired, 2,000 test
# images): with the default w8a8 recipe 200 iterations calibrated no better than 100 (deployed
# top-1 -0.38 points, range -0.85 to +0.10), and 100 halves the synthesis, which is most of the
# main job's 20-minute budget on 2 cores (wall time in the README).
# Its quantization recipe centres fc2's input and corrects biases (api.MODEL_RECIPE_FIELDS):
# w8a8 from SARDFQ data, all 10k test images, 3 seeds (bench/dinov2_table.py, docs/dinov2-results-62f705a0675c.md, build 62f705a0675c):
# deployed top-1 85.80 ± 0.15% plain, 86.19 ± 0.23% centred, 86.41 ± 0.13% centred + bias-corrected
# (FP32 86.75%; bias correction added +0.12, +0.41, +0.12 points per seed).
# The embedded reference model keeps both off: there centring alone cost 0.12-0.23 points and bias
# correction only won that back (docs/centre-fc2-reference-a8.md).
# At w4a16 (GPTQ rounding) its Hessian also sees 4 views of each calibration image
# (calibrators.gptq.hessian_views): w4a16 from 32 SARDFQ images, 2,000 test images, seed 0
# (bench/dinov2_probe.py, docs/dinov2-accuracy.md): drop 11.20 points with the images alone, 5.15 with
# 4 views, 5.50 with 8. Not at w4a8, where the activations are quantized too: centred + corrected,
# 13.40 with the images alone, 20.45 with 4 views (not explained yet; one suspect: the views'
# activations against ranges calibrated on the images alone).
# GPTQ's tokens weighted by their rollout reach to the CLS readout (calibrators.rollout): w4a16 drop
# 10.15 → 4.55 and 4.50 → 3.80 points on two SARDFQ sets of this build (2,000 test images).
# At w8a8 SmoothQuant α 0.5 (also before fc2) on top: all 10k test images, 3 SARDFQ seeds, this build
# (bench/dinov2_table.py rows w8a8+c+bc and w8a8+sq.5+c+bc, docs/dinov2-accuracy.md): deployed top-1
# 86.23 ± 0.27% without, 86.58 ± 0.15% with (FP32 86.66%; ORT vs fake-quant agreement 97.11% → 97.96%).
# α 0.8 cost 3 points from SARDFQ data (83.70%, seed 0): synthetic activation maxima are not real ones.
# Not at w4a8: there centring and correction cost top-1 (bench/dinov2_table.py rows w4a8 and
# w4a8+c+bc, SARDFQ data, all 10k test images, the same sets: deployed 71.88% vs 65.37% on seed 1,
# 72.04% vs 69.26% on seed 2; a 2,000-image probe of seed 1 puts most of it on the centring: plain
# 71.50%, corrected 69.90%, centred 65.10%, both 63.95%; docs/dinov2-accuracy.md). w4a4: below.
# w4a8 rounds to nearest after AWQ's scales instead of GPTQ: GPTQ fits the synthetic images' input
# covariance, which does not carry over to real inputs (bench/dinov2_hessian_probe.py), while AWQ takes
# one magnitude per channel. Paired on the same three SARDFQ sets (bench/dinov2_probe.py --scheme w4a8
# --rounding nearest --awq vs --rounding gptq, 2,000 test images, FP32 87.15%): 80.75 vs 74.00%,
# 76.90 vs 71.50%, 77.35 vs 71.25% (seeds 0, 1, 2); AWQ + GPTQ 68.45% (seed 1). All 10k test images,
# deployed (bench/dinov2_table.py rows w4a8+awq and w4a8): 77.44 ± 2.28% vs 72.85 ± 1.55%.
# Since the grey eighth-grid sets (2026-12-06), w4a8 takes w4a16's recipe instead: GPTQ over 4 views with
# rollout token weights, the last block float. All 10k test images, deployed, the default sets, FP32
# 86.66% (rows w4a8+awq, w4a8+v4+r, w4a8+awq+fp11, w4a8+v4+r+fp11): AWQ + nearest 79.80 ± 1.58%, GPTQ
# v4+r 80.73 ± 1.77%, AWQ + nearest with block 11 float 82.01 ± 0.50%, GPTQ v4+r with it 83.51 ± 0.69%
# (82.74 / 83.70 / 84.09%: drop 6.86 → 3.15). Block 10 float too, as at w4a16 (row w4a8+v4+r+fp10-11,
# same sets): 83.56 / 84.31 / 84.67% (84.18 ± 0.57%, drop 2.48), +0.82, +0.61, +0.58 over block 11 alone.
# w4a16 leaves block 10 float too (2/12 of the block weights in FP16: the weights take about 2.6x less
# memory than FP16 instead of 3.1x with one block): same sets, row w4a16+v4+r+fp10-11, 85.78 / 85.51 /
# 85.89% (85.73 ± 0.20%, drop 0.93); block 11 alone on the same sets (bench/dinov2_image_scale_probe.py
# --limit 10000): 85.33 / 84.93 / 84.95%, so +0.45, +0.58, +0.94 (on an AMD EPYC's sets it gave 85.20%).
# w4a16 leaves the last block's Linears float (1/12 of the block weights in FP16; TensorRT runs it as
# is): the error budget's largest single part (1.8 of 4.55 points, docs/dinov2-accuracy.md). All 10k
# test images, deployed, the default grey eighth-grid SARDFQ sets (bench/dinov2_table.py rows
# w4a16+v4+r and w4a16+v4+r+fp11, FP32 86.66%): 83.97 / 83.89 / 83.93% with every block INT4, 84.52 /
# 85.69 / 85.38% (85.20 ± 0.61%) with block 11 float: drop 2.73 → 1.46 points, every seed +0.55 to +1.80.
# w4a8 (and, with fc2 centred, w4a4): see the comments in _DINOV2_QUANTIZE
_DINOV2_W4A8 = {
    "centre_fc2": False,
    "bias_correct": False,
    "gptq_views": 4,
    "gptq_tokens": "rollout",
    "gptq_target": 0.25,
    "keep_fp": ["blocks.10.*", "blocks.11.*"],
    "weight_block": 64,
}
_DINOV2_QUANTIZE = {
    "centre_fc2": True,
    "bias_correct": True,
    "w8a8": {"smoothquant": 0.5, "smooth_fc2": True},
    # no bias correction at w4a16: the table's row (bench/dinov2_table.py DEFAULT_ROWS) was measured
    # without it, and it did not help there (76.10 vs 75.95%, docs/dinov2-accuracy.md)
    # blocks 10 and 11 float at w4a16 and at w4a8 (above)
    "w4a16": {
        "gptq_views": 4,
        "gptq_tokens": "rollout",
        "keep_fp": ["blocks.10.*", "blocks.11.*"],
        "bias_correct": False,
    },
    # 4-bit blocks of 64 nested on each channel's INT8 step at w4a8 (still an INT8 GEMM; bench/dinov2_table.py
    # row w4a8+v4+r+fp10-11+b64, 10k, 3 seeds, deployed, same sets: 85.52 / 85.61 / 85.53%, drop 1.11,
    # +1.96 / +1.30 / +0.86 over per-channel scales), and GPTQ a quarter of the way to the float model's
    # output (row +b64+ft.25: 85.92 / 85.60 / 85.68%, drop 0.93; +0.40 / -0.01 / +0.15 over +b64; per
    # channel +0.53 / +0.28 with blocks 10-11 float, +1.26 / +0.40 with block 11)
    "w4a8": _DINOV2_W4A8,
    # w4a4 takes w4a8's recipe with fc2's input centred: bench/dinov2_table.py rows w4a4 (plain GPTQ),
    # w4a4+v4+r+fp10-11+b64+ft.25 and its +c, 10k, deployed, the default sets (paired): 20.90 / 19.91 /
    # 23.75% plain, 48.34 / 48.88 / 47.62% (48.28 ± 0.63%) with w4a8's recipe, 62.65 / 66.94 / 62.40%
    # (64.00 ± 2.55%) centred too (4-bit steps on fc2's one-sided post-GELU input halve; at w4a8 it
    # gained nothing). The common recipe (centred + corrected plain GPTQ) had lost to plain GPTQ in a
    # 2,000-image probe (19.80 vs 24.50%). Still far from FP32 (86.66%): docs/dinov2-accuracy.md.
    # Reconstruction (--finetune recon) at 2.5x the paper's rate: row +c+recon+lr1e-4, 10k, deployed,
    # the default sets (paired against 4e-5): 72.44 / 74.36 / 77.78% (74.86 ± 2.71), +2.85 / +2.12 /
    # +7.70; at 4e-5 a weight moves a quarter to a half of a 4-bit step (docs/dinov2-accuracy.md);
    # 3e-4: 71.86 / 75.49 / 75.26% (74.20%), -0.58 / +1.13 / -2.52 against 1e-4
    "w4a4": {**_DINOV2_W4A8, "centre_fc2": True, "recon_lr": 1e-4},
}
# PSAQ-ViT V2 on DINOv2 (bench/dinov2_psaq2_probe.py, docs/dinov2-accuracy.md): at the generic discrepancy
# weight 1.0 the images run away from the prior (their KL to the teacher 0.12 → 13.5 in 8 rounds) and a
# student trained on them collapses; at 0.1 it stays 0.07-0.32 and each student phase lowers it. Student
# lr 1e-6: 1e-5 raises the KL even on SARDFQ images (bench/dinov2_kd_probe.py)
_DINOV2_PSAQ2 = {"student_lr": 1e-6, "disc_weight": 0.1}
# Its synthetic images are grey (its inputs are: Fashion-MNIST replicated to 3 channels, model card)
# and optimized on an eighth-side pixel grid (SynthConfig.grey / image_scale), for every synthesis
# method but PSAQ-ViT V2 (which keeps its own pixels). Measured (bench/dinov2_table.py column
# sardfq/8g against sardfq, all 10k test images, deployed, seeds 0/1/2; docs/dinov2-accuracy.md):
# w8a8 86.53 / 86.52 / 86.47% (86.51 ± 0.03, against 86.72 / 86.59 / 86.43%: a drop of 0.15 points, not
# 0.08); w4a16 83.97 / 83.89 / 83.93% (83.93 ± 0.04, drop 2.73; 77.24% from seed 0's full-grid set,
# 83.08 ± 0.88% from colour on the eighth grid); w4a8 80.70 / 80.73 / 77.97% (79.80 ± 1.58, against
# 80.06 / 75.95 / 76.30%). FP32 86.66%.
# Why: full-resolution colour sets are textures (28% of their energy above 1/8 cycle per pixel,
# real images 0.3%), and GPTQ's rounding from them carries nothing over to real inputs
# (bench/dinov2_hessian_probe.py --scheme w4a16: 0.99 of nearest's error; eighth grid 0.64, grey 0.51,
# real images 0.15).
# Since 2026-12-07 they are also framed while synthesized (SynthConfig.frame 0.125: only the inside of a
# flat grey band of an eighth of the side on each edge is optimized, one grey per image). Measured
# (column sardfq/8g-sf.125 against sardfq/8g, all 10k test images, deployed, seeds 0/1/2): w4a4 +
# reconstruction 78.20 / 76.39 / 76.73% (77.11 ± 0.96) against 73.64 / 74.09 / 73.89% on the same
# seeds' unframed sets (+3.23, every seed; PSAQ-ViT framed: 78.42% on seed 0); w4a16 85.99 / 86.16 /
# 85.94% (86.03 ± 0.12, against 85.73 ± 0.20); w4a8 85.80 / 85.27 / 86.15% (85.74 ± 0.44, against
# 85.73 ± 0.17); w8a8 86.44 / 86.69 / 86.59% (86.57 ± 0.13, against 86.51 ± 0.03). Why: the loss then
# shapes an object on a plain surround, which moves blocks 7-10's activations to real images' level
# (bench/dinov2_deep_stats.py; docs/dinov2-accuracy.md).
_DINOV2_SYNTHESIS = {
    "synthesis_iters": 100,
    "synthesis_image_scale": 0.125,
    "synthesis_grey": True,
    "synthesis_frame": 0.125,
}
ZOO_EXTRA: dict[str, dict] = {
    "dinov2_s14_fmnist": {**_DINOV2_SYNTHESIS, "quantize": _DINOV2_QUANTIZE, "psaq2": _DINOV2_PSAQ2},
    "dinov2_s14_fmnist@224": {**_DINOV2_SYNTHESIS, "quantize": _DINOV2_QUANTIZE, "psaq2": _DINOV2_PSAQ2},
}


def wrap_module(model: nn.Module, name: str | None = None) -> LoadedModel:
    """A :class:`LoadedModel` for a model built elsewhere (a plain timm ViT/Swin ``nn.Module``)."""
    name = name or getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    return _finish(model, name, "in-memory", None, {}, None)


def resolve_name(name: str) -> str:
    """Alias / timm name / zoo name / ``hf-hub:org/name`` / ``local-dir:DIR`` → the canonical name
    (``local-dir:`` made absolute); an unknown name gets close matches suggested."""
    import timm
    from timm.models import parse_model_name

    name = ALIASES.get(name, name)
    if name in ZOO or name == REFERENCE_NAME:
        return name
    try:
        source, ident = parse_model_name(name)
    except ValueError as exc:
        raise UserInputError(f"{exc} (valid sources: {', '.join(SOURCES)})") from None
    if source == "hf-hub":
        return f"hf-hub:{ident}"
    if source == "local-dir":
        folder = Path(ident).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise UserInputError(
                f"local-dir:{folder} has no config.json: point it at a folder in timm's format "
                "(timm.models.save_for_hf(model, DIR, safe_serialization=True) writes one)"
            )
        return f"local-dir:{folder}"
    if timm.is_model(name):
        return name
    candidates = list(ALIASES) + list(ZOO) + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserInputError(
        f"unknown model {name!r}.{hint} Use a timm name (timm.list_models('*vit*')), an alias "
        f"({', '.join(ALIASES)}), hf-hub:ORG/NAME, local-dir:DIR, or omit --model for the "
        "embedded reference model"
    )


def _is_hub_error(exc: BaseException) -> bool:
    mod = type(exc).__module__
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or mod.startswith(
        ("huggingface_hub", "requests", "httpx", "urllib3")
    )


def _build_error(name: str, exc: BaseException, pretrained: bool) -> Exception:
    """A timm.create_model failure as the one line that says what to do."""
    text = str(exc)
    if "huggingface_hub" in text and "not installed" in text:
        return MissingComponentError(f"{name} needs huggingface_hub: pip install huggingface_hub")
    if name.startswith("hf-hub:") and _is_hub_error(exc):
        if type(exc).__name__ == "RepositoryNotFoundError":
            return UserInputError(f"{name}: no such repository on the Hugging Face Hub (or it is private)")
        return UserInputError(
            f"cannot fetch {name} (offline or hub unreachable): download it where you have network "
            "and pass --model local-dir:DIR or --checkpoint FILE"
        )
    if pretrained and _is_hub_error(exc):
        return UserInputError(
            f"cannot download pretrained weights for {name} (offline or hub unreachable): "
            "pass --checkpoint FILE, or --random-init for a structural run"
        )
    line = (text.strip().splitlines() or [type(exc).__name__])[0][:200]
    if isinstance(exc, TypeError) and "argument" in line:
        return UserInputError(f"{name} does not take that setting ({line}): check --model-kwargs")
    return UserInputError(f"cannot build {name}: {line}")


def _create(
    name: str, args: dict, *, pretrained: bool = False, meta: bool = False, overlay=None
) -> nn.Module:
    """timm.create_model, on the meta device (structure only) or seeded (seed 0, global RNG untouched:
    every run and every torchrun process builds the same random weights)."""
    import timm

    try:
        if meta:
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False, **args)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay, **args)
    except (OSError, RuntimeError, ValueError, TypeError, AssertionError, KeyError) as exc:
        raise _build_error(name, exc, pretrained and not meta) from None
    except Exception as exc:
        if _is_hub_error(exc):
            raise _build_error(name, exc, pretrained and not meta) from None
        raise


def _fold(model_kwargs: dict | None, timm_kwargs: dict, explicit: dict) -> tuple[dict, dict]:
    """(timm kwargs, shape settings): num_classes / img_size / in_chans given inside the kwargs move
    to the shape settings; the same key twice with different values is refused."""
    kwargs = dict(model_kwargs or {})
    for k, v in timm_kwargs.items():
        if k in kwargs and kwargs[k] != v:
            raise UserInputError(f"{k} given twice ({kwargs[k]!r} and {v!r}): pass it once")
        kwargs[k] = v
    shape = {}
    for key in _SHAPE_KEYS:
        mine, folded = explicit.get(key), kwargs.pop(key, None)
        if mine is not None and folded is not None and mine != folded:
            raise UserInputError(f"{key} given twice ({mine!r} and {folded!r}): pass it once")
        value = mine if mine is not None else folded
        if value is not None:
            shape[key] = _size(value) if key == "img_size" else int(value)
    return {str(k): _freeze(str(k), v) for k, v in kwargs.items()}, shape


def load_model(
    name: str | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    *,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    in_chans: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    use_ema: bool = False,
    preprocessing: dict[str, Any] | None = None,
    inferred: tuple[str, ...] | list[str] = (),
    **timm_kwargs,
) -> LoadedModel:
    """Load ``name`` (alias, timm name, ``hf-hub:org/name``, ``local-dir:DIR``, a zoo name, or
    None/'reference'), optionally with a checkpoint (safetensors or torch; nothing unpickled).

    ``pretrained`` uses the name's own weights (timm's download, the local-dir file; offline, a
    download fails with a one-line message suggesting ``--checkpoint``), else a seeded random init.
    ``num_classes`` / ``img_size`` / ``in_chans`` left None are read off the checkpoint when there is
    one (an explicit ``img_size`` different from the checkpoint's resamples its position embedding
    the way timm does). ``model_kwargs`` (and the legacy ``**timm_kwargs``) go to
    ``timm.create_model``. ``use_ema`` takes the checkpoint's EMA weights. ``preprocessing``:
    overrides of the data config as timm's validate.py takes them (``interpolation``, ``crop_pct``,
    ``crop_mode``, ``mean``, ``std``; None = keep), over the checkpoint's ``pretrained_cfg`` and the
    model's default; they are kept in the result's settings and data config. ``inferred`` is accepted
    and ignored, so ``load_model(**settings.to_dict())`` works; the result's ``settings`` say it all.
    """
    del inferred  # informational only: the values themselves are in the other settings
    kwargs, shape = _fold(
        model_kwargs, timm_kwargs, {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans}
    )
    from_dir = str(name or "").startswith("local-dir:") and pretrained
    if use_ema and checkpoint is None and not from_dir:
        raise UserInputError(
            "--use-ema picks the EMA weights of a --checkpoint file (or a local-dir: folder's): "
            "pass one, or drop --use-ema"
        )
    if name in (None, REFERENCE_NAME) or name in ZOO:
        if kwargs or set(shape) - ({"img_size"} if name in ZOO else set()):
            raise UserInputError(
                f"{name or REFERENCE_NAME} is a fixed model: it takes no "
                f"{', '.join(sorted(set(shape) | set(kwargs)))}; pass --model NAME for a timm model"
            )
        loaded = _load_zoo(name or REFERENCE_NAME, checkpoint, use_ema, shape.get("img_size"))
    else:
        loaded = _load_timm(name, checkpoint, pretrained, kwargs, shape, use_ema)
    return with_preprocessing(loaded, preprocessing)


def with_preprocessing(loaded: LoadedModel, overrides: dict[str, Any] | None) -> LoadedModel:
    """``loaded`` with preprocessing ``overrides`` applied to its data config and recorded in its
    settings (so every artifact made from it carries them); ``None`` values keep the model's."""
    from dataclasses import replace

    from sardfq_export.data import data_config_with

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if not overrides:
        return loaded
    loaded.data_config = data_config_with(loaded.data_config, **overrides)
    applied = loaded.data_config.get("overrides") or {}
    if loaded.settings is not None:
        merged = {**dict(loaded.settings.preprocessing), **applied}
        loaded.settings = replace(loaded.settings, preprocessing=merged)
    return loaded


def _load_zoo(name: str, checkpoint, use_ema: bool, img_size) -> LoadedModel:
    """The reference model or a ZOO entry, with its own weights or a checkpoint on top."""
    if name == REFERENCE_NAME:
        # fp32 even where bf16 is native: measured 0.47x fp32's synthesis speed (docs/precision-synthesis.md)
        model, data_config, extra = (
            build_reference(),
            None,
            {"synthesis_iters": SYNTH_ITERS, "precision": "fp32"},
        )
        if checkpoint is None and not WEIGHTS.exists():
            raise UserInputError(
                f"reference weights {WEIGHTS} are missing: run 'python tools/train_reference.py'"
            )
        ckpt = open_checkpoint(WEIGHTS if checkpoint is None else checkpoint, use_ema)
        source = f"embedded ({CARD.name})" if checkpoint is None else str(ckpt.path)
        load_into(model, ckpt, model_family(model), "the reference model")
    else:
        model, data_config, source = ZOO[name](img_size)
        extra = dict(ZOO_EXTRA.get(name, {}))
        if checkpoint is not None:
            ckpt = open_checkpoint(checkpoint, use_ema)
            load_into(model, ckpt, model_family(model), name, resample=img_size is not None)
            source = str(ckpt.path)
    settings = ModelSettings(
        name=name,
        checkpoint=None if checkpoint is None else source,
        pretrained=checkpoint is None,
        img_size=img_size,
        use_ema=use_ema,
    )
    return _finish(model, name, source, settings, extra, data_config)


def _load_timm(name, checkpoint, pretrained: bool, kwargs: dict, shape: dict, use_ema: bool) -> LoadedModel:
    resolved = resolve_name(name)
    local_dir = Path(resolved.split(":", 1)[1]) if resolved.startswith("local-dir:") else None
    ckpt: Checkpoint | None = None
    if checkpoint is not None:
        ckpt = open_checkpoint(checkpoint, use_ema)
    elif local_dir is not None and pretrained:
        ckpt = open_checkpoint(find_weights(local_dir), use_ema)

    meta = _create(resolved, {**kwargs, **shape}, meta=True)
    family = model_family(meta)
    found: dict[str, Any] = {}
    if ckpt is not None:
        want = tuple(k for k in _SHAPE_KEYS if k not in shape)
        found = infer_settings(
            ckpt.state,
            meta,
            family,
            build=lambda img: _create(resolved, {**kwargs, **shape, "img_size": img}, meta=True),
            want=want,
        )
    args = {**kwargs, **shape, **found}
    # Preprocessing a checkpoint file carries (a local-dir's config.json is read by timm itself).
    overlay = ckpt.pretrained_cfg if ckpt is not None and local_dir is None and ckpt.pretrained_cfg else None
    use_hub = pretrained and ckpt is None and local_dir is None
    model = _create(resolved, args, pretrained=use_hub, overlay=overlay)
    if ckpt is not None:
        load_into(
            model, ckpt, family, resolved, resample="img_size" in shape, resample_patch="patch_size" in kwargs
        )
    source = str(ckpt.path) if ckpt is not None else ("pretrained" if use_hub else "random-init")
    settings = ModelSettings(
        name=resolved,
        checkpoint=None if checkpoint is None else str(ckpt.path),
        pretrained=pretrained and checkpoint is None,
        num_classes=args.get("num_classes"),
        img_size=args.get("img_size"),
        in_chans=args.get("in_chans"),
        model_kwargs=kwargs,
        use_ema=use_ema,
        inferred=tuple(k for k in _SHAPE_KEYS if k in found),
    )
    return _finish(model, resolved, source, settings, {}, None)


def _finish(model, name, source, settings, extra, data_config) -> LoadedModel:
    from timm.data import resolve_data_config

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    data_config = dict(data_config or resolve_data_config(model=model))
    for key in ("mean", "std"):
        if isinstance(data_config.get(key), list):  # a config.json's lists
            data_config[key] = tuple(data_config[key])
    # timm's pretrained cfg keeps the registered size (224) when img_size/in_chans are overridden:
    # the patch embedding knows what the model really takes.
    embed = getattr(model, "patch_embed", None)
    if embed is not None and getattr(embed, "img_size", None) is not None:
        in_chans = getattr(getattr(embed, "proj", None), "in_channels", data_config["input_size"][0])
        data_config["input_size"] = (int(in_chans), *(int(v) for v in embed.img_size))
    return LoadedModel(model, name, data_config, model_family(model), source, extra, settings)


def read_checkpoint(path: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint file's state dict, unwrapped and cleaned (safetensors / ``weights_only=True``)."""
    return open_checkpoint(path, use_ema).state
