"""``sardfq-export quantize``: build, calibrate (and optionally fine-tune) a fake-quant model.

    sardfq-export quantize [--model M] --calib real:DIR|real:fashion-mnist|FILE --num-images N
                           --scheme S [--range auto|minmax|percentile|mse] [--finetune none|recon|kd|recon+kd]
                           --out DIR

Writes ``DIR/quantized/`` (scales, scheme, base-model reference); ``sardfq-export eval --model DIR``
evaluates it and later stages reload it without recomputing anything.
"""

from __future__ import annotations

import json

import click

from sardfq_export.cli.options import (
    device_options,
    load_from_options,
    model_options,
    output_options,
    precision_option,
    recipe_config,
    recipe_options,
    runtime_device,
)
from sardfq_export.core.errors import UserInputError


@click.command("quantize")
@model_options
@click.option(
    "--calib", required=True, metavar="C", help="real:DIR | real:fashion-mnist | a calib.safetensors FILE."
)
@click.option("--num-images", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--scheme",
    default="w8a8",
    show_default=True,
    metavar="S",
    help="w8a8, w4a16, w4a16_b64, w4a8, w4a4, research_w4a4_log2 (not exportable).",
)
@recipe_options
@click.option(
    "--iters", type=click.IntRange(min=0), default=None, help="Fine-tuning iterations (per block for recon)."
)
@click.option(
    "--lr",
    type=float,
    default=None,
    help="Fine-tuning learning rate (by default: recon --recon-lr, kd 1e-5).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True)
@device_options
@precision_option
@output_options
def quantize(
    model,
    checkpoint,
    random_init,
    calib,
    num_images,
    scheme,
    iters,
    lr,
    seed,
    out,
    device,
    threads,
    precision,
    quiet,
    as_json,
    **recipe,
):
    """Build and calibrate a fake-quant model; write it to OUT/quantized/."""
    from sardfq_export import api
    from sardfq_export.core.distributed import barrier, init_from_env
    from sardfq_export.synthesis.sources import calib_kind

    dev = runtime_device(device, threads)  # CUDA asked for and absent: one line, exit 2
    if calib_kind(calib) == "method":
        raise UserInputError(
            f"--calib {calib}: quantize takes real:DIR, real:fashion-mnist or a calib.safetensors file; "
            f"make one with 'sardfq-export synthesize --method {calib} --out calib.safetensors' (or run the main job)"
        )
    if calib_kind(calib) == "adaptive":
        # its images and its model are one run: the main job saves and resumes both
        raise UserInputError(
            f"--calib {calib} distills the model together with its images: run the main job "
            f"('sardfq-export --calib {calib} ...'), which saves both and resumes"
        )
    # Under torchrun: fine-tuning runs data-parallel (calibrators.parallel), NCCL on cuda:LOCAL_RANK.
    rank, world = init_from_env(device)
    loaded = load_from_options(model, checkpoint, random_init)
    if loaded.extra.get("scheme") is not None:
        raise UserInputError("--model names an already quantized folder: pass the float model it came from")
    progress = not (quiet or as_json)
    cfg = recipe_config(recipe, scheme=scheme, iters=iters, lr=lr, seed=seed, precision=precision)
    finetune = cfg.finetune
    q = api.quantize(loaded, calib, cfg, num_images=num_images, progress=progress, device=dev)
    summary = q.summary
    if rank != 0:  # every process holds the same model; one writes it
        barrier()
        return
    folder = q.save(out, extra={"calib": {"spec": calib, **summary["calib"]}, "finetune": finetune, "seed": seed,
                                "processes": world, "device": str(dev)})  # fmt: skip
    barrier()
    s = q.scheme
    result = {"model": loaded.name, "scheme": s.name, "exportable": s.exportable, "out": str(folder),
              "calib": calib, "num_images": summary["calib"]["num_images"], **cfg.to_dict(), **summary}  # fmt: skip
    if as_json:
        click.echo(json.dumps(result, default=str))
    else:
        click.echo(f"{s}")
        click.echo(
            f"quantized {loaded.name}: {summary['quant']['quant_linear']} Linear(s), range {cfg.range}, "
            f"fine-tune {finetune}, {summary['calib']['num_images']} calibration images, {summary['seconds']} s "
            f"→ {folder}"
        )
