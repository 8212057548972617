"""calibrators: deployable fake-quant ViTs (schemes, range calibration, reconstruction, fine-tuning).

The fake-quant model is the numerical reference of every deployed engine: symmetric, zero-point 0,
round-half-to-even, per-channel weights, per-tensor activations, INT4 blocks of 64/128.

    qmodel = quantize_model(float_model, "w8a8")          # instrumented copy, float untouched
    calibrate(qmodel, calib_images, method="mse")          # scales frozen as buffers
    reconstruct_blocks(qmodel, float_model, calib_images)  # optional: SARDFQ stage 2
    teacher_student(qmodel, teacher, images, AdaptiveConfig().resolve(family), prepare=...)  # PSAQ-ViT V2
    save_quantized(qmodel, out_dir, {"name": ...})         # later: load_quantized(out_dir, float_model)

Imports only sardfq_export.core and sardfq_export.models (the layering test checks it).
"""

from sardfq_export.calibrators.adaptive import AdaptiveConfig, discrepancy, teacher_student
from sardfq_export.calibrators.awq import awq_scale
from sardfq_export.calibrators.bias_correct import correct_biases
from sardfq_export.calibrators.calibrate import (
    ACT_METHODS,
    WEIGHT_METHODS,
    HistogramCollector,
    calibrate,
    calibrate_weight,
)
from sardfq_export.calibrators.frame import frame
from sardfq_export.calibrators.gptq import gptq_round, gptq_weights
from sardfq_export.calibrators.instrument import (
    UnsupportedModelError,
    block_names,
    check_model,
    iter_quantizers,
    mark_modified,
    quant_summary,
    quantize_model,
    set_explicit_attention,
    set_quantizers_enabled,
)
from sardfq_export.calibrators.lowpass import lowpass
from sardfq_export.calibrators.modules import QuantAttention, QuantConv2d, QuantLinear, QuantWindowAttention
from sardfq_export.calibrators.persist import (
    is_quantized_dir,
    load_quantized,
    load_quantized_model,
    model_fingerprint,
    read_meta,
    save_quantized,
)
from sardfq_export.calibrators.quantizer import TensorQuantizer
from sardfq_export.calibrators.reconstruct import distill, reconstruct_blocks
from sardfq_export.calibrators.scheme import SCHEMES, PerBlock, PerChannel, PerTensor, Scheme, get_scheme
from sardfq_export.calibrators.sensitivity import fidelity_to_float, keep_fp_for_target, layer_sensitivity
from sardfq_export.calibrators.smooth import smooth_quant

__all__ = [
    "lowpass",
    "frame",
    "ACT_METHODS", "WEIGHT_METHODS", "HistogramCollector", "calibrate", "calibrate_weight", "correct_biases",
    "UnsupportedModelError", "block_names", "check_model", "iter_quantizers", "mark_modified", "quant_summary",
    "quantize_model", "set_explicit_attention", "set_quantizers_enabled",
    "QuantAttention", "QuantConv2d", "QuantLinear", "QuantWindowAttention",
    "is_quantized_dir", "load_quantized", "load_quantized_model", "model_fingerprint", "read_meta", "save_quantized",
    "TensorQuantizer", "gptq_round", "gptq_weights", "fidelity_to_float", "keep_fp_for_target", "layer_sensitivity",
    "distill", "AdaptiveConfig", "discrepancy", "teacher_student",
    "reconstruct_blocks",
    "smooth_quant", "awq_scale", "SCHEMES", "PerBlock", "PerChannel", "PerTensor", "Scheme", "get_scheme",
]  # fmt: skip
