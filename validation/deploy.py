"""Validate a deployed model against its PyTorch references: fidelity, accuracy, latency, op census.

One function serves the main job, ``sardfq-export validate`` and the API's ``validate``: the float
model, the fake-quant model and the deployed runtime (ONNX Runtime, or a TensorRT engine) run the
same held-out images and, when given, the same labelled data set. Latency is measured against the
same runtime in float (ORT FP32 of the float export, or a TensorRT FP16 engine of it), with
PyTorch eager FP32 as an extra column.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

LATENCY_BATCHES = (1, 32)
ORT_MODEL = "model.ort.onnx"  # the onnxruntime target's deployed graph (ORT contrib ops)
FP32_MODEL = "model.fp32.onnx"  # the float model, exported as model.onnx is: ORT FP32 latency baseline
FP16_MODEL = "model.fp16.onnx"  # the same in FP16: the TensorRT FP16 baseline engine is built from it
FP16_ENGINE = "model.fp16.engine"
LATENCY_FORMAT = 2  # bump when the latency section changes (cached validations are redone)


def top1_drop_points(fp32_top1: float, deployed_top1: float) -> float:
    """FP32 → deployed top-1 drop in points. Rounded to 1e-9: both are k/n fractions, and without it
    0.91 - 0.90 gives 1.0000000000000009 points, which failed a 1.0-point gate on an exact 1.0 drop."""
    return round((fp32_top1 - deployed_top1) * 100.0, 9)


def validate_deployment(
    say: Callable[[str], None],
    float_model: torch.nn.Module,
    qmodel: torch.nn.Module,
    onnx_path: Path,
    held_images: torch.Tensor,
    dataset=None,
    engine_path: Path | None = None,
    progress: bool = True,
    batches: tuple[int, ...] = LATENCY_BATCHES,
    fp32_accuracy: dict | None = None,
) -> dict:
    """Fidelity, accuracy (when ``dataset``), latency and (ORT) op census of the deployed model.

    ``fp32_accuracy`` ({"top1", "top5"} of the float model on ``dataset``) skips re-evaluating it.
    For ONNX Runtime, the graph ORT runs is written beside ``onnx_path`` as ``model.ort.onnx`` so
    that what was measured is what the team deploys.
    """
    from sardfq_export.calibrators.quantizer import frozen_weights, perturbed_activations
    from sardfq_export.exporters.onnx_export import export_float_onnx
    from sardfq_export.exporters.ort import (
        OrtConfig,
        create_session,
        describe,
        op_census,
        write_deployment_graph,
    )
    from sardfq_export.validation import fidelity as fid
    from sardfq_export.validation import latency
    from sardfq_export.validation.evaluate import evaluate_runners
    from sardfq_export.validation.runners import OrtRunner, TensorRTRunner, TorchRunner

    from sardfq_export.core.device import module_device

    threads = torch.get_num_threads()  # --threads pins it: PyTorch and every ORT session use it
    # The PyTorch references run where the caller put the float model (--device); a TensorRT
    # engine's references run on its GPU.
    device = str(module_device(float_model))
    if engine_path and torch.cuda.is_available() and not device.startswith("cuda"):
        device = "cuda"
    fp32 = TorchRunner(float_model, "torch-fp32", device=device)
    fq = TorchRunner(qmodel, "torch-fakequant", device=device)
    result: dict = {"torch_device": device}
    input_size = tuple(held_images.shape[1:])
    baseline_note = ""
    if engine_path:
        deployed = TensorRTRunner(str(engine_path))
        reference, baseline_note = _tensorrt_fp16_baseline(float_model, onnx_path, input_size, batches, say)
        if reference is not None:  # the files the baseline was built from and runs (the job's artifacts)
            result["reference_model"], result["reference_engine"] = FP16_MODEL, FP16_ENGINE
        reference = reference or fp32  # without an FP16 engine, PyTorch eager stays the reference
    else:
        ort_cfg = OrtConfig(threads=threads)
        ort_path, run_cfg = write_deployment_graph(onnx_path, Path(onnx_path).with_name(ORT_MODEL), ort_cfg)
        result["deployed_model"] = ort_path.name
        deployed = OrtRunner(create_session(ort_path, run_cfg), name="onnxruntime")
        result["runtime_settings"] = describe(ort_cfg)
        # The census ran model.ort.onnx, whose attention is already folded (run_cfg only skips
        # folding it twice): its settings are the deployment's, as runtime_settings says.
        result["op_census"] = op_census(ort_path, run_cfg) | {"settings": result["runtime_settings"]}
        census = result["op_census"]
        say(
            f"op census of {ort_path.name}: {census['int8_gemm']} int8 GEMMs, {census['int4_gemm']} INT4 "
            f"GEMMs, {census['float_gemm']} float GEMMs, {census.get('attention', 0)} fused attentions"
        )
        # The baseline: the float model exported the same way, in ORT with the same settings (its
        # float attention is fused in memory exactly as model.ort.onnx's was on disk).
        fp32_path = export_float_onnx(float_model, Path(onnx_path).with_name(FP32_MODEL), input_size)
        reference = OrtRunner(create_session(fp32_path, ort_cfg), name="onnxruntime-fp32")
        result["reference_model"] = fp32_path.name
    # The weights and scales are fixed from here on: each weight is fake-quantized once, not per
    # batch (bit-identical logits; calibrators.quantizer.frozen_weights).
    with frozen_weights(qmodel):
        say(f"fidelity on {len(held_images)} held-out images")
        # The floor perturbs every activation quantizer's input, as another runtime's rounding does.
        result["fidelity"] = fid.fidelity(
            fp32,
            fq,
            deployed,
            held_images,
            perturb=lambda: perturbed_activations(qmodel, rel=fid.NOISE_FLOOR_SIGMA),
        )
        if dataset is not None:
            accs = {}
            if fp32_accuracy is not None:
                accs["fp32"] = dict(fp32_accuracy)
                say(f"accuracy: {fp32.name} reused from an earlier run on the same model and data")
            todo = {
                k: r for k, r in (("fp32", fp32), ("fakequant", fq), ("deployed", deployed)) if k not in accs
            }
            say(f"accuracy: {', '.join(r.name for r in todo.values())} on {len(dataset)} images, one pass")
            accs |= evaluate_runners(todo, dataset, 256, progress=progress, desc="accuracy")
            result["accuracy"] = {
                "dataset": dataset.name,
                "n": len(dataset),
                "fp32_top1": accs["fp32"]["top1"],
                "fp32_top5": accs["fp32"]["top5"],
                "fakequant_top1": accs["fakequant"]["top1"],
                "deployed_top1": accs["deployed"]["top1"],
                "top1_drop": top1_drop_points(accs["fp32"]["top1"], accs["deployed"]["top1"]),
                "deployed_agreement_vs_fakequant": float(
                    (accs["deployed"]["predictions"] == accs["fakequant"]["predictions"]).double().mean()
                ),
            }
    extras = {"torch_fp32": fp32} if reference is not fp32 else {}
    say(
        f"latency: {deployed.name} vs {reference.name}"
        + (f" (and {fp32.name})" if extras else "")
        + f", batches {batches}"
    )
    lat = latency.compare(
        reference, deployed, held_images, batches, warmup=3, iters=25, max_seconds=15.0, extras=extras
    )
    lat["baseline"] = (
        f"{reference.name}: the same runtime in float"
        if reference is not fp32
        else f"{fp32.name} (PyTorch eager)"
    )
    if baseline_note:
        lat["baseline_note"] = baseline_note
    result["latency"] = lat
    for b, row in lat["by_batch"].items():
        if row.get("noisy"):
            lo, hi = row["speedup_spread"]
            say(
                f"latency batch {b}: noisy (round ratios {lo:.2f}–{hi:.2f}×"
                + (", after a re-measurement)" if row.get("remeasured") else ")")
            )
    return result


def _tensorrt_fp16_baseline(float_model, onnx_path, input_size, batches, say) -> tuple[object | None, str]:
    """(runner, note): a TensorRT FP16 engine of the float model, built beside ``onnx_path`` with
    the same build settings as the deployed engine, for the headline speed-up of a TensorRT
    engine; ``(None, why)`` when it cannot be built (PyTorch eager then stays the reference).

    Not run in this project's CI (no GPU there): TensorRT builds the FP16 ONNX strongly typed
    (exporters.tensorrt), so the engine is FP16 on TensorRT 10 and 11 alike.
    """
    from sardfq_export.exporters.onnx_export import export_float_onnx
    from sardfq_export.exporters.tensorrt import EngineConfig, build_engine, tensorrt_status
    from sardfq_export.validation.runners import TensorRTRunner

    from sardfq_export.core.io import DiskFullError

    ok, why = tensorrt_status()
    if not ok:  # (build_engine would write build_engine.sh for this engine over the deployed one's)
        return None, f"no TensorRT FP16 baseline ({why}); the speed-up is over PyTorch eager FP32"
    here = Path(onnx_path).parent
    try:
        say(f"latency baseline: TensorRT FP16 engine of the float model ({FP16_ENGINE})")
        fp16_path = export_float_onnx(float_model, here / FP16_MODEL, input_size, fp16=True)
        res = build_engine(
            fp16_path, here / FP16_ENGINE, "input", input_size, EngineConfig(max_batch=max(32, *batches))
        )
        return TensorRTRunner(str(res.engine), name="tensorrt-fp16"), ""
    except DiskFullError:
        raise
    except Exception as exc:  # the baseline must not sink the validation of the deployed engine
        note = (
            f"no TensorRT FP16 baseline ({type(exc).__name__}: {str(exc)[:200]}); the speed-up is over "
            "PyTorch eager FP32"
        )
        say(f"latency: {note}")
        return None, note
