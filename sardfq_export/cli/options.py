"""Option groups shared by the main job and the stage subcommands (identical flags everywhere)."""

from __future__ import annotations

import ast
from collections.abc import Callable

import click


def _stack(*decorators: Callable) -> Callable:
    def apply(fn: Callable) -> Callable:
        for dec in reversed(decorators):
            fn = dec(fn)
        return fn

    return apply


def _keep(ctx: click.Context, param: click.Parameter, value):
    """Collect the model-shape options into ``ctx.meta`` (every command gets them, none spells them)."""
    if value not in (None, (), False):
        ctx.meta.setdefault(MODEL_SETTINGS, {})[param.name] = value
    return value


def _img_size(ctx: click.Context, param: click.Parameter, value):
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.lower().split("x")]
    except ValueError:
        raise click.BadParameter("takes N or HxW (e.g. 224 or 224x160)") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise click.BadParameter("takes N or HxW (e.g. 224 or 224x160)")
    return _keep(ctx, param, parts[0] if len(parts) == 1 else tuple(parts))


def _pairs(value, example: str) -> dict:
    out = {}
    for item in value:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: use KEY=VALUE (e.g. {example})")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw  # a plain word (global_pool=avg) is a string
    return out


def _kwargs(ctx: click.Context, param: click.Parameter, value):
    return _keep(ctx, param, _pairs(value, "depth=12 or global_pool=avg") or None)


def adaptive_pairs(ctx: click.Context, param: click.Parameter, value) -> tuple:
    """``--psaq2 K=V``: PSAQ-ViT V2 schedule fields (calibrators.adaptive.AdaptiveConfig), checked
    here so that a typo is one line (exit 2) before any work; sorted (key, value) pairs."""
    pairs = _pairs(value, "warmup_iters=50 or student_lr=2e-5")
    if pairs:
        from sardfq_export.calibrators.adaptive import AdaptiveConfig
        from sardfq_export.core.errors import UserInputError

        try:
            AdaptiveConfig.from_dict(pairs)
        except (UserInputError, TypeError) as exc:
            raise click.BadParameter(str(exc)) from None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in pairs.items()))


def _keep_pre(ctx: click.Context, param: click.Parameter, value):
    """Collect a preprocessing override into the model settings' ``preprocessing`` (timm validate.py's)."""
    if value is not None:
        ctx.meta.setdefault(MODEL_SETTINGS, {}).setdefault("preprocessing", {})[param.name] = value
    return value


MODEL_SETTINGS = "sardfq.model_settings"
# timm's eval-transform choices (sardfq_export.data.INTERPOLATIONS / CROP_MODES; kept import-light for --help)
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
_CROP_MODES = ("center", "squash", "border")

model_options = _stack(
    click.option(
        "--model",
        "model",
        default=None,
        metavar="M",
        help="timm name or alias (deit_t/s/b, vit_s/b, swin_t/s/b), hf-hub:ORG/NAME, local-dir:DIR, "
        "dinov2_s14_fmnist[@224]; omitted: the embedded reference model.",
    ),
    click.option(
        "--checkpoint",
        type=click.Path(dir_okay=False),
        default=None,
        metavar="F",
        help="Weights for --model: .safetensors or a torch file (timm train checkpoints too); never unpickled.",
    ),
    click.option(
        "--random-init",
        is_flag=True,
        help="Random weights instead of timm's pretrained download (structural runs, benchmarks).",
    ),
    click.option("--num-classes", type=click.IntRange(min=0), default=None, expose_value=False, callback=_keep,
                 help="Classifier outputs (default: read off the checkpoint's head)."),
    click.option("--img-size", default=None, metavar="N|HxW", expose_value=False, callback=_img_size,
                 help="Input size (default: read off the checkpoint's pos-embed; another size resamples it)."),
    click.option("--in-chans", type=click.IntRange(min=1), default=None, expose_value=False, callback=_keep,
                 help="Input channels (default: read off the checkpoint's patch embedding)."),
    click.option("--model-kwargs", multiple=True, metavar="K=V", expose_value=False, callback=_kwargs,
                 help="More timm.create_model arguments (repeatable), e.g. --model-kwargs depth=6."),
    click.option("--use-ema", is_flag=True, default=False, expose_value=False, callback=_keep,
                 help="Load the checkpoint's EMA weights (state_dict_ema / model_ema)."),
    # Preprocessing overrides, as timm's validate.py: over the checkpoint's pretrained_cfg and the
    # model's default; recorded in every artifact (quantized/, report.json, ONNX metadata, README).
    click.option("--interpolation", type=click.Choice(_INTERPOLATIONS), default=None, expose_value=False,
                 callback=_keep_pre, help="Resize interpolation (default: the model's / checkpoint's)."),
    click.option("--crop-pct", type=click.FloatRange(0.0, 1.0, min_open=True), default=None, expose_value=False,
                 callback=_keep_pre, help="Centre-crop fraction: resize to size/crop_pct, then crop (1.0: no crop)."),
    click.option("--crop-mode", type=click.Choice(_CROP_MODES), default=None, expose_value=False,
                 callback=_keep_pre, help="timm crop mode (center, squash, border)."),
    click.option("--mean", default=None, metavar="M[,M,M]", expose_value=False, callback=_keep_pre,
                 help="Normalization mean, one value or one per channel (e.g. 0.5 or 0.485,0.456,0.406)."),
    click.option("--std", default=None, metavar="S[,S,S]", expose_value=False, callback=_keep_pre,
                 help="Normalization std, one value or one per channel."),
)  # fmt: skip

