"""The root command: ``sardfq-export [options]`` is the main job (synthesize → quantize → export → validate);
the stage subcommands hang off it (cli/__init__.SUBCOMMANDS)."""

from __future__ import annotations

import click

from sardfq_export import __version__
from sardfq_export.cli import LazyGroup
from sardfq_export.cli.options import (
    adaptive_pairs,
    device_options,
    gate_options,
    min_free_option,
    model_options,
    output_options,
    precision_option,
    recipe_options,
)

TARGETS = ("onnx", "onnxruntime", "tensorrt")  # sardfq_export.api.TARGETS (kept import-light here)


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
    help="sardfq | psaq | psaq2 (PSAQ-ViT V2: distills the quantized model on images that co-evolve "
    "with it) | noise | real:DIR | a calib.safetensors file.",
)
@click.option("--num-images", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--iters",
    type=click.IntRange(min=0),
    default=None,
    help="Synthesis iterations (default: the method's); for psaq2 its rounds (default 40).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--psaq2",
    "adaptive",
    multiple=True,
    metavar="K=V",
    callback=adaptive_pairs,
    help="With --calib psaq2: a schedule setting (repeatable): rounds, warmup_iters, image_steps, "
    "student_steps, batch_size, image_lr, student_lr, temperature, disc_weight...",
)
@recipe_options
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N of --data."
)
@device_options
@precision_option
@click.option(
    "--data", default=None, metavar="D", help="Real labelled data for accuracy: 'fashion-mnist' or DIR."
)
@click.option("--out", type=click.Path(file_okay=False), default="sardfq-out", show_default=True)
@gate_options
@click.option("--resume", is_flag=True, help="Reuse finished stages and checkpoints in --out.")
@click.option("--overwrite", is_flag=True, help="Replace an --out made with different settings.")
@min_free_option
@output_options
@click.pass_context
def cli(ctx: click.Context, **opts) -> None:
    """Data-free quantization of Vision Transformers for TensorRT and ONNX Runtime.

    Without a subcommand, runs the whole job: synthesize calibration images, quantize and
    fine-tune, export, and validate the deployed model against the PyTorch reference.
    """
    if ctx.invoked_subcommand is not None:
        return
    run_main_job(**opts)


def run_main_job(**opts) -> None:
    """The main job from the command line: options → JobConfig → ``job.run`` → printing, exit codes."""
    import json
    import time

    from sardfq_export.core.errors import MissingComponentError
    from sardfq_export.job import JobConfig, run
    from sardfq_export.validation.gates import enforce
    from sardfq_export.validation.report import render_summary

    # --quiet drops the progress bars and keeps the stage lines; --json keeps stderr for errors.
    progress = not (opts["quiet"] or opts["as_json"])
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        if not opts["as_json"]:
            click.echo(f"[{time.perf_counter() - t0:6.1f}s] {msg}", err=True)

    from sardfq_export.cli.options import gate_spec, model_settings, recipe_config, runtime_device

    device = runtime_device(opts["device"], opts["threads"])  # CUDA asked for and absent: exit 2 here
    quant = recipe_config(opts, precision=opts["precision"])
    cfg = JobConfig(
        model=opts["model"], checkpoint=opts["checkpoint"], random_init=opts["random_init"],
        scheme=opts["scheme"], bits=int(opts["bits"] or 8), target=opts["target"], calib=opts["calib"],
        num_images=opts["num_images"], iters=opts["iters"], seed=opts["seed"], data=opts["data"],
        adaptive=opts["adaptive"],
        out=opts["out"], gates=gate_spec(opts),
        quantize=quant,
        model_settings=tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                    for k, v in model_settings().items())),  # fmt: skip
        limit=opts["limit"], device=str(device), precision=opts["precision"],
        resume=opts["resume"], overwrite=opts["overwrite"], progress=progress, min_free_mb=opts["min_free_mb"],
    )  # fmt: skip
    try:
        report = run(cfg, say=say)
    except MissingComponentError as exc:
        if opts["as_json"] and getattr(exc, "report", None) is not None:
            click.echo(json.dumps(exc.report.to_dict(), default=str))
        raise
    if opts["as_json"]:
        click.echo(json.dumps(report.to_dict(), default=str))
    else:
        click.echo(render_summary(report.to_dict(), cfg.out))
    enforce(report.gates)  # exit 3 when a gate failed, after the report and the summary are out
