"""``sardfq-export validate``: a deployed model (ONNX Runtime or TensorRT) against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sardfq_export.errors import UserInputError
from sardfq_export.options import model_options, output_options


@click.command("validate")
@model_options
@click.option(
    "--quantized", required=True, metavar="DIR", help="The quantized/ folder the ONNX was exported from."
)
@click.option(
    "--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False), help="The exported model.onnx."
)
@click.option(
    "--engine",
    type=click.Path(dir_okay=False),
    default=None,
    help="A TensorRT engine (validates it instead of ORT).",
)
@click.option(
    "--images",
    default=None,
    metavar="F",
    help="Held-out images (a .safetensors calibration set) for fidelity.",
)
@click.option(
    "--data", default=None, metavar="D", help="Real labelled data for accuracy: 'fashion-mnist' or DIR."
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N real images."
)
@click.option("--batches", default="1,32", show_default=True, help="Latency batch sizes.")
@click.option(
    "--out", type=click.Path(file_okay=False), default=None, help="Write report.json / report.md here."
)
@click.option("--max-top1-drop", type=float, default=None)
@click.option("--min-agreement", type=float, default=None)
@click.option("--min-speedup", type=float, default=None)
@output_options
def validate(
    model,
    checkpoint,
    random_init,
    quantized,
    onnx_path,
    engine,
    images,
    data,
    limit,
    batches,
    out,
    max_top1_drop,
    min_agreement,
    min_speedup,
    quiet,
    as_json,
):
    """Fidelity, accuracy, latency and gates of a deployed model (exit 3 when a gate fails)."""
    import torch

    from exporters.lint import lint_model
    from sardfq_export.calibset import CalibSet
    from sardfq_export.cmd_export import load_quantized_model
    from sardfq_export.pipeline import validate_deployment
    from validation.gates import GateSpec, enforce, evaluate_gates
    from validation.report import build_report, write_report

    if max_top1_drop is not None and not data:
        raise UserInputError("--max-top1-drop needs --data")
    try:
        batch_sizes = tuple(int(b) for b in batches.split(","))
    except ValueError:
        raise UserInputError(f"--batches takes comma-separated sizes, got {batches!r}") from None
    loaded, qmodel = load_quantized_model(quantized, model, checkpoint, random_init)
    if images:
        held = CalibSet.load(images).images
    else:
        gen = torch.Generator().manual_seed(0)
        held = torch.randn(32, *loaded.input_size, generator=gen)
    dataset = None
    if data:
        from validation.data import load_dataset

        dataset = load_dataset(data, loaded.data_config, split="test", limit=limit)

    def say(msg: str) -> None:
        if not (quiet or as_json):
            click.echo(msg, err=True)

    res = validate_deployment(
        say,
        loaded,
        qmodel,
        Path(onnx_path),
        held,
        dataset,
        Path(engine) if engine else None,
        progress=not (quiet or as_json),
        batches=batch_sizes,
    )
    scheme = getattr(getattr(qmodel, "scheme", None), "name", "unknown")
    report = build_report(
        model=loaded.name,
        scheme=scheme,
        target="tensorrt" if engine else "onnxruntime",
        calibration={"images": images or "gaussian noise"},
        accuracy=res.get("accuracy"),
        fidelity=res.get("fidelity"),
        latency=res.get("latency"),
        lint=lint_model(onnx_path).to_dict(),
        gates=None,
        artifacts=None,
        op_census=res.get("op_census"),
    )
    report["gates"] = evaluate_gates(report, GateSpec(max_top1_drop, min_agreement, min_speedup))
    if out:
        write_report(out, report)
    if as_json:
        click.echo(json.dumps(report, default=str))
    elif not quiet:
        from sardfq_export.pipeline import print_summary

        print_summary(report, Path(onnx_path).parent)
    enforce(report["gates"])
