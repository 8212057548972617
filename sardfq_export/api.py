"""The public API: the verbs the CLI and the main job call (``import sardfq_export as sx``).

    model = sx.load_model()                                    # the embedded reference ViT
    calib = sx.synthesize(model, method="sardfq")              # calibration images, no data
    q = sx.quantize(model, calib, scheme="w8a8")               # ranges (+ fine-tuning), product defaults
    onnx = sx.export(q, "out/model.onnx")                      # QDQ ONNX, linted
    report = sx.validate(q, onnx, data="fashion-mnist")        # accuracy, fidelity, latency, gates

Settings are frozen dataclasses (``SynthConfig``, ``QuantizeConfig``, ``ExportConfig``,
``GateSpec``); keyword arguments override single fields of the defaults. Results are typed
(``CalibSet``, ``Quantized``, ``ExportResult``, ``Report``). ``sx.run`` (in :mod:`sardfq_export.job`)
is the whole job, with its artifacts folder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn

from sardfq_export.calibrators.adaptive import AdaptiveConfig
from sardfq_export.calibrators.gptq import TOKEN_WEIGHTS as GPTQ_TOKENS
from sardfq_export.calibrators.reconstruct import RECON_LR, RECON_TARGETS, RECON_TOKENS
from sardfq_export.core.calibset import CalibSet
from sardfq_export.core.device import (
    PRECISION_CHOICES,
    check_precision,
    describe_device,
    module_device,
    on_device,
    resolve_device,
    resolve_precision,
)
from sardfq_export.core.errors import UserInputError
from sardfq_export.exporters.onnx_export import ExportConfig, ExportResult
from sardfq_export.models import LoadedModel
from sardfq_export.synthesis.config import SynthConfig
from sardfq_export.synthesis.sources import ADAPTIVE_CALIBS as _ADAPTIVE_CALIBS
from sardfq_export.validation.gates import GateSpec
from sardfq_export.validation.report import Report

FINETUNES = ("none", "recon", "kd", "recon+kd")
# Calibration specs that train the quantized model together with their images (not synthesis
# methods: the student is calibrators' fake-quant model): ``--calib psaq2`` = PSAQ-ViT V2.
ADAPTIVE_CALIBS = _ADAPTIVE_CALIBS
ROUNDINGS = ("auto", "nearest", "gptq")
# What reconstruction fits on (QuantizeConfig.recon_images): the images the ranges saw, or the set as given.
RECON_IMAGES = ("calib", "original")
DEFAULT_NUM_IMAGES = 32  # calibration images a source makes or reads when the caller gives no count


@dataclass(frozen=True)
class QuantizeConfig:
    """How :func:`quantize` builds the fake-quant model. The defaults are the product's recipe."""

    scheme: str = "w8a8"  # a registered scheme (calibrators.SCHEMES)
    # Activation ranges, "auto": min-max for 8-bit activations, MSE for 4-bit ones. Measured: a real
    # ViT's outlier channels carry signal, so clipping them at 8 bits costs top-1 (DINOv2 w8a8: mse
    # 0.9 points, minmax 0.4, percentile 11.4; docs/dinov2-accuracy.md) while the reference model
    # is indifferent at 8 bits and needs MSE's clipping at 4 (w4a4: 88.31 vs 86.00,
    # docs/calibrators-results.md).
    range: str = "auto"
    weight_range: str = "mse"
    # The exponent p of the activation range search's error (range "mse": the clip minimizing
    # sum |x - q(x)|^p over the calibration activations); 2 is plain MSE, a larger p weighs the
    # clipped tail more (a wider clip). None: the model's own default (MODEL_RECIPE_FIELDS), else 2.
    range_norm: float | None = None
    # Activation ranges (and centring/smoothing statistics) from the calibration images plus
    # label-preserving variants of them (flip, resized crops, as gptq_views): 1 = the images alone.
    # None: the model's own default (MODEL_RECIPE_FIELDS), else 1.
    range_views: int | None = None
    # Weight rounding on the frozen scales, "auto": GPTQ (data-aware, on the calibration set) for
    # 4-bit weights, nearest for 8-bit (DINOv2, 32 images: w4a16 drop 14.3 → 1.15 points with GPTQ;
    # w8a8 0.9 → 1.7: at 8 bits the 32-image Hessian overfits).
    weight_rounding: str = "auto"
    # GPTQ's Hessian from the calibration images plus label-preserving variants of them (flip,
    # resized crops; calibrators.gptq.hessian_views): 1 = the images alone. None: the model's own
    # default (MODEL_RECIPE_FIELDS), else 1.
    gptq_views: int | None = None
    # How each token counts in GPTQ's Hessian: "uniform" (the paper's) or "rollout" (weighted by its
    # attention-rollout reach to the prediction in the float model; calibrators.rollout). None: the
    # model's own default (MODEL_RECIPE_FIELDS), else uniform.
    gptq_tokens: str | None = None
    # What each GPTQ-rounded Linear's output is fitted to, a in [0, 1]: W X̃ + a W ΔX, where 0 is the
    # paper's (the float weights on the quantized model's inputs X̃) and 1 the float model's output at
    # that layer (the rounding also absorbs the error the earlier layers and the input quantizer left;
    # GPTAQ-style, calibrators.gptq). None: the model's own default (MODEL_RECIPE_FIELDS), else 0.
    gptq_target: float | None = None
    # GPTQ's dampening, a fraction of the mean Hessian diagonal added to it (the paper's 0.01);
    # larger values trust the calibration tokens' correlations less.
    gptq_damp: float = 0.01
    # Low-pass the calibration images first: each resized to this fraction of its size and back
    # (calibrators.lowpass; synthetic images carry fine detail no real image has). 1: off. None: the
    # model's own default (MODEL_RECIPE_FIELDS), else 1.
    calib_lowpass: float | None = None
    # Frame the calibration images first: a band of this fraction of the side on each edge set to one
    # flat grey per image (calibrators.frame; synthetic images are texture to the edges, photos hold an
    # object on a plainer background). 0: off. None: the model's own default (MODEL_RECIPE_FIELDS), else 0.
    calib_frame: float | None = None
    # Linears left float (timm module-name globs): mixed precision. None: the model's own default
    # for the scheme (MODEL_RECIPE_FIELDS, e.g. a block measured to carry most of its 4-bit error),
    # else none; () keeps none.
    keep_fp: tuple[str, ...] | None = None
    # 4-bit weight blocks, 64 or 128 input channels per scale: INT4 blocks at w4a16 (TensorRT runs
    # both; the exported DequantizeLinear's block_size), blocks nested on each channel's INT8 step at
    # w4a8/w4a4 (calibrators.PerBlock nested: still an INT8 GEMM). 0: the scheme's own. None: the
    # model's own default for the scheme (MODEL_RECIPE_FIELDS), else the scheme's.
    weight_block: int | None = None
    # SmoothQuant migration strength in [0, 1) folded into LayerNorm→Linear pairs and V → proj;
    # 0: off. None: the model's own default (MODEL_RECIPE_FIELDS), else off.
    smoothquant: float | None = None
    # With smoothquant: also the MLP's second Linear, through an explicit per-channel Mul before
    # its input quantizer (TensorRT fuses it into the GELU; DINOv2 w8a8: held-out logit error
    # 0.0040 → 0.0026, docs/dinov2-accuracy.md). None: the model's own default, else off.
    smooth_fc2: bool | None = None
    # Centre the MLP's second Linear input per channel (calibrators.centre: an explicit Sub before
    # its input quantizer, the shift folded into its bias; TensorRT fuses it into the GELU).
    # None: the model's own default (MODEL_RECIPE_FIELDS), else off.
    centre_fc2: bool | None = None
    # After ranges and rounding, each quantized Linear's bias absorbs its output's mean error on the
    # calibration images (calibrators.bias_correct, empirical bias correction); the export is
    # unchanged. None: the model's own default, else off.
    bias_correct: bool | None = None
    # Activation-aware scaling of 4-bit weights (calibrators.awq, AWQ): per-input-channel factors
    # searched on the calibration images, folded into LayerNorms / V / an explicit Mul before fc2,
    # before ranges and rounding. None: the model's own default for 4-bit weights, else off.
    awq: bool | None = None
    # Leave the fewest most-sensitive Linears float for this top-1 agreement with the float model
    # on held-out images (0-1); None: off.
    auto_keep_fp: float | None = None
    finetune: str = "none"  # none | recon (SARDFQ stage 2: block reconstruction) | kd | recon+kd
    # kd: each step on fresh random crop views of the images (calibrators.distill(augment=True))
    kd_views: bool = False
    iters: int | None = None  # fine-tuning iterations (per block for recon); None: the method's
    # Reconstruction also learns each block's activation steps (LSQ-style, a log-factor on the
    # calibrated step, Adam at this rate; calibrators.reconstruct); 0: frozen, the paper's. None: the
    # model's own default (MODEL_RECIPE_FIELDS), else 0.
    recon_act_lr: float | None = None
    # Reconstruction's weight learning rate (Adam, cosine-decayed); ``lr`` overrides it. None: the
    # model's own default (MODEL_RECIPE_FIELDS), else the paper's (calibrators.reconstruct.RECON_LR, 4e-5).
    recon_lr: float | None = None
    # Reconstruction's set: the calibration images plus N-1 label-preserving variants of each (flip,
    # resized crops, as gptq_views), so 100 steps of 32 do not see 32 images 100 times each.
    # None: the model's own default (MODEL_RECIPE_FIELDS), else 1.
    recon_views: int | None = None
    # QDrop: while reconstruction trains, each activation quantizer leaves each element unquantized
    # with this probability (calibrators.quantizer.dropped_quantization; the QDrop paper's 0.5); 0: off,
    # the paper's. None: the model's own default (MODEL_RECIPE_FIELDS), else 0.
    recon_drop: float | None = None
    # How each token's output error counts in reconstruction's block loss: "uniform" (the paper's) or
    # "rollout" (weighted by its attention-rollout reach to the prediction in the float model, as
    # gptq_tokens; calibrators.reconstruct). None: the model's own default (MODEL_RECIPE_FIELDS), else uniform.
    recon_tokens: str | None = None
    # Which images reconstruction fits on: "calib", those the ranges and GPTQ saw (after
    # calib_lowpass / calib_frame), or "original", the set as given, before them (a frame helps the
    # ranges reach real images' deep-block sizes, but reconstruction would fit its flat band).
    # None: the model's own default (MODEL_RECIPE_FIELDS), else "calib".
    recon_images: str | None = None
    # What reconstruction fits each block's output to: "float", the float model's output there (the
    # paper's; the block also learns to undo earlier blocks' error on the calibration images), or
    # "local", the float block applied to the block's quantized input (its own error only).
    # None: the model's own default (MODEL_RECIPE_FIELDS), else "float".
    recon_target: str | None = None
    lr: float | None = None  # fine-tuning learning rate; None: the method's
    # Fine-tuning (recon/kd) under bf16 autocast on the chosen device (the scales are fp32 either
    # way). auto: core.device.resolve_precision (bf16 where native, the model's own default first).
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.keep_fp, str):
            raise UserInputError(
                f"keep_fp takes a list of module-name patterns, got the string {self.keep_fp!r}"
            )
        if self.keep_fp is not None:
            object.__setattr__(self, "keep_fp", tuple(self.keep_fp))
        if self.weight_block is not None and (
            isinstance(self.weight_block, bool) or self.weight_block not in (0, 64, 128)
        ):
            raise UserInputError(
                f"weight_block is an INT4 block size, 64 or 128 (0: the scheme's own), got {self.weight_block!r}"
            )
        if self.finetune not in FINETUNES:
            raise UserInputError(f"unknown finetune {self.finetune!r}: use one of {', '.join(FINETUNES)}")
        if not self.gptq_damp > 0:
            raise UserInputError(
                f"gptq_damp must be > 0 (a fraction of the mean Hessian diagonal), got {self.gptq_damp}"
            )
        for name, what in (("gptq_views", "in GPTQ's Hessian"), ("range_views", "the activation ranges see"),
                           ("recon_views", "reconstruction sees")):  # fmt: skip
            n = getattr(self, name)
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
                raise UserInputError(f"{name} counts the images' views {what} (>= 1), got {n!r}")
        # real-valued recipe numbers: (field, the values it takes, what it is); None is "the model's own"
        for name, ok, what in (
            ("range_norm", lambda v: v > 0, "the exponent p of the range search's error (> 0; 2: MSE)"),
            ("calib_frame", lambda v: 0.0 <= v < 0.5,
             "the fraction of the image side framed in flat grey, in [0, 0.5) (0: off)"),
            ("recon_lr", lambda v: v > 0, "the learning rate of reconstruction's weights (> 0)"),
            ("recon_act_lr", lambda v: v >= 0,
             "the learning rate of reconstruction's activation steps (>= 0; 0: frozen)"),
            ("recon_drop", lambda v: 0.0 <= v < 1.0,
             "the probability of leaving an activation unquantized while reconstructing, in [0, 1) (0: off)"),
        ):  # fmt: skip
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v)):
                raise UserInputError(f"{name} is {what}, got {v!r}")
        for name, allowed in (("gptq_tokens", GPTQ_TOKENS), ("recon_tokens", RECON_TOKENS),
                              ("recon_images", RECON_IMAGES), ("recon_target", RECON_TARGETS)):  # fmt: skip
            v = getattr(self, name)
            if v is not None and v not in allowed:
                raise UserInputError(f"unknown {name} {v!r}: use one of {', '.join(allowed)}")
        if self.gptq_target is not None and (
            isinstance(self.gptq_target, bool)
            or not isinstance(self.gptq_target, (int, float))
            or not 0.0 <= self.gptq_target <= 1.0
        ):
            raise UserInputError(
                f"gptq_target weighs the float model's output in GPTQ's target, in [0, 1] (0: the paper's), "
                f"got {self.gptq_target!r}"
            )
        if self.smoothquant is not None and (
            isinstance(self.smoothquant, bool) or not 0.0 <= self.smoothquant < 1.0
        ):
            raise UserInputError(
                f"smoothquant is a migration strength in [0, 1) (0: off), got {self.smoothquant!r}"
            )
        if self.calib_lowpass is not None and (
            isinstance(self.calib_lowpass, bool) or not 0.0 < self.calib_lowpass <= 1.0
        ):
            raise UserInputError(
                f"calib_lowpass is a fraction of the image size in (0, 1] (1: off), got {self.calib_lowpass!r}"
            )
        if self.auto_keep_fp is not None and not 0.0 < self.auto_keep_fp <= 1.0:
            raise UserInputError(f"auto_keep_fp is a top-1 agreement in (0, 1], got {self.auto_keep_fp}")
        if self.precision not in PRECISION_CHOICES:
            raise UserInputError(
                f"unknown precision {self.precision!r}: use one of {', '.join(PRECISION_CHOICES)}"
            )
        if self.weight_rounding not in ROUNDINGS:
            raise UserInputError(
                f"unknown weight rounding {self.weight_rounding!r}: use one of {', '.join(ROUNDINGS)}"
            )

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["keep_fp"] = None if self.keep_fp is None else list(self.keep_fp)
        return d


