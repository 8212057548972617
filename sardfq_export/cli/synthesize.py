"""``sardfq-export synthesize``: make a synthetic calibration set (noise, PSAQ-ViT or SARDFQ).

Before loading the model, ``--out`` is checked (writable, room on its disk) and locked for the
run (``.NAME.sardfq-lock`` beside it): a second run into the same file exits 2 naming the first.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from sardfq_export.cli.options import (
    device_options,
    load_from_options,
    min_free_option,
    model_options,
    output_options,
    precision_option,
    runtime_device,
)
from sardfq_export.core.errors import UserInputError
from sardfq_export.core.io import claim_output

METHOD_NAMES = ("sardfq", "psaq", "noise")  # mirrors synthesis.METHODS (kept import-light for --help)


@click.command("synthesize")
@model_options
@click.option("--method", type=click.Choice(METHOD_NAMES), default="sardfq", show_default=True)
@click.option("--num-images", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--iters",
    type=click.IntRange(min=0),
    default=None,
    help="Adam iterations (default: the method's, 1000; the reference model's: 200).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="sardfq-out/calib.safetensors",
    show_default=True,
    help="Calibration set file (.safetensors, plus a .json mirror beside it).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Images optimized together.",
)
@click.option(
    "--lr", type=float, default=None, help="Adam learning rate (default: 0.20 ViT/DeiT, 0.25 Swin)."
)
@click.option(
    "--apa-weight", type=float, default=None, help="SARDFQ attention-prior weight alpha (default per family)."
)
@click.option("--apa/--no-apa", default=True, show_default=True, help="SARDFQ: attention priors alignment.")
@click.option("--msr/--no-msr", default=True, show_default=True, help="SARDFQ: multi-semantic regions.")
@click.option(
    "--soft-labels/--no-soft-labels", default=True, show_default=True, help="SARDFQ: soft-label targets."
)
@click.option(
    "--image-scale",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=None,
    metavar="F",
    help="Optimize the pixels on a grid F times the input side, upsampled every step: smooth images "
    "(default: the model's own, else 1.0).",
)
@click.option(
    "--grey/--colour",
    default=None,
    help="Optimize one grey channel shown to every input channel, for models of grey images "
    "replicated to 3 channels (default: the model's own, else colour).",
)
@click.option(
    "--frame",
    type=click.FloatRange(0.0, 0.5, max_open=True),
    default=None,
    metavar="F",
    help="Optimize only the inside of a flat grey band of F times the side on each edge (one grey per "
    "image): an object on a plain surround instead of texture to the edges. 0: off "
    "(default: the model's own, else 0).",
)
@click.option(
    "--frame-jitter",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    metavar="J",
    help="Draw each image's four band widths in F·[1-J, 1+J], so every image has a window of its own "
    "(size, aspect and place). 0: one centred window.",
)
@precision_option
@click.option("--bf16", is_flag=True, hidden=True, help="Same as --precision bf16 (kept for old scripts).")
@device_options
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True, metavar="N")
@click.option(
    "--resume", is_flag=True, help="Continue an interrupted run from its checkpoint (same settings)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out or checkpoint.")
@click.option(
    "--samples",
    "samples",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to draw samples.png (default: beside --out).",
)
@click.option("--no-samples", is_flag=True, help="Do not draw samples.png.")
@min_free_option
@output_options
def synthesize(
    model,
    checkpoint,
    random_init,
    method,
    num_images,
    iters,
    seed,
    out,
    batch_size,
    lr,
    apa_weight,
    apa,
    msr,
    soft_labels,
    image_scale,
    grey,
    frame,
    frame_jitter,
    precision,
    bf16,
    device,
    threads,
    checkpoint_every,
    resume,
    overwrite,
    samples,
    no_samples,
    min_free_mb,
    quiet,
    as_json,
):
    """Synthesize a calibration set from the model alone and save it to --out."""
    from sardfq_export.core.calibset import CalibSet
    from sardfq_export.core.device import check_precision, precision_note, resolve_precision
    from sardfq_export.core.distributed import init_from_env
    from sardfq_export.synthesis import SynthConfig, checkpoint_path
    from sardfq_export.synthesis import synthesize as run
    from sardfq_export.synthesis.samples import save_samples

    dev = runtime_device(device, threads)  # CUDA asked for and absent: one line, exit 2
    precision = "bf16" if bf16 else precision
    check_precision(precision, dev)
    if (note := precision_note(precision, dev)) and not (quiet or as_json):
        click.echo(note, err=True)
    # Under torchrun: join the process group (NCCL on cuda:LOCAL_RANK, gloo on the CPU); each
    # process takes every K-th batch (runner.py).
    rank, world = init_from_env(device)
    if rank == 0:  # before any work: --out writable, room on its disk, no other job writing it
        quiet_say = (lambda _m: None) if (quiet or as_json) else (lambda m: click.echo(m, err=True))
        click.get_current_context().with_resource(
            claim_output(Path(out), folder=False, say=quiet_say, min_free_mb=min_free_mb)
        )
    loaded = load_from_options(model, checkpoint, random_init)
    bf16 = resolve_precision(precision, dev, loaded.extra.get("precision")) == "bf16"  # auto: by model/device
    cfg = SynthConfig(  # unset fields take the model's own defaults
        method=method,
        num_images=num_images,
        batch_size=batch_size,
        seed=seed,
        iters=iters,
        lr=lr,
        apa_weight=apa_weight,
        apa=apa,
        msr=msr,
        soft_labels=soft_labels,
        bf16=bf16,
        image_scale=image_scale,
        grey=grey,
        frame=frame,
        frame_jitter=frame_jitter,
    ).with_model_defaults(loaded.extra)  # a model may bring its own (the reference model: 200 iterations)
    resolved = cfg.resolve(loaded.family)
    out = Path(out)
    ckpt = checkpoint_path(out, rank, world)
    calib = None
    if out.exists() and not overwrite:
        try:
            existing = CalibSet.load(out)
        except UserInputError as exc:  # e.g. truncated: say what to do
            raise UserInputError(f"{exc} (pass --overwrite to make it again)") from None
        same = (
            existing.meta.get("config") == json.loads(json.dumps(resolved.to_dict()))
            and existing.meta.get("model") == loaded.name
        )
        if not (resume and same):
            raise UserInputError(
                f"{out} already exists{'' if same else ' with other settings'}: pass --overwrite to replace it"
                + (" or --resume to reuse it" if same else "")
            )
        calib = existing
    elif ckpt.exists() and not (resume or overwrite):
        raise UserInputError(
            f"an unfinished run's checkpoint {ckpt} exists: pass --resume to continue it "
            "or --overwrite to start over"
        )
    if calib is None:
        calib = run(
            loaded,
            cfg,
            out,
            resume=resume,
            checkpoint_every=checkpoint_every,
            progress=not (quiet or as_json),
            device=dev,
        )
    if rank != 0:  # the set is on disk (rank 0 wrote it); one process reports
        return
    sample_path = None
    if not no_samples:
        sample_path = save_samples(Path(samples) if samples else out.parent / "samples.png", calib, loaded)
    last = (
        {k: v[-1] for k, v in calib.meta["loss_curve"][-1].items() if k not in ("batch", "iteration")}
        if calib.meta.get("loss_curve")
        else {}
    )
    summary = {
        "out": str(out),
        "method": method,
        "model": loaded.name,
        "num_images": len(calib),
        "iters": calib.meta.get("iters"),
        "seed": seed,
        "wall_time_s": calib.meta.get("wall_time_s"),
        "processes": world,
        "device": str(dev),
        "precision": "bf16" if bf16 else "fp32",
        "final_loss": last,
        "samples": str(sample_path) if sample_path else None,
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        terms = "  ".join(f"{k} {v:.4g}" for k, v in last.items() if v)
        click.echo(
            f"{method}: {len(calib)} images for {loaded.name} in {summary['wall_time_s']} s -> {out}"
            + (f"  (final loss: {terms})" if terms else "")
        )
        if sample_path:
            click.echo(f"samples: {sample_path}")