# How the fake-quant model is made (the main job and `quantize` share them; api.QuantizeConfig's fields).
recipe_options = _stack(
    click.option(
        "--range",
        "range_method",
        type=click.Choice(["auto", "minmax", "percentile", "mse"]),
        default="auto",
        show_default=True,
        help="Activation range method (auto: minmax for 8-bit activations, mse for 4-bit).",
    ),
    click.option(
        "--range-norm",
        type=click.FloatRange(0.0, min_open=True),
        default=None,
        metavar="P",
        help="With --range mse: the clip minimizing the activations' error sum |x - q(x)|^P; 2 is MSE, a "
        "larger P clips wider. [default: the model's own, else 2]",
    ),
    click.option(
        "--range-views",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Activation ranges from each calibration image and N-1 label-preserving variants of it (mirror, "
        "resized crops); 1: the images alone. [default: the model's own, else 1]",
    ),
    click.option("--weight-range", type=click.Choice(["minmax", "mse"]), default="mse", show_default=True),
    click.option(
        "--weight-rounding",
        type=click.Choice(["auto", "nearest", "gptq"]),
        default="auto",
        show_default=True,
        help="gptq: data-aware rounding of the weights on the calibration set (same scales, same export); "
        "auto: gptq for 4-bit weights, nearest for 8-bit.",
    ),
    click.option(
        "--gptq-views",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="GPTQ's Hessian from each calibration image and N-1 label-preserving variants of it (mirror, "
        "resized crops); 1: the images alone. [default: the model's own, else 1]",
    ),
    click.option(
        "--gptq-tokens",
        type=click.Choice(["uniform", "rollout"]),
        default=None,
        help="How each token counts in GPTQ's Hessian: uniform, or rollout (by how much it reaches the "
        "prediction through the float model's attention; ViTs only). [default: the model's own, else uniform]",
    ),
    click.option(
        "--gptq-target",
        type=click.FloatRange(0.0, 1.0),
        default=None,
        metavar="A",
        help="What each GPTQ-rounded Linear's output is fitted to: 0, the float weights on the quantized "
        "model's inputs (the paper's); 1, the float model's output there (the rounding also absorbs the "
        "earlier layers' error); in between, a mix. [default: the model's own, else 0]",
    ),
    click.option(
        "--calib-lowpass",
        type=click.FloatRange(0.0, 1.0, min_open=True),
        default=None,
        metavar="FRACTION",
        help="Low-pass the calibration images first: each resized to FRACTION of its size and back "
        "(synthetic images carry fine detail real ones lack); 1: off. [default: the model's own, else 1]",
    ),
    click.option(
        "--calib-frame",
        type=click.FloatRange(0.0, 0.5, max_open=True),
        default=None,
        metavar="FRACTION",
        help="Frame the calibration images first: a band of FRACTION of the side on each edge set to one flat "
        "grey per image (synthetic images are texture to the edges); 0: off. [default: the model's own, else 0]",
    ),
    click.option(
        "--keep-fp",
        metavar="PATTERN",
        multiple=True,
        help="Leave these Linears float (timm module-name globs, repeatable), e.g. --keep-fp 'blocks.11.mlp.fc2'; "
        "--keep-fp none: none float. [default: the model's own for the scheme, else none]",
    ),
    click.option(
        "--weight-block",
        type=click.Choice(["64", "128"]),
        help="4-bit weight blocks: input channels per scale. w4a16: INT4 blocks (TensorRT runs both sizes); "
        "w4a8/w4a4: blocks nested on each channel's INT8 step, still an INT8 GEMM. 8-bit weights refuse it. "
        "[default: the model's own for the scheme, else the scheme's]",
    ),
    click.option(
        "--smoothquant",
        type=click.FloatRange(0.0, 1.0, max_open=True),
        metavar="ALPHA",
        help="SmoothQuant: move activation outliers into the weights (LayerNorm→Linear pairs, V→proj), "
        "strength ALPHA; 0: off. [default: the model's own, else off]",
    ),
    click.option(
        "--smooth-fc2/--no-smooth-fc2",
        default=None,
        help="With SmoothQuant: also the MLP's second Linear, via an explicit per-channel Mul (TensorRT "
        "fuses it). [default: the model's own, else off]",
    ),
    click.option(
        "--centre-fc2/--no-centre-fc2",
        default=None,
        help="Centre the MLP's second Linear input per channel (post-GELU values are one-sided): an "
        "explicit Sub before its quantizer, folded into its bias (TensorRT fuses it into the GELU). "
        "[default: the model's own, else off]",
    ),
    click.option(
        "--bias-correct/--no-bias-correct",
        default=None,
        help="After ranges and rounding, each quantized Linear's bias absorbs its output's mean error "
        "on the calibration images (empirical bias correction; the exported graph is unchanged). "
        "[default: the model's own, else off]",
    ),
    click.option(
        "--awq/--no-awq",
        default=None,
        help="4-bit weights: activation-aware per-input-channel scales (AWQ) searched on the calibration "
        "images and folded into the LayerNorms / V / a Mul before fc2; then ranges and rounding. "
        "[default: the model's own, else off]",
    ),
    click.option(
        "--auto-keep-fp",
        type=click.FloatRange(0.0, 1.0, min_open=True),
        metavar="AGREEMENT",
        help="Leave the fewest most-sensitive Linears float for this top-1 agreement with the float "
        "model on held-out images (0-1), e.g. 0.99.",
    ),
    click.option(
        "--finetune",
        type=click.Choice(["none", "recon", "kd", "recon+kd"]),
        default="none",
        show_default=True,
        help="recon: block-wise reconstruction (SARDFQ stage 2); kd: end-to-end distillation.",
    ),
    click.option(
        "--recon-lr",
        type=click.FloatRange(min=0.0, min_open=True),
        default=None,
        metavar="LR",
        help="With --finetune recon: the learning rate of the weights (quantize's --lr overrides it). "
        "[default: the model's own, else the paper's 4e-5]",
    ),
    click.option(
        "--recon-act-lr",
        type=click.FloatRange(min=0.0),
        default=None,
        metavar="LR",
        help="With --finetune recon: also learn each block's activation steps (LSQ-style) at this learning "
        "rate; 0 keeps them frozen (the paper's). [default: the model's own, else 0]",
    ),
    click.option(
        "--recon-views",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="With --finetune recon: reconstruct on the calibration images plus N-1 mirrored/cropped variants "
        "of each. [default: the model's own, else 1]",
    ),
    click.option(
        "--recon-drop",
        type=click.FloatRange(min=0.0, max=1.0, max_open=True),
        default=None,
        metavar="P",
        help="With --finetune recon: while training, leave each activation element unquantized with "
        "probability P (QDrop; its paper uses 0.5). [default: the model's own, else 0]",
    ),
    click.option(
        "--recon-tokens",
        type=click.Choice(["uniform", "rollout", "fisher"]),
        default=None,
        help="With --finetune recon: how each token's output error counts in a block's loss: uniform, "
        "rollout (by how much it reaches the prediction through the float model's attention; ViTs only), or "
        "fisher (each element by its squared gradient of the prediction's divergence, BRECQ's Fisher). "
        "[default: the model's own, else uniform]",
    ),
    click.option(
        "--recon-images",
        type=click.Choice(["calib", "original"]),
        default=None,
        help="With --finetune recon: fit on the images the ranges and GPTQ saw (calib: after --calib-lowpass "
        "and --calib-frame), or on the set as given (original). [default: the model's own, else calib]",
    ),
    click.option(
        "--recon-target",
        type=click.Choice(["float", "local"]),
        default=None,
        help="With --finetune recon: fit each block's output to the float model's (float: the block also "
        "undoes earlier blocks' error) or to the float block on its quantized input (local: its own error "
        "only). [default: the model's own, else float]",
    ),
    click.option(
        "--kd-views/--no-kd-views",
        default=False,
        show_default=True,
        help="kd: distil on fresh random crops of the calibration images each step, not the images "
        "themselves (they stand for more images; needs more steps).",
    ),
)


def _keep_fp(patterns: tuple[str, ...]) -> tuple[str, ...] | None:
    """``--keep-fp`` as QuantizeConfig.keep_fp: not given → None (the model's own), ``none`` → ()."""
    if not patterns:
        return None
    if "none" in patterns:
        if len(patterns) > 1:
            raise click.UsageError("--keep-fp none keeps no Linear float: give it alone, without patterns")
        return ()
    return tuple(patterns)


def recipe_config(opts: dict, **fields):
    """The QuantizeConfig the recipe options describe (plus ``fields``: scheme, seed...)."""
    from sardfq_export.api import QuantizeConfig

    return QuantizeConfig(range=opts["range_method"], range_norm=opts["range_norm"],
                          range_views=opts["range_views"], weight_range=opts["weight_range"],
                          weight_rounding=opts["weight_rounding"], gptq_views=opts["gptq_views"],
                          gptq_tokens=opts["gptq_tokens"], gptq_target=opts["gptq_target"],
                          calib_lowpass=opts["calib_lowpass"], calib_frame=opts["calib_frame"],
                          keep_fp=_keep_fp(opts["keep_fp"]),
                          weight_block=int(opts["weight_block"]) if opts["weight_block"] else None,
                          auto_keep_fp=opts["auto_keep_fp"], smoothquant=opts["smoothquant"],
                          smooth_fc2=opts["smooth_fc2"], centre_fc2=opts["centre_fc2"],
                          bias_correct=opts["bias_correct"], awq=opts["awq"], finetune=opts["finetune"],
                          kd_views=opts["kd_views"], recon_lr=opts["recon_lr"], recon_act_lr=opts["recon_act_lr"],
                          recon_views=opts["recon_views"], recon_drop=opts["recon_drop"],
                          recon_tokens=opts["recon_tokens"], recon_images=opts["recon_images"],
                          recon_target=opts["recon_target"], **fields)  # fmt: skip


# The commands that claim an output (the main job's --out, synthesize's --out file): the free-space
# floor of the pre-flight check (sardfq_export.core.io.preflight_output).
min_free_option = click.option(
    "--min-free-mb",
    type=click.FloatRange(min=0),
    default=200.0,
    show_default=True,
    metavar="MB",
    help="Refuse to start (exit 2) when --out's disk has less free; 0: no free-space check.",
)


class DeviceType(click.ParamType):
    """``auto|cpu|cuda[:N]``; a malformed value is click's one-line usage error (exit 2). Whether
    CUDA is there is checked when the command runs (:func:`runtime_device`), also one line."""

    name = "auto|cpu|cuda[:N]"

    def convert(self, value, param, ctx):
        from sardfq_export.core.device import check_device_spec
        from sardfq_export.core.errors import UserInputError

        try:
            return check_device_spec(value)
        except UserInputError as exc:
            self.fail(str(exc), param, ctx)


# Where torch runs (every command): the same two flags everywhere.
device_options = _stack(
    click.option("--device", type=DeviceType(), default="auto", show_default=True,
                 help="Where PyTorch runs: auto (a CUDA GPU when present, else the CPU), cpu, cuda or cuda:N "
                 "(under torchrun every process takes cuda:LOCAL_RANK)."),
    click.option("--threads", type=click.IntRange(min=1), default=None,
                 help="CPU threads for PyTorch and ONNX Runtime (pins both sides of a latency comparison)."),
)  # fmt: skip

# In what precision synthesis and fine-tuning compute (the main job, synthesize, quantize).
precision_option = click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    help="bf16: autocast for synthesis and fine-tuning on --device (ranges and exported scales stay fp32). "
    "auto: the model's measured default if it has one (the reference model: fp32), else bf16 where --device "
    "runs it natively (CUDA, CPUs with AVX512-BF16/AMX) and fp32 elsewhere.",
)