@dataclass
class Quantized:
    """A calibrated (and optionally fine-tuned) fake-quant model and what it came from."""

    model: nn.Module  # the fake-quant model (``.scheme`` attached); numerically the deployed graph
    base: LoadedModel  # the float model it was made from
    config: QuantizeConfig
    summary: dict = field(default_factory=dict)  # calibration / fine-tuning statistics

    @property
    def scheme(self):
        return self.model.scheme

    def save(self, out: str | Path, extra: dict | None = None) -> Path:
        """Write ``out/quantized/`` (scales, scheme, fine-tuned weights, base-model reference)."""
        from sardfq_export import calibrators

        random_init = self.base.source == "random-init"
        settings = self.base.settings
        ref = {"name": self.base.name, "checkpoint": _checkpoint_of(self.base), "random_init": random_init,
               "source": self.base.source,
               # every setting the loader used (incl. inferred num_classes/img_size): the rebuild recipe
               "settings": settings.to_dict() if settings is not None else None}  # fmt: skip
        extra = {"quantize": self.config.to_dict(), **(extra or {})}
        return calibrators.save_quantized(self.model, out, ref, extra=extra, include_weights=random_init)


def _checkpoint_of(loaded: LoadedModel) -> str | None:
    return loaded.settings.checkpoint if loaded.settings is not None else None


