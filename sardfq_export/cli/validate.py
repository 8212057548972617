"""``sardfq-export validate``: a deployed model (ONNX Runtime or TensorRT) against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sardfq_export.cli.options import (
    device_options,
    gate_options,
    gate_spec,
    model_options,
    output_options,
    preprocessing_overrides,
    runtime_device,
)
from sardfq_export.core.errors import UserInputError


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
@device_options
@click.option(
    "--out", type=click.Path(file_okay=False), default=None, help="Write report.json / report.md here."
)
@gate_options
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
    device,
    threads,
    out,
    quiet,
    as_json,
    **gate_opts,
):
    """Fidelity, accuracy, latency and gates of a deployed model (exit 3 when a gate fails)."""
    from sardfq_export import api
    from sardfq_export.calibrators import load_quantized_model
    from sardfq_export.core.calibset import CalibSet
    from sardfq_export.validation.gates import enforce
    from sardfq_export.validation.plots import draw_report_plots
    from sardfq_export.validation.report import render_summary, write_report

    gates = gate_spec(gate_opts)
    if gates.max_top1_drop is not None and not data:
        raise UserInputError("--max-top1-drop needs --data")
    try:
        batch_sizes = tuple(int(b) for b in batches.split(","))
    except ValueError:
        raise UserInputError(f"--batches takes comma-separated sizes, got {batches!r}") from None
    dev = runtime_device(device, threads)  # CUDA asked for and absent: one line, exit 2
    loaded, qmodel = load_quantized_model(quantized, model, checkpoint, random_init)
    loaded = preprocessing_overrides(loaded)
    q = api.Quantized(qmodel, loaded, api.QuantizeConfig(scheme=qmodel.scheme.name),
                      {"calib": {"images": images or "gaussian noise"}})  # fmt: skip

    def say(msg: str) -> None:  # --quiet drops the progress bars, not these lines
        if not as_json:
            click.echo(msg, err=True)

    report = api.validate(
        q, onnx_path, data=data, held_images=CalibSet.load(images) if images else None, engine=engine,
        gates=gates, limit=limit, batches=batch_sizes,
        progress=not (quiet or as_json), say=say, device=dev,
    )  # fmt: skip
    result = report.to_dict()
    if out:  # report.json, report.md and the plots it embeds (latency, accuracy with --data)
        result["plots"] = draw_report_plots(out, result, say=say)
        write_report(out, result)
    if as_json:
        click.echo(json.dumps(result, default=str))
    elif not quiet:
        click.echo(render_summary(result, Path(onnx_path).parent))
    enforce(report.gates)
