"""Validate a deployed model against its PyTorch references: fidelity, accuracy, latency, op census.

One function serves the main job, ``sardfq-export validate`` and the API's ``validate``: the float
model, the fake-quant model and the deployed runtime (ONNX Runtime, or a TensorRT engine) run the
same held-out images and, when given, the same labelled data set.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

LATENCY_BATCHES = (1, 32)
ORT_MODEL = "model.ort.onnx"  # the onnxruntime target's deployed graph (ORT contrib ops)


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
    from sardfq_export.exporters.ort import (
        OrtConfig,
        create_session,
        describe,
        op_census,
        write_deployment_graph,
    )
    from sardfq_export.validation import fidelity as fid
    from sardfq_export.validation import latency
    from sardfq_export.validation.evaluate import evaluate
    from sardfq_export.validation.runners import OrtRunner, TensorRTRunner, TorchRunner

    threads = torch.get_num_threads()
    device = "cuda" if engine_path and torch.cuda.is_available() else "cpu"
    fp32 = TorchRunner(float_model, "torch-fp32", device=device)
    fq = TorchRunner(qmodel, "torch-fakequant", device=device)
    result: dict = {}
    if engine_path:
        deployed = TensorRTRunner(str(engine_path))
    else:
        ort_cfg = OrtConfig(threads=threads)
        ort_path, run_cfg = write_deployment_graph(onnx_path, Path(onnx_path).with_name(ORT_MODEL), ort_cfg)
        result["deployed_model"] = ort_path.name
        deployed = OrtRunner(create_session(ort_path, run_cfg), name="onnxruntime")
        result["op_census"] = op_census(ort_path, run_cfg)
        result["runtime_settings"] = describe(ort_cfg)
        census = result["op_census"]
        say(
            f"op census of {ort_path.name}: {census['int8_gemm']} int8 GEMMs, {census['int4_gemm']} INT4 "
            f"GEMMs, {census['float_gemm']} float GEMMs, {census.get('attention', 0)} fused attentions"
        )
    say(f"fidelity on {len(held_images)} held-out images")
    result["fidelity"] = fid.fidelity(fp32, fq, deployed, held_images)
    if dataset is not None:
        accs = {}
        if fp32_accuracy is not None:
            accs["fp32"] = dict(fp32_accuracy)
            say(f"accuracy: {fp32.name} reused from an earlier run on the same model and data")
        for key, runner in (("fp32", fp32), ("fakequant", fq), ("deployed", deployed)):
            if key in accs:
                continue
            say(f"accuracy: {runner.name} on {len(dataset)} images")
            accs[key] = evaluate(runner, dataset, 256, progress=progress, desc=runner.name)
        result["accuracy"] = {
            "dataset": dataset.name,
            "n": len(dataset),
            "fp32_top1": accs["fp32"]["top1"],
            "fp32_top5": accs["fp32"]["top5"],
            "fakequant_top1": accs["fakequant"]["top1"],
            "deployed_top1": accs["deployed"]["top1"],
            "top1_drop": (accs["fp32"]["top1"] - accs["deployed"]["top1"]) * 100.0,
            "deployed_agreement_vs_fakequant": float(
                (accs["deployed"]["predictions"] == accs["fakequant"]["predictions"]).double().mean()
            ),
        }
    say(f"latency: {fp32.name} vs {deployed.name}, batches {batches}")
    result["latency"] = latency.compare(
        fp32, deployed, held_images, batches, warmup=3, iters=25, max_seconds=15.0
    )
    return result