# QuantizeConfig fields whose None means "this model's default": LoadedModel.extra["quantize"]
# (models.loading.ZOO_EXTRA, measured per model), else the value here.
MODEL_RECIPE_FIELDS = {"centre_fc2": False, "bias_correct": False, "gptq_views": 1, "gptq_tokens": "uniform",
                       "gptq_target": 0.0, "awq": False, "smoothquant": 0.0, "smooth_fc2": False, "calib_lowpass": 1.0,
                       "calib_frame": 0.0,
                       "keep_fp": (), "weight_block": 0, "range_norm": 2.0, "range_views": 1,
                       "recon_lr": RECON_LR, "recon_act_lr": 0.0, "recon_views": 1, "recon_drop": 0.0,
                       "recon_tokens": "uniform", "recon_images": "calib", "recon_target": "float"}  # fmt: skip


def model_recipe(cfg: QuantizeConfig, loaded: LoadedModel) -> QuantizeConfig:
    """``cfg`` with every field left at None (``MODEL_RECIPE_FIELDS``) set to the model's default.

    A model's defaults may differ by weight width and by scheme, each measured on the model:
    ``extra["quantize"]["w4"]`` (or ``"w8"``) overrides the common ones for schemes with 4-bit
    (8-bit) weights, ``extra["quantize"]["w4a16"]`` (the widths, activations 16 when weight-only) those
    for every scheme of these widths (``w4a16_b64`` too), and ``extra["quantize"][scheme name]`` all.
    ``weight_rounding`` "auto" takes the model's ``"weight_rounding"`` there too, when it names one."""
    from sardfq_export import calibrators

    scheme = calibrators.get_scheme(cfg.scheme)
    common = loaded.extra.get("quantize", {})
    widths = f"w{scheme.w_bits}a{scheme.a_bits or 16}"
    own = {
        **common,
        **common.get(f"w{scheme.w_bits}", {}),
        **common.get(widths, {}),
        **common.get(scheme.name, {}),
    }
    resolved = {
        k: type(fallback)(own.get(k, fallback))
        for k, fallback in MODEL_RECIPE_FIELDS.items()
        if getattr(cfg, k) is None
    }
    if resolved.get("centre_fc2") and scheme.a_bits is None:
        resolved["centre_fc2"] = False  # a weight-only scheme has no activation quantizer to centre for
    if resolved.get("weight_block") and scheme.w_bits != 4:
        resolved["weight_block"] = 0  # 8-bit weights have no 4-bit blocks to size
    if resolved.get("awq") and scheme.w_bits != 4:
        resolved["awq"] = False  # AWQ is for 4-bit weights
    # AWQ and SmoothQuant rescale the same inputs: a model default yields to the caller's choice of
    # the other (both on by the model's own defaults stays the scheme's "choose one" error)
    if "smoothquant" in resolved and (scheme.a_bits is None or cfg.awq):
        resolved["smoothquant"] = 0.0  # also: nothing to smooth for without activation quantizers
    if "awq" in resolved and cfg.smoothquant:
        resolved["awq"] = False
    if "smooth_fc2" in resolved and not resolved.get("smoothquant", cfg.smoothquant):
        resolved["smooth_fc2"] = False  # the model's fc2 smoothing goes with its SmoothQuant
    # Weight rounding: "auto" takes the model's own for the scheme (else resolved_recipe's by width).
    # A model's rounding and AWQ defaults were measured together (DINOv2 w4a8: AWQ + nearest 76.90%,
    # AWQ + GPTQ 68.45%, nearest alone far worse), so each yields when the caller changes the other:
    # another rounding drops the model's AWQ, AWQ turned off (or SmoothQuant chosen) drops its rounding.
    own_rounding = own.get("weight_rounding")
    if own_rounding is not None:
        paired_awq = bool(own.get("awq", False))
        if cfg.weight_rounding == "auto":
            if bool(resolved.get("awq", cfg.awq)) == paired_awq:
                resolved["weight_rounding"] = own_rounding
        elif cfg.weight_rounding != own_rounding and "awq" in resolved and paired_awq:
            resolved["awq"] = False
    return replace(cfg, **resolved)


