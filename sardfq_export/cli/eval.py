"""``sardfq-export eval``: top-1/top-5 of a model on real labelled data."""

from __future__ import annotations

import json

import click

from sardfq_export.cli.options import (
    device_options,
    load_from_options,
    model_options,
    output_options,
    runtime_device,
)


@click.command("eval")
@model_options
@click.option(
    "--data",
    required=True,
    metavar="D",
    help="'fashion-mnist', an ImageNet-style folder, or a folder of IDX files.",
)
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@device_options
@output_options
def eval_cmd(model, checkpoint, random_init, data, split, limit, batch_size, device, threads, quiet, as_json):
    """Top-1/top-5 of a model (float, or a quantized DIR) on real labelled data."""
    from sardfq_export.core.device import on_device
    from sardfq_export.data import load_dataset
    from sardfq_export.validation.evaluate import evaluate
    from sardfq_export.validation.runners import TorchRunner

    dev = runtime_device(device, threads)  # CUDA asked for and absent: one line, exit 2
    loaded = load_from_options(model, checkpoint, random_init)
    dataset = load_dataset(data, loaded.data_config, split=split, limit=limit)
    with on_device(dev, loaded.model):
        runner = TorchRunner(
            loaded.model, name=loaded.extra.get("runner_name", "torch-fp32"), device=str(dev)
        )
        result = evaluate(runner, dataset, batch_size, progress=not (quiet or as_json))
    out = {
        "model": loaded.name,
        "source": loaded.source,
        "dataset": result["dataset"],
        "n": result["n"],
        "top1": result["top1"],
        "top5": result["top5"],
        "device": str(dev),
        "preprocessing": dataset.preprocessing,
    }
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(
            f"{loaded.name} on {result['dataset']} (n={result['n']}): "
            f"top-1 {result['top1'] * 100:.2f}%  top-5 {result['top5'] * 100:.2f}%"
        )
