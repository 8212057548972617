"""The main job: ``sardfq-export [options]`` chains synthesize → quantize → export → validate."""

from __future__ import annotations

import click

from sardfq_export import __version__
from sardfq_export.cli import LazyGroup
from sardfq_export.options import model_options, output_options

TARGETS = ("onnx", "onnxruntime", "tensorrt")


@click.group(
    cls=LazyGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(__version__, prog_name="sardfq-export")
@model_options
@click.option(
    "--bits",
    type=click.Choice(["8", "4"]),
    default=None,
    help="8 → scheme w8a8, 4 → w4a16 (TensorRT INT4 weight-only).",
)
@click.option(
    "--scheme", default=None, metavar="S", help="Scheme by name (w8a8, w4a16, w4a8, w4a4); overrides --bits."
)
@click.option("--target", type=click.Choice(TARGETS), default="onnxruntime", show_default=True)
@click.option(
    "--calib",
    default="sardfq",
    show_default=True,
    metavar="C",
    help="sardfq | psaq | noise | real:DIR | a calib.safetensors file.",
)
@click.option("--num-images", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--iters", type=click.IntRange(min=0), default=None, help="Synthesis iterations (default: the method's)."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--data", default=None, metavar="D", help="Real labelled data for accuracy: 'fashion-mnist' or DIR."
)
@click.option("--out", type=click.Path(file_okay=False), default="sardfq-out", show_default=True)
@click.option(
    "--max-top1-drop", type=float, default=None, help="Gate: fail (exit 3) if top-1 drops more (points)."
)
@click.option(
    "--min-agreement",
    type=float,
    default=None,
    help="Gate: minimum deployed-vs-fake-quant top-1 agreement (0-1).",
)
@click.option(
    "--min-speedup", type=float, default=None, help="Gate: minimum deployed/reference latency speedup."
)
@click.option("--resume", is_flag=True, help="Reuse finished stages and checkpoints in --out.")
@click.option("--overwrite", is_flag=True, help="Replace an --out made with different settings.")
@output_options
@click.pass_context
def cli(ctx: click.Context, **opts) -> None:
    """Data-free quantization of Vision Transformers for TensorRT and ONNX Runtime.

    Without a subcommand, runs the whole job: synthesize calibration images, quantize and
    fine-tune, export, and validate the deployed model against the PyTorch reference.
    """
    if ctx.invoked_subcommand is not None:
        return
    try:
        from sardfq_export.pipeline import run_pipeline
    except ModuleNotFoundError as exc:
        if exc.name != "sardfq_export.pipeline":
            raise
        run_pipeline = None
    if run_pipeline is not None:
        run_pipeline(ctx, **opts)
        return
    click.echo(
        "note: synthesis, quantization and export are not built yet; evaluating the float model only",
        err=True,
    )
    from sardfq_export.cmd_eval import eval_cmd

    ctx.invoke(
        eval_cmd,
        model=opts["model"],
        checkpoint=opts["checkpoint"],
        random_init=opts["random_init"],
        data=opts["data"] or "fashion-mnist",
        split="test",
        limit=None,
        batch_size=256,
        quiet=opts["quiet"],
        as_json=opts["as_json"],
    )