def _configure(config, cls, overrides: dict):
    """``config`` (or ``cls()``) with ``overrides`` applied; unknown names are a one-line error."""
    config = config if config is not None else cls()
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UserInputError(
            f"{cls.__name__} has no setting {', '.join(unknown)}: use {', '.join(sorted(names))}"
        )
    return replace(config, **overrides) if overrides else config


def load_model(
    name: str | Path | None = None,
    checkpoint: str | Path | None = None,
    *,
    pretrained: bool = True,
    **settings,
) -> LoadedModel:
    """A model by timm name / alias / ``None`` (the embedded reference), optionally with a checkpoint.

    ``name`` may also be a folder written by :func:`quantize` (or a job's ``--out``): the result then
    holds its fake-quant model, and ``extra["float_model"]`` the float model it came from.
    ``settings`` go to the loader (``num_classes``, ``img_size``, ``in_chans``, ``model_kwargs``...).
    """
    from sardfq_export import models

    if name is not None and Path(str(name)).expanduser().is_dir():
        from sardfq_export.calibrators import is_quantized_dir, load_quantized_model

        if is_quantized_dir(name):
            from sardfq_export.models.loading import with_preprocessing

            base, qmodel = load_quantized_model(name)
            base = with_preprocessing(base, settings.get("preprocessing"))  # overrides on top of the saved
            extra = {"runner_name": "torch-fakequant", "scheme": qmodel.scheme.name,
                     "quantized_dir": str(Path(name).expanduser()), "float_model": base.model}  # fmt: skip
            return LoadedModel(qmodel, base.name, base.data_config, base.family,
                               f"{base.source} + {name}", extra, base.settings)  # fmt: skip
    return models.load_model(
        None if name is None else str(name), checkpoint, pretrained=pretrained, **settings
    )


