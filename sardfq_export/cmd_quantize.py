"""``sardfq-export quantize``: build, calibrate (and optionally fine-tune) a fake-quant model.

    sardfq-export quantize [--model M] --calib real:DIR|real:fashion-mnist|FILE --num-images N
                           --scheme S [--range minmax|percentile|mse] [--finetune none|recon|kd|recon+kd]
                           --out DIR

Writes ``DIR/quantized/`` (scales, scheme, base-model reference); ``sardfq-export eval --model DIR``
evaluates it and later stages reload it without recomputing anything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from sardfq_export.errors import UserInputError
from sardfq_export.options import load_from_options, model_options, output_options

FINETUNES = ("none", "recon", "kd", "recon+kd")


def load_calibration(spec: str, data_config: dict, num_images: int):
    """``real:DIR`` / ``real:fashion-mnist`` (first N *train* images) or a calib.safetensors FILE."""
    from sardfq_export.calibset import CalibSet

    if spec.startswith("real:"):
        from validation.data import load_dataset

        source = spec[len("real:") :]
        if not source:
            raise UserInputError(
                "--calib real: needs a folder or 'fashion-mnist' (e.g. --calib real:fashion-mnist)"
            )
        ds = load_dataset(source, data_config, split="train", limit=num_images)
        images, labels = ds.take(range(len(ds)))
        return CalibSet(images=images, labels=labels, meta={"method": "real", "source": ds.name, "split": "train",
                                                            "num_images": len(ds)})  # fmt: skip
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "calib.safetensors").is_file():
        path = path / "calib.safetensors"
    if not path.is_file():
        raise UserInputError(
            f"--calib {spec!r}: not a file. Pass real:DIR, real:fashion-mnist, or a calib.safetensors made by "
            "'sardfq-export synthesize' (synthesis methods run there, or in the main job)"
        )
    cal = CalibSet.load(path)
    if len(cal) > num_images:
        cal, _ = cal.split(num_images)
    expected = tuple(data_config["input_size"])
    if tuple(cal.images.shape[1:]) != expected:
        raise UserInputError(
            f"{path} holds images of shape {tuple(cal.images.shape[1:])}, the model takes {expected}"
        )
    return cal


def run_quantize(
    loaded,
    cal,
    scheme_name: str,
    range_method: str,
    weight_range: str,
    finetune: str,
    iters: int | None,
    lr: float | None,
    seed: int,
    progress: bool,
) -> tuple:
    """Instrument + calibrate (+ fine-tune) ``loaded.model`` on ``cal``; returns (qmodel, summary)."""
    import torch

    import calibrators

    torch.manual_seed(seed)
    qmodel = calibrators.quantize_model(loaded.model, scheme_name)
    t0 = time.perf_counter()
    summary = {"calibration": calibrators.calibrate(qmodel, cal.images, method=range_method,
                                                    weight_method=weight_range, progress=progress)}  # fmt: skip
    if finetune in ("recon", "recon+kd"):
        kw = {k: v for k, v in (("iters", iters), ("lr", lr)) if v is not None}
        rec = calibrators.reconstruct_blocks(
            qmodel, loaded.model, cal.images, seed=seed, progress=progress, **kw
        )
        summary["recon"] = {k: v for k, v in rec.items() if k != "blocks"} | {
            "final_mse": rec["blocks"][-1]["mse_after"]
        }
    if finetune in ("kd", "recon+kd"):
        kw = {k: v for k, v in (("iters", iters), ("lr", lr)) if v is not None and finetune == "kd"}
        summary["kd"] = calibrators.distill(qmodel, loaded.model, cal, seed=seed, progress=progress, **kw)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["quant"] = calibrators.quant_summary(qmodel)
    return qmodel, summary


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
@click.option(
    "--range",
    "range_method",
    type=click.Choice(["minmax", "percentile", "mse"]),
    default="mse",
    show_default=True,
    help="Activation range method.",
)
@click.option("--weight-range", type=click.Choice(["minmax", "mse"]), default="mse", show_default=True)
@click.option(
    "--finetune",
    type=click.Choice(FINETUNES),
    default="none",
    show_default=True,
    help="recon: block-wise reconstruction (SARDFQ stage 2); kd: end-to-end distillation.",
)
@click.option(
    "--iters", type=click.IntRange(min=0), default=None, help="Fine-tuning iterations (per block for recon)."
)
@click.option(
    "--lr", type=float, default=None, help="Fine-tuning learning rate (recon 4e-5, kd 1e-5 by default)."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True)
@output_options
def quantize(
    model,
    checkpoint,
    random_init,
    calib,
    num_images,
    scheme,
    range_method,
    weight_range,
    finetune,
    iters,
    lr,
    seed,
    out,
    quiet,
    as_json,
):
    """Build and calibrate a fake-quant model; write it to OUT/quantized/."""
    import calibrators

    from sardfq_export.distributed import barrier, init_from_env

    s = calibrators.get_scheme(scheme)
    rank, world = init_from_env()  # under torchrun: fine-tuning runs data-parallel (calibrators.parallel)
    loaded = load_from_options(model, checkpoint, random_init)
    if loaded.extra.get("scheme") is not None:
        raise UserInputError("--model names an already quantized folder: pass the float model it came from")
    cal = load_calibration(calib, loaded.data_config, num_images)
    progress = not (quiet or as_json)
    qmodel, summary = run_quantize(
        loaded, cal, s.name, range_method, weight_range, finetune, iters, lr, seed, progress
    )
    base_ref = {"name": loaded.name, "checkpoint": str(checkpoint) if checkpoint else None,
                "random_init": bool(random_init), "source": loaded.source}  # fmt: skip
    extra = {"calib": {"spec": calib, "num_images": len(cal), **{k: v for k, v in cal.meta.items() if k != "loss"}},
             "finetune": finetune, "seed": seed, "processes": world}  # fmt: skip
    if rank != 0:  # every process holds the same model; one writes it
        barrier()
        return
    folder = calibrators.save_quantized(qmodel, out, base_ref, extra=extra, include_weights=bool(random_init))
    barrier()
    result = {"model": loaded.name, "scheme": s.name, "exportable": s.exportable, "out": str(folder),
              "calib": calib, "num_images": len(cal), "range": range_method, "weight_range": weight_range,
              "finetune": finetune, **summary}  # fmt: skip
    if as_json:
        click.echo(json.dumps(result, default=str))
    else:
        click.echo(f"{s}")
        click.echo(
            f"quantized {loaded.name}: {summary['quant']['quant_linear']} Linear(s), range {range_method}, "
            f"fine-tune {finetune}, {len(cal)} calibration images, {summary['seconds']} s → {folder}"
        )
