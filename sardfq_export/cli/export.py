"""``sardfq-export export`` (quantized model → QDQ ONNX [→ TensorRT engine]) and ``sardfq-export lint``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sardfq_export.cli.options import (
    device_options,
    model_options,
    output_options,
    preprocessing_overrides,
    runtime_device,
)
from sardfq_export.core.errors import UserInputError


@click.command("export")
@model_options
@click.option(
    "--quantized",
    required=True,
    metavar="DIR",
    help="A quantized/ folder (from 'quantize' or a job's --out).",
)
@click.option("--out", "out", type=click.Path(dir_okay=False), default="model.onnx", show_default=True)
@click.option(
    "--target", type=click.Choice(["onnx", "onnxruntime", "tensorrt"]), default="onnx", show_default=True
)
@click.option(
    "--fp16/--no-fp16", default=None, help="Unquantized ops in FP16, FP32 I/O (default: on for tensorrt)."
)
@click.option(
    "--opset", type=click.IntRange(17, 23), default=None, help="ONNX opset (default 17; 19 fp16; 21 INT4)."
)
@click.option(
    "--batch-range", default="1,8,32", show_default=True, help="TensorRT profile min,opt,max batch."
)
@device_options
@output_options
def export(model, checkpoint, random_init, quantized, out, target, fp16, opset, batch_range, device, threads, quiet,
           as_json):  # fmt: skip
    """Export a quantized model to TensorRT-ready QDQ ONNX (and build the engine for --target tensorrt)."""
    from sardfq_export import api
    from sardfq_export.calibrators import load_quantized_model
    from sardfq_export.exporters.lint import format_report

    dev = runtime_device(device, threads)  # CUDA asked for and absent: one line, exit 2
    loaded, qmodel = load_quantized_model(quantized, model, checkpoint, random_init)
    loaded = preprocessing_overrides(loaded)
    q = api.Quantized(qmodel, loaded, api.QuantizeConfig(scheme=qmodel.scheme.name))
    overrides = {"opset": opset} if fp16 is None else {"opset": opset, "fp16": fp16}
    res = api.export(q, out, target=target, device=dev, **overrides)
    result = res.to_dict()
    if target == "onnxruntime":
        from sardfq_export.exporters.ort import op_census

        result["op_census"] = op_census(out)
    if not quiet and not as_json:
        click.echo(f"wrote {out} (opset {res.opset}, scheme {res.scheme}, weights {res.weights})")
        if res.lint is not None:
            click.echo(format_report(res.lint, str(out)))
    if target == "tensorrt":
        from sardfq_export.exporters.tensorrt import EngineConfig, build_engine

        try:
            lo, opt, hi = (int(v) for v in batch_range.split(","))
        except ValueError:
            raise UserInputError(
                f"--batch-range takes min,opt,max (e.g. 1,8,32), got {batch_range!r}"
            ) from None
        engine = build_engine(
            out,
            Path(out).with_suffix(".engine"),
            "input",
            tuple(loaded.input_size),
            EngineConfig(lo, opt, hi),
        )
        result["engine"] = {"path": str(engine.engine), "log": str(engine.log), "versions": engine.versions}
    if as_json:
        click.echo(json.dumps(result, default=str))


@click.command("lint")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as one JSON object.")
def lint(file, as_json):
    """Check an ONNX file against TensorRT's Q/DQ rules. Exit 0: passed; exit 2: violations (listed)."""
    from sardfq_export.exporters.lint import format_report, lint_model

    report = lint_model(file)  # an empty, missing or unreadable file: one line, exit 2
    if as_json:
        click.echo(json.dumps({"file": file, **report.to_dict()}))
    else:
        click.echo(format_report(report, file))
    if not report.passed:
        raise UserInputError(f"{file}: {len(report.violations)} TensorRT rule violation(s)")