def as_loaded(model: LoadedModel | nn.Module) -> LoadedModel:
    """A :class:`LoadedModel` for ``model``: a plain timm ViT/Swin module is wrapped with its data config."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, Quantized):
        return model.base
    if not isinstance(model, nn.Module):
        raise UserInputError(
            f"expected a model (timm nn.Module or sx.load_model's result), got {type(model).__name__}"
        )
    from sardfq_export.models import wrap_module

    return wrap_module(model)


def synthesize(
    model: LoadedModel | nn.Module,
    config: SynthConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    precision: str | None = None,
    **overrides,
) -> CalibSet:
    """Synthesize calibration images from ``model`` alone (no data).

    ``config`` defaults to ``SynthConfig()`` (SARDFQ, 32 images); keyword arguments override its
    fields (``method="psaq"``, ``num_images=64``...). ``iters`` left unset takes the model's own
    default where it has one (the reference model: 200), else the method's (1000).
    ``device``: ``auto`` (default: CUDA when present) | ``cpu`` | ``cuda[:N]``; the images come
    back on the CPU and the model where it was. ``precision``: ``fp32`` | ``bf16`` (autocast of
    the teacher forward; same as ``bf16=True``) | ``auto`` (the default when neither ``config``
    nor ``bf16=`` says: :func:`sardfq_export.core.device.resolve_precision`).
    """
    from sardfq_export.synthesis.runner import synthesize as run_synthesis

    loaded = as_loaded(model)
    device = resolve_device(device)
    if precision is None and config is None and "bf16" not in overrides:
        precision = "auto"
    if precision is not None:
        if precision not in PRECISION_CHOICES:
            raise UserInputError(
                f"unknown precision {precision!r}: use one of {', '.join(PRECISION_CHOICES)}"
            )
        precision = resolve_precision(precision, device, loaded.extra.get("precision"))
        overrides = {**overrides, "bf16": precision == "bf16"}
    cfg = _configure(config, SynthConfig, overrides)
    check_precision("bf16" if cfg.bf16 else "fp32", device)
    cfg = cfg.with_model_defaults(loaded.extra)
    return run_synthesis(loaded, cfg, out, resume=resume, progress=progress, device=device)


def calibration_set(
    spec: str | CalibSet | torch.Tensor,
    model: LoadedModel | nn.Module,
    num_images: int | None = None,
    *,
    holdout: int = 0,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> tuple[CalibSet, CalibSet | None]:
    """Resolve a calibration source (``sardfq``/``psaq``/``noise``, ``real:DIR``, a file, a set, a tensor).

    ``num_images``: how many calibrate. None: all of a given set or tensor (a caller who made 128
    images means all 128), ``DEFAULT_NUM_IMAGES`` of a source that makes or reads them.
    """
    from sardfq_export.synthesis.sources import resolve_calibration

    if isinstance(spec, torch.Tensor):
        spec = CalibSet(images=spec, meta={"method": "tensor", "num_images": len(spec)})
    if isinstance(spec, CalibSet):
        n = len(spec) if num_images is None else num_images
        if holdout and len(spec) > n:
            return spec.split(n)
        return (spec.split(n)[0] if len(spec) > n else spec), None
    n = DEFAULT_NUM_IMAGES if num_images is None else num_images
    return resolve_calibration(
        str(spec), as_loaded(model), n, holdout, seed, progress=progress, device=device
    )


def scheme_of(cfg: QuantizeConfig):
    """The scheme ``cfg`` (its model defaults resolved) quantizes with; a one-line error where they conflict."""
    from sardfq_export import calibrators

    scheme = calibrators.get_scheme(cfg.scheme)
    alpha = cfg.smoothquant or None  # 0 (and an unresolved None): off
    if cfg.smooth_fc2 and alpha is None:
        raise UserInputError("smooth_fc2 (--smooth-fc2) needs smoothquant (--smoothquant ALPHA, ALPHA > 0)")
    block = None
    if cfg.weight_block:
        if scheme.w_bits != 4:
            raise UserInputError(
                f"weight_block (--weight-block) sizes 4-bit weight blocks; scheme {scheme.name} has "
                f"{scheme.w_bits}-bit weights: use a w4 scheme ({', '.join(n for n, s in calibrators.SCHEMES.items() if s.w_bits == 4 and s.exportable)})"
            )
        # With INT8 activations (w4a8, w4a4) the blocks nest on each channel's INT8 step, so the
        # GEMM stays INT8 per channel (scheme.PerBlock); weight-only schemes get true INT4 blocks.
        block = calibrators.PerBlock(cfg.weight_block, nested=scheme.a_bits is not None)
    return scheme.with_options(
        w_granularity=block,
        keep_fp=cfg.keep_fp or None,
        smoothquant_alpha=alpha,
        smooth_explicit=cfg.smooth_fc2 or None,
        centre_fc2=cfg.centre_fc2 or None,
        awq=cfg.awq or None,
    )


def resolved_recipe(cfg: QuantizeConfig, scheme) -> dict:
    """The "auto" settings of ``cfg`` made concrete for ``scheme`` (what actually runs)."""
    act = cfg.range if cfg.range != "auto" else ("mse" if scheme.a_bits == 4 else "minmax")
    rounding = cfg.weight_rounding
    if rounding == "auto":
        rounding = "gptq" if scheme.w_bits == 4 else "nearest"
    return {"range": act, "weight_range": cfg.weight_range, "weight_rounding": rounding}


def _build(loaded: LoadedModel, cal: CalibSet, cfg: QuantizeConfig, scheme, progress: bool,
           original: CalibSet | None = None):  # fmt: skip
    """Instrument for ``scheme``, calibrate ranges, round weights, fine-tune: ``(qmodel, summary)``.
    ``original``: the set before low-pass / frame, what ``recon_images="original"`` reconstructs on."""
    from sardfq_export import calibrators

    torch.manual_seed(cfg.seed)
    qmodel = calibrators.quantize_model(loaded.model, scheme)
    summary = _calibrate(qmodel, cal.images, cfg, scheme, progress, loaded.model)
    recon_on = original if cfg.recon_images == "original" else None
    _finetune(qmodel, loaded, cal, cfg, summary, progress, recon_on)
    return qmodel, summary


def _calibrate(qmodel: nn.Module, images: torch.Tensor, cfg: QuantizeConfig, scheme, progress: bool,
               float_model: nn.Module) -> dict:  # fmt: skip
    """Ranges, weight rounding and bias correction of an instrumented model, as the recipe says:
    the summary."""
    from sardfq_export import calibrators

    recipe = resolved_recipe(cfg, scheme)
    range_data = images
    if cfg.range_views > 1:
        from sardfq_export.calibrators.gptq import hessian_views

        range_data = hessian_views(images, cfg.range_views, cfg.seed)
    summary: dict = {
        "resolved": recipe,
        "calibration": calibrators.calibrate(
            qmodel,
            range_data,
            method=recipe["range"],
            weight_method=recipe["weight_range"],
            progress=progress,
            norm=cfg.range_norm,
        ),
    }
    del range_data
    # Bias correction compares each Linear's output with the float function's. SmoothQuant's and
    # AWQ's V → proj folds rescale qkv's V rows, so there the float model's own outputs are in other
    # units (on DINOv2, w8a8 with SmoothQuant α 0.5 and correction against them: 25% top-1). The
    # reference is this model with its quantizers off, taken before GPTQ writes rounded weights.
    # GPTQ's float target (gptq_target > 0) reads its inputs from the same reference: one copy for both.
    reference = None
    if cfg.bias_correct or (recipe["weight_rounding"] == "gptq" and cfg.gptq_target > 0):
        reference = copy.deepcopy(qmodel)
        calibrators.set_quantizers_enabled(reference, False)
    if recipe["weight_rounding"] == "gptq":
        summary["gptq"] = calibrators.gptq_weights(
            qmodel, images, damp=cfg.gptq_damp, views=cfg.gptq_views, seed=cfg.seed, tokens=cfg.gptq_tokens,
            float_model=float_model, target=cfg.gptq_target, reference=reference, progress=progress,
        )  # fmt: skip
    if cfg.bias_correct:  # last: the biases absorb what ranges and rounding left
        summary["bias_correction"] = calibrators.correct_biases(qmodel, reference, images, progress=progress)
        del reference
    return summary


def _finetune(qmodel: nn.Module, loaded: LoadedModel, cal: CalibSet, cfg: QuantizeConfig, summary: dict,
              progress: bool, recon_on: CalibSet | None = None) -> None:  # fmt: skip
    """The recipe's fine-tuning (recon / kd) of a calibrated model, its summaries added to ``summary``.
    Reconstruction fits on ``recon_on`` when given (``recon_images="original"``), else on ``cal``;
    KD distils on ``cal``."""
    from sardfq_export import calibrators

    tune = {k: v for k, v in (("iters", cfg.iters), ("lr", cfg.lr)) if v is not None}
    if cfg.finetune in ("recon", "recon+kd"):
        recon_data = (recon_on if recon_on is not None else cal).images
        if cfg.recon_views > 1:
            from sardfq_export.calibrators.gptq import hessian_views

            recon_data = hessian_views(recon_data, cfg.recon_views, cfg.seed)
        rec = calibrators.reconstruct_blocks(qmodel, loaded.model, recon_data, seed=cfg.seed, progress=progress,
                                             precision=cfg.precision, act_lr=cfg.recon_act_lr, drop=cfg.recon_drop,
                                             tokens=cfg.recon_tokens, target=cfg.recon_target,
                                             **{"lr": cfg.recon_lr, **tune})  # fmt: skip
        summary["recon"] = {k: v for k, v in rec.items() if k != "blocks"} | {
            "final_mse": rec["blocks"][-1]["mse_after"],
            "images": cfg.recon_images,
        }
    if cfg.finetune in ("kd", "recon+kd"):
        kw = tune if cfg.finetune == "kd" else {}  # after recon, KD keeps its own defaults
        summary["kd"] = calibrators.distill(
            qmodel,
            loaded.model,
            cal,
            seed=cfg.seed,
            progress=progress,
            precision=cfg.precision,
            augment=cfg.kd_views,
            **kw,
        )


def quantize(
    model: LoadedModel | nn.Module,
    calib: str | CalibSet | torch.Tensor,
    config: QuantizeConfig | None = None,
    *,
    num_images: int | None = None,
    holdout: CalibSet | torch.Tensor | None = None,
    progress: bool = True,
    adaptive: AdaptiveConfig | None = None,
    device: str | torch.device | None = None,
    **overrides,
) -> Quantized:
    """Build the fake-quant copy of ``model``, set its ranges on ``calib`` and optionally fine-tune it.

    ``calib`` is a calibration set (from :func:`synthesize`), a tensor of images in the model's
    normalized space, or a spec string (``"real:fashion-mnist"``, ``"sardfq"``, a file). The
    float model is untouched. ``num_images``: all of a given set or tensor unless set; 32
    (``DEFAULT_NUM_IMAGES``) from a spec string. Keyword arguments override fields of ``QuantizeConfig()``.
    ``holdout``: images the calibration did not see, for ``auto_keep_fp``'s fidelity measurement
    (default: the calibration images themselves). ``calib="psaq2"``: PSAQ-ViT V2 (:func:`psaq2`,
    with ``adaptive`` as its schedule) builds the model and its images together. ``device``: where
    calibration, GPTQ and fine-tuning run (``auto``: CUDA when present); the result is on the float
    model's device.
    """
    loaded = as_loaded(model)
    cfg = model_recipe(_configure(config, QuantizeConfig, overrides), loaded)
    if isinstance(calib, str) and calib in ADAPTIVE_CALIBS:
        return psaq2(
            loaded,
            cfg,
            adaptive=adaptive,
            num_images=DEFAULT_NUM_IMAGES if num_images is None else num_images,
            seed=cfg.seed,
            progress=progress,
            device=device,
        ).quantized
    scheme = scheme_of(cfg)
    dev = resolve_device(device)
    check_precision(cfg.precision, dev)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, dev, loaded.extra.get("precision")))
    cal, _ = calibration_set(calib, loaded, num_images, seed=cfg.seed, progress=progress, device=dev)
    home = module_device(loaded.model)
    with on_device(dev, loaded.model):
        qmodel, summary = _quantize_on(loaded, cal, cfg, scheme, holdout, progress)
        qmodel.to(home)  # what is returned and saved does not depend on the device that made it
    summary["device"] = describe_device(dev)
    qmodel.eval()
    return Quantized(qmodel, loaded, cfg, summary)


def _quantize_on(loaded: LoadedModel, cal: CalibSet, cfg: QuantizeConfig, scheme, holdout, progress: bool):
    """:func:`quantize`'s work, on the device ``loaded.model`` is on: ``(qmodel, summary)``."""
    import time

    from sardfq_export import calibrators

    t0 = time.perf_counter()
    original = cal
    lowpass = 1.0 if cfg.calib_lowpass is None else cfg.calib_lowpass
    if lowpass != 1.0:  # the set's soft targets belong to the images before the low-pass
        cal = replace(cal, images=calibrators.lowpass(cal.images, lowpass), targets=None)
    framed = 0.0 if cfg.calib_frame is None else cfg.calib_frame
    if framed != 0.0:  # likewise: the soft targets belong to the whole images
        dc = loaded.data_config
        images = calibrators.frame(cal.images, framed, dc["mean"], dc["std"], seed=cfg.seed)
        cal = replace(cal, images=images, targets=None)
    qmodel, summary = _build(loaded, cal, cfg, scheme, progress, original)
    if cfg.auto_keep_fp is not None:
        # Mixed precision: leave the fewest most-sensitive Linears float for the fidelity target,
        # measured on held-out images (synthetic ones: still no data), then rebuild with them float.
        held_images = holdout.images if isinstance(holdout, CalibSet) else holdout
        if held_images is None:
            held_images = cal.images
        sens = calibrators.layer_sensitivity(qmodel, held_images, progress=progress)
        pick = calibrators.keep_fp_for_target(qmodel, held_images, cfg.auto_keep_fp, sens)
        auto = {k: pick[k] for k in ("keep_fp", "target", "met", "steps")}
        auto["held_out"] = "holdout" if holdout is not None else "calibration images"
        if pick["keep_fp"]:
            scheme = replace(scheme, keep_fp=tuple(dict.fromkeys([*scheme.keep_fp, *pick["keep_fp"]])))
            qmodel, summary = _build(loaded, cal, cfg, scheme, progress, original)
            auto["rebuilt"] = calibrators.fidelity_to_float(qmodel, held_images)
        summary["auto_keep_fp"] = auto
        summary["sensitivity"] = sens  # what the choice was made on: every layer, all quantized
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["quant"] = calibrators.quant_summary(qmodel)
    summary["calib"] = {"num_images": len(cal), **{k: v for k, v in cal.meta.items() if k != "loss_curve"},
                        "lowpass": lowpass, "frame": framed}  # fmt: skip
    return qmodel, summary