def runtime_device(device: str, threads: int | None = None):
    """Apply ``--threads`` and resolve ``--device`` (CUDA asked for and absent: one line, exit 2)."""
    import torch

    from sardfq_export.core.device import resolve_device

    if threads:
        torch.set_num_threads(threads)  # ONNX Runtime sessions take torch's thread count
    return resolve_device(device)


output_options = _stack(
    click.option("--quiet", is_flag=True, help="No progress bars."),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (for CI)."),
)


def model_settings() -> dict:
    """The model-shape options of the running command (``--num-classes``...), as loader keywords."""
    ctx = click.get_current_context(silent=True)
    return dict(ctx.find_root().meta.get(MODEL_SETTINGS, {})) if ctx is not None else {}


def preprocessing_overrides(loaded):
    """``loaded`` with this command's --interpolation/--crop-pct/--crop-mode/--mean/--std applied
    (for models rebuilt from a quantized/ folder, whose saved preprocessing they override)."""
    from sardfq_export.models.loading import with_preprocessing

    return with_preprocessing(loaded, model_settings().get("preprocessing"))


def load_from_options(model: str | None, checkpoint: str | None, random_init: bool, quiet: bool = False):
    """Load the model the shared model options name (one place, one behaviour): a float model, or
    the fake-quant model of a ``quantized/`` folder (``--model DIR``). Says what was inferred."""
    from sardfq_export.api import load_model

    loaded = load_model(model, checkpoint, pretrained=not random_init, **model_settings())
    note = loaded.describe_inferred()
    if note and not quiet:
        click.echo(f"note: {note}", err=True)
    return loaded