@dataclass
class Adapted:
    """What PSAQ-ViT V2 makes: the distilled fake-quant model and the images it co-evolved with."""

    quantized: Quantized  # the student: calibrated on the warmed-up images, then distilled
    calib: CalibSet  # the final images (teacher probabilities as targets): usable as calibration data
    holdout: CalibSet | None  # images with the prior alone (the student never saw them), or None


def psaq2(
    model: LoadedModel | nn.Module,
    config: QuantizeConfig | None = None,
    *,
    adaptive: AdaptiveConfig | None = None,
    synth: SynthConfig | None = None,
    num_images: int = DEFAULT_NUM_IMAGES,
    holdout: int = 0,
    seed: int = 0,
    iters: int | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    callback=None,
    **overrides,
) -> Adapted:
    """PSAQ-ViT V2 (``--calib psaq2``): images and the quantized student evolve in turn, no labels.

    The student is ``config``'s scheme, calibrated (ranges, rounding) on ``num_images`` images after
    the prior-only warm-up, then distilled by :func:`calibrators.adaptive.teacher_student` against
    images that keep maximizing its discrepancy under PSAQ-ViT's patch-similarity prior
    (``synth``'s prior settings). ``adaptive``: the schedule (``iters`` overrides its ``rounds``).
    ``holdout`` more images get the warm-up alone (for label-free fidelity on images the student
    never saw). ``out``: a file path whose ``.ckpt`` / ``.holdout.ckpt`` siblings hold the resumable
    state; ``resume``: continue from them bit-exactly. The recipe's ``finetune`` (recon / kd) runs
    after V2, on its images. Keyword arguments override ``QuantizeConfig`` fields.
    """
    import time

    from sardfq_export import calibrators
    from sardfq_export.calibrators.adaptive import teacher_student
    from sardfq_export.synthesis.prior import PatchSimilarityTeacher

    loaded = as_loaded(model)
    cfg = model_recipe(_configure(config, QuantizeConfig, overrides), loaded)
    if cfg.auto_keep_fp is not None:
        raise UserInputError(
            "--auto-keep-fp does not combine with --calib psaq2 (its student is trained as built)"
        )
    acfg = (adaptive or AdaptiveConfig()).resolve(loaded.family, loaded.extra.get("psaq2"))
    if iters is not None:
        acfg = replace(acfg, rounds=iters)
    scheme = scheme_of(cfg)
    dev = resolve_device(device)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, dev, loaded.extra.get("precision")))
    teacher = PatchSimilarityTeacher(loaded, replace(synth or SynthConfig(), seed=seed), dev)
    torch.manual_seed(cfg.seed)
    student = calibrators.quantize_model(loaded.model, scheme).to(dev)
    identity = {"model": loaded.name, "source": loaded.source, "fingerprint": calibrators.model_fingerprint(
                loaded.model), "scheme": scheme.to_dict(), "recipe": cfg.to_dict(), "prior": teacher.settings(),
                "seed": seed}  # fmt: skip
    ckpt = Path(out) if out is not None else None
    held_ckpt = ckpt.with_name(ckpt.name + ".holdout.ckpt") if ckpt else None
    clip = teacher.clip if teacher.cfg.clip else None
    t0 = time.perf_counter()
    held = None
    if holdout:  # first, and its finished state kept until the end: a resume never redoes it
        held_images, held_run = teacher_student(
            None, teacher, teacher.start_images(range(num_images, num_images + holdout)), acfg, clip=clip,
            index_offset=num_images, checkpoint=held_ckpt, identity=identity, resume=resume, progress=progress,
            desc="psaq2 held-out (prior only)", keep_checkpoint=True,
        )  # fmt: skip
        held = _teacher_set(loaded, held_images, {**_meta(loaded, acfg, teacher, seed, held_run),
                                                  "holdout": "warm-up only: the prior, no student"})  # fmt: skip
    images, run = teacher_student(
        student, teacher, teacher.start_images(range(num_images)), acfg, clip=clip,
        prepare=lambda qm, x: _calibrate(qm, x, cfg, scheme, progress, loaded.model),
        checkpoint=ckpt.with_name(ckpt.name + ".ckpt") if ckpt else None, identity=identity,
        resume=resume, callback=callback, progress=progress,
    )  # fmt: skip
    if held_ckpt is not None:
        held_ckpt.unlink(missing_ok=True)
    meta = _meta(loaded, acfg, teacher, seed, run)
    cal = _teacher_set(loaded, images, meta)
    summary = dict(run["prepare"] or {})
    record = {k: v for k, v in run.items() if k not in ("curve", "prepare")}
    record["prior"] = teacher.settings()
    summary["psaq2"] = record
    info = getattr(student, "sardfq_quant", None)
    if info is not None:  # quantized.json says how the student was trained
        info["calibration"].setdefault("finetune", []).append(
            {k: v for k, v in record.items() if k != "rounds"}
        )
    _finetune(student, loaded, cal, cfg, summary, progress)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["quant"] = calibrators.quant_summary(student)
    summary["calib"] = {"num_images": len(cal), **{k: v for k, v in cal.meta.items() if k != "loss_curve"}}
    student.eval()
    return Adapted(Quantized(student, loaded, cfg, summary), cal, held)


def _meta(loaded: LoadedModel, acfg: AdaptiveConfig, teacher, seed: int, run: dict) -> dict:
    """A V2 image set's metadata: every schedule and prior setting, the loss curve, the wall time."""
    import timm

    return {"method": "psaq2", "seed": seed, "num_images": None, "iters": acfg.rounds,
            "config": acfg.to_dict(), "prior": teacher.settings(), "model": loaded.name, "source": loaded.source,
            "input_size": list(teacher.input_size), "loss_terms": run["columns"], "phases": run["phases"],
            "loss_curve": run["curve"], "rounds": run["rounds"], "steps": run["steps"],
            "wall_time_s": run["wall_time_s"], "device": str(teacher.device),
            "mean": list(loaded.data_config["mean"]), "std": list(loaded.data_config["std"]),
            "versions": {"torch": torch.__version__, "timm": timm.__version__}}  # fmt: skip


def _teacher_set(loaded: LoadedModel, images: torch.Tensor, meta: dict) -> CalibSet:
    """Label-free images with the teacher's own probabilities as targets (as for noise)."""
    model = loaded.model
    with torch.no_grad():
        probs = torch.cat([model(b).float().softmax(-1).cpu() for b in images.split(32)])
    return CalibSet(images=images.cpu(), targets=probs, labels=probs.argmax(-1), meta={**meta,
                    "num_images": int(images.shape[0])})  # fmt: skip