def _threshold(name: str, metavar: str, help: str) -> Callable:
    """A gate threshold option, range-checked by click (exit 2, one line naming the valid range)."""
    from sardfq_export.validation.gates import THRESHOLDS

    valid, flag, _what = THRESHOLDS[name]
    kind = click.FloatRange(min=valid.lo, max=valid.hi, min_open=valid.lo_open)
    return click.option(flag, name, type=kind, default=None, metavar=metavar, help=f"{help}.")  # + the range


# Gates (the main job and `validate`): thresholds, the per-scheme defaults, the --baseline regression.
gate_options = _stack(
    _threshold("max_top1_drop", "P", "Gate: fail (exit 3) if deployed top-1 drops more than P points (needs --data)"),
    _threshold("min_agreement", "A", "Gate: minimum deployed-vs-fake-quant top-1 agreement"),
    _threshold("min_speedup", "S", "Gate: minimum deployed speed-up over the same runtime in float"),
    _threshold("min_fp32_agreement", "A", "Gate: minimum fake-quant-vs-FP32 top-1 agreement on held-out images"),
    _threshold("min_fp32_cosine", "C", "Gate: minimum deployed-vs-FP32 logit cosine on held-out images"),
    click.option("--no-default-gates", "no_default_gates", is_flag=True,
                 help="Do not apply the scheme's default gates (top-1 drop with --data, else agreement and "
                 "cosine with FP32; and the lint) to thresholds left unset."),
    click.option("--baseline", type=click.Path(), default=None, metavar="PATH",
                 help="report.json (or its folder) of an earlier run of the same model: fail on regressions."),
    _threshold("max_regression", "P", "With --baseline: points of deployed top-1 it may lose (default 0.5)"),
    _threshold("max_agreement_regression", "A",
               "With --baseline: deployed-vs-FP32 agreement it may lose (default 0.005)"),
    _threshold("min_speedup_ratio", "R", "With --baseline: minimum speed-up as a fraction of the baseline's (default 0.8)"),
)  # fmt: skip


def gate_spec(opts: dict):
    """The GateSpec the gate options describe."""
    from sardfq_export.validation.gates import THRESHOLDS, GateSpec

    return GateSpec(defaults=not opts["no_default_gates"], baseline=opts["baseline"],
                    **{name: opts[name] for name in THRESHOLDS})  # fmt: skip