def load_quantized(path: str | Path) -> Quantized:
    """A :class:`Quantized` saved by :meth:`Quantized.save` (or a job's ``--out``)."""
    from sardfq_export import calibrators

    base, qmodel = calibrators.load_quantized_model(path)
    meta = calibrators.read_meta(path)
    cfg = QuantizeConfig(**{k: v for k, v in (meta.get("quantize") or {}).items()
                            if k in {f.name for f in fields(QuantizeConfig)}})  # fmt: skip
    return Quantized(qmodel, base, replace(cfg, scheme=qmodel.scheme.name), {})


def export(
    quantized: Quantized,
    path: str | Path = "model.onnx",
    config: ExportConfig | None = None,
    *,
    target: str = "onnxruntime",
    metadata: dict | None = None,
    device: str | torch.device | None = None,
    **overrides,
) -> ExportResult:
    """Write ``quantized`` as QDQ ONNX (linted against TensorRT's rules).

    ``target="tensorrt"`` stores unquantized ops in FP16 (TensorRT 11 takes precision from the
    ONNX) unless ``fp16`` is given; the engine itself is built by :func:`build_engine`.
    ``device``: where the model is traced (``auto``: CUDA when present); the graph is the same.
    """
    from sardfq_export import __version__
    from sardfq_export.exporters.onnx_export import export_onnx

    if target not in TARGETS:
        raise UserInputError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    if config is None and "fp16" not in overrides:
        overrides["fp16"] = TARGETS[target]["fp16"]
    cfg = _configure(config, ExportConfig, overrides)
    base = quantized.base
    meta = {"model": base.name, "sardfq_export_version": __version__, "preprocessing": preprocessing(base),
            **(metadata or {})}  # fmt: skip
    with on_device(resolve_device(device), quantized.model):
        return export_onnx(quantized.model, path, tuple(base.input_size), cfg, metadata=meta)


# A deployment target: how its ONNX is written and whether a TensorRT engine is built.
# Adding a target adds a line here (and its test and README line).
TARGETS: dict[str, dict] = {
    "onnx": {"fp16": False, "engine": False},
    "onnxruntime": {"fp16": False, "engine": False},
    "tensorrt": {"fp16": True, "engine": True},
}


def preprocessing(loaded: LoadedModel) -> dict:
    """The model's preprocessing as plain JSON values (recorded in the ONNX, report.json and the
    receiver README); ``overrides``: what was set over the model's own config (--interpolation...)."""
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in loaded.data_config.items()
           if k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")}  # fmt: skip
    overrides = loaded.data_config.get("overrides") or {}
    out["overrides"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in overrides.items()}
    return out


def validate(
    quantized: Quantized,
    onnx_path: str | Path | ExportResult,
    *,
    data: str | None = None,
    held_images: torch.Tensor | CalibSet | None = None,
    engine: str | Path | None = None,
    gates: GateSpec | None = None,
    limit: int | None = None,
    batches: tuple[int, ...] = (1, 32),
    progress: bool = True,
    say=None,
    device: str | torch.device | None = None,
) -> Report:
    """Run the deployed model (ONNX Runtime, or a TensorRT ``engine``) against PyTorch: a :class:`Report`.

    ``data`` ("fashion-mnist" or a folder) adds real-data accuracy; ``held_images`` (default: 32
    seeded Gaussian images) feed the label-free fidelity and the latency runs; ``gates`` are
    evaluated into ``report.gates`` (never raised here: see ``report.passed``), with the scheme's
    default thresholds where ``gates`` leaves one unset (``GateSpec(defaults=False)``: none) and
    ``gates.baseline``'s regression checks (another model's baseline: ``UserInputError``).
    ``device``: where the PyTorch references run (``auto``: CUDA when present), for fidelity,
    accuracy and their latency column; recorded in ``report["runtime"]``.
    """
    from sardfq_export.exporters.lint import lint_model
    from sardfq_export.validation.deploy import validate_deployment
    from sardfq_export.validation.gates import check_baseline, evaluate_gates, load_baseline
    from sardfq_export.validation.report import build_report

    onnx_path = Path(onnx_path.path if isinstance(onnx_path, ExportResult) else onnx_path)
    base = quantized.base
    if isinstance(held_images, CalibSet):
        held_images = held_images.images
    if held_images is None:
        held_images = torch.randn(32, *base.input_size, generator=torch.Generator().manual_seed(0))
    gates = gates or GateSpec()
    if gates.max_top1_drop is not None and not data:
        raise UserInputError(
            "a top-1 drop gate needs real labelled data: pass data='fashion-mnist' or a folder"
        )
    dataset = None
    if data:
        from sardfq_export.data import load_dataset

        dataset = load_dataset(data, base.data_config, split="test", limit=limit)
    baseline = load_baseline(gates.baseline) if gates.baseline else None
    if baseline is not None:  # refused before the validation runs
        check_baseline(baseline, model=base.name, labelled=dataset is not None,
                       n_images=len(dataset) if dataset is not None else None)  # fmt: skip
    dev = resolve_device(device)
    with on_device(dev, base.model, quantized.model):
        res = validate_deployment(
            say or (lambda _msg: None), base.model, quantized.model, onnx_path, held_images, dataset,
            Path(engine) if engine else None, progress=progress, batches=batches,
        )  # fmt: skip
    report = build_report(
        model=base.name,
        scheme=quantized.scheme.name,
        target="tensorrt" if engine else "onnxruntime",
        calibration=quantized.summary.get("calib") or {},
        accuracy=res.get("accuracy"),
        fidelity=res.get("fidelity"),
        latency=res.get("latency"),
        lint=lint_model(str(onnx_path)).to_dict(),
        gates=None,
        artifacts=None,
        op_census=res.get("op_census"),
        runtime=runtime_record(dev),
        preprocessing=preprocessing(base),
    )
    report["gates"] = evaluate_gates(report, gates, labelled=dataset is not None, baseline=baseline)
    return Report.from_dict(report)


def runtime_record(device: torch.device, precision: str | None = None) -> dict:
    """report.json's ``runtime``: where torch ran, its threads and (when it applies) the precision."""
    rec = {"device": str(device), "device_name": describe_device(device), "threads": torch.get_num_threads()}
    if precision is not None:
        rec["precision"] = precision
    return rec
