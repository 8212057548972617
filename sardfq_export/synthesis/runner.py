"""The optimization loop: batches of images, Adam on the pixels, checkpoint / resume, progress.

Long runs are safe: a checkpoint (images, Adam state, loss history) is written atomically every
``checkpoint_every`` iterations; ``resume=True`` continues from it bit-exactly (every random draw
is made up front from the seed, see :mod:`plan`); Ctrl-C or SIGTERM finishes the current
iteration, saves and re-raises (:class:`_Interrupt`); a non-finite loss stops with
:class:`SynthesisDivergedError`, keeping the last good checkpoint (checkpoints are only written
after the losses up to them were checked finite).

Under torchrun each process optimizes every K-th batch (batch b on rank b mod K), keeps its own
checkpoint, and the batches are gathered in index order: every draw depends on the image index
only (:mod:`plan`), so K processes produce the same set as one with the same ``batch_size``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sardfq_export.core.calibset import CalibSet
from sardfq_export.core.checkpoint import curve_rows, load_checkpoint, save_checkpoint
from sardfq_export.core.device import on_device, resolve_device
from sardfq_export.core.distributed import all_gather_object, barrier, rank_world
from sardfq_export.core.errors import SardfqError, UserInputError
from sardfq_export.core.frame import band_inside, flat_outside, windows_inside
from sardfq_export.core.interrupt import Interrupt as _Interrupt
from sardfq_export.synthesis.attention import block_infos, recording, token_grids
from sardfq_export.synthesis.config import SynthConfig
from sardfq_export.synthesis.methods import METHODS, TERM_NAMES, Objective, apa_blocks, augment
from sardfq_export.synthesis.patch_matmul import patch_matmul
from sardfq_export.synthesis.plan import (
    augmentation_table,
    draw_labels,
    draw_priors,
    frame_bands,
    frame_greys,
    initial_images,
    learning_rate,
    tv_target,
)

CKPT_FORMAT = "sardfq-synth-ckpt-1"
CURVE_POINTS = 200  # loss-curve rows kept per batch in the metadata (subsampled)


class SynthesisDivergedError(SardfqError):
    """The loss became NaN/inf; the message names the iteration and the checkpoint kept."""

    exit_code = 1


def checkpoint_path(out: str | Path, rank: int = 0, world: int = 1) -> Path:
    """``<out>.ckpt``; under torchrun one per process: ``<out>.rank<r>of<K>.ckpt``."""
    out = Path(out)
    return out.with_name(out.name + (".ckpt" if world == 1 else f".rank{rank}of{world}.ckpt"))


def pixel_range(data_config: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (lo, hi) in normalized space that map to pixel values 0 and 1."""
    mean = torch.tensor(data_config["mean"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def model_input_size(loaded) -> tuple[int, int, int]:
    """(C, H, W) the model takes: its patch embedding's, when it states one (timm's data config
    keeps the pretrained 224 when a model is built with another ``img_size``), else the data config's."""
    pe = getattr(loaded.model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    proj = getattr(pe, "proj", None)
    if size is not None and isinstance(proj, torch.nn.Conv2d):
        return (proj.in_channels, int(size[0]), int(size[1]))
    return tuple(loaded.input_size)


def _subsample(hist: torch.Tensor) -> dict[str, list]:
    idx = curve_rows(hist.shape[0], CURVE_POINTS)
    rows = hist[idx].tolist() if idx else []
    curve = {"iteration": [i + 1 for i in idx]}
    for j, name in enumerate(TERM_NAMES):
        curve[name] = [r[j] for r in rows]
    return curve


def synthesize(
    loaded,
    config: SynthConfig,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    checkpoint_every: int = 100,
    progress: bool = True,
    device: str | torch.device | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> CalibSet:
    """Synthesize a calibration set for ``loaded`` (a :class:`~sardfq_export.models.LoadedModel`).

    ``out``: where the set is saved (``.safetensors`` + ``.json``); its checkpoint lives beside it
    as ``<out>.ckpt`` while the run is unfinished. ``resume``: continue from that checkpoint
    (refused if it was made with other settings). ``callback(batch, iterations_done)`` runs after
    every iteration (tests use it to interrupt). Returns the :class:`CalibSet` (also saved).
    ``device``: ``auto`` (None; CUDA when present, ``cuda:LOCAL_RANK`` under torchrun) | ``cpu`` |
    ``cuda[:N]``.
    """
    dev = resolve_device(device)
    with on_device(dev, loaded.model):  # the model goes back where it was; the images come back on the CPU
        return _synthesize(loaded, config, out, resume, checkpoint_every, progress, dev, callback)


def _synthesize(loaded, config: SynthConfig, out, resume: bool, checkpoint_every: int, progress: bool,
                dev: torch.device, callback) -> CalibSet:  # fmt: skip
    family = loaded.family
    cfg = config.resolve(family)
    method = METHODS[cfg.method]
    comps = method.components(cfg)
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    c, h, w = model_input_size(loaded)
    classes = loaded.num_classes
    if classes < 2:
        raise UserInputError(
            f"{loaded.name} has no classifier head ({classes} classes): synthesis needs class logits"
        )
    n = cfg.num_images
    iters = cfg.iters if method.optimizes else 0
    infos = block_infos(model, family)
    apa_idx = apa_blocks(len(infos), cfg.apa_start) if comps.apa else []
    labels = draw_labels(cfg, classes, (h, w), comps.msr, comps.soft)
    lo, hi = pixel_range(loaded.data_config, dev)
    identity = {
        "config": cfg.to_dict(),
        "model": loaded.name,
        "source": loaded.source,
        "input_size": [c, h, w],
        "classes": classes,
    }

    rank, world = rank_world()
    if world > 1:
        identity["shard"] = [rank, world]
    ckpt = checkpoint_path(out, rank, world) if out is not None else None
    done: list[torch.Tensor] = []
    curves: list[dict] = []
    start_batch, start_iter, wall_before = 0, 0, 0.0
    restored: dict[str, torch.Tensor] = {}
    if resume and ckpt is not None and ckpt.exists():
        restored, state = load_checkpoint(ckpt, CKPT_FORMAT, "synthesis checkpoint")
        if state["identity"] != json.loads(json.dumps(identity)):
            raise UserInputError(
                f"checkpoint {ckpt} was made with other settings or another model; rerun without --resume "
                "(it will be replaced) or with the same settings"
            )
        start_batch, start_iter, wall_before = state["batch"], state["iteration"], state["wall_time_s"]
        curves = state["curves"]
        if "done" in restored:
            done = list(restored["done"].split(cfg.batch_size))

    t0 = time.monotonic()
    batches = [range(s, min(s + cfg.batch_size, n)) for s in range(0, n, cfg.batch_size)]
    order = list(range(rank, len(batches), world))  # this process's batches; checkpoints count in it
    grids = token_grids(model, family, (c, h, w), dev) if apa_idx else []
    param_shape, pixels, (lo, hi) = image_parametrization(cfg.image_scale, (c, h, w), lo, hi, cfg.grey)
    mean, std = loaded.data_config["mean"], loaded.data_config["std"]
    check_every = 1 if dev.type == "cpu" else 10

    from sardfq_export.core.progress import progress_bar

    bar = progress_bar(
        total=len(order) * iters,
        initial=start_batch * iters + start_iter,
        disable=not progress or iters == 0 or rank != 0,
        desc=f"synthesize {cfg.method}" + (f" (rank 0 of {world})" if world > 1 else ""),
        unit="it",
        dynamic_ncols=True,
    )
    want_out = range(len(infos)) if comps.pse else ()
    try:
        # Fused SDPA for softmax·V on GPUs. On CPU the explicit matmuls: clearly faster under bf16
        # (deit_tiny@224 b32 1.42 vs 2.08 s/it), mixed in fp32 (bench/synthesis_variants.py).
        fused = dev.type == "cuda"
        with (
            _Interrupt() as stop,
            recording(model, family, want_attn=apa_idx, want_out=want_out, fused=fused) as rec,
            patch_matmul(model),
        ):
            for pos in range(start_batch, len(order)):
                bi = order[pos]
                idx = batches[bi]
                x = initial_images(cfg, idx, param_shape).to(dev)
                greys = frame_greys(cfg, idx).to(dev) if cfg.frame else None
                # where the frame leaves pixels to optimize: one centred window, or one per image
                if not cfg.frame:
                    inside = None
                elif cfg.frame_jitter:
                    inside = windows_inside(h, w, frame_bands(cfg, idx, (h, w)).to(dev))
                else:
                    inside = band_inside(h, w, cfg.frame, dev)

                def full_size(x: torch.Tensor, greys=greys, inside=inside) -> torch.Tensor:  # model's input
                    return pixels(x) if inside is None else flat_outside(pixels(x), inside, greys, mean, std)

                if cfg.clip:
                    x = torch.maximum(torch.minimum(x, hi), lo) if method.optimizes else x
                if iters == 0:
                    done.append(full_size(x).detach().cpu())
                    if stop.requested:
                        stop.deliver()
                    continue
                offsets, flips = augmentation_table(cfg, idx, (h, w))
                priors = draw_priors(cfg, idx, {i: (infos[i].heads, grids[i]) for i in apa_idx})
                # tau scales with the elements that can vary: a frame's flat band has no variation
                # (per image on the mean, where each image has a window of its own).
                varying = h * w if inside is None else round(int(inside.sum()) / inside.shape[0])
                tau = tv_target(cfg, idx.start, len(idx) * c * varying)
                objective = Objective(model, family, rec, cfg, comps, labels, idx, priors, tau, dev)
                x = x.detach().clone().requires_grad_(True)
                opt = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.betas)
                hist = torch.zeros(iters, len(TERM_NAMES), device=dev)
                t_begin = 0
                if pos == start_batch and start_iter > 0:
                    with torch.no_grad():
                        x.copy_(restored["x"].to(dev))
                    opt.state[x] = {
                        "step": restored["step"].clone(),
                        "exp_avg": restored["exp_avg"].to(dev),
                        "exp_avg_sq": restored["exp_avg_sq"].to(dev),
                    }
                    hist[:start_iter] = restored["hist"].to(dev)
                    t_begin = start_iter
                checked = t_begin

                def save(it_done: int, pos=pos, x=x, opt=opt, hist=hist) -> None:
                    if ckpt is None:
                        return
                    st = opt.state.get(x, {})
                    tensors = {"x": x, "hist": hist[:it_done]}
                    if st:
                        tensors.update(step=st["step"], exp_avg=st["exp_avg"], exp_avg_sq=st["exp_avg_sq"])
                    if done:
                        tensors["done"] = torch.cat(done)
                    save_checkpoint(
                        ckpt,
                        tensors,
                        {
                            "identity": identity,
                            "batch": pos,
                            "iteration": it_done,
                            "curves": curves,
                            "wall_time_s": wall_before + time.monotonic() - t0,
                        },
                        CKPT_FORMAT,
                    )

                for t in range(t_begin, iters):
                    for g in opt.param_groups:
                        g["lr"] = learning_rate(cfg, t)
                    full = full_size(x)
                    terms = objective(full, augment(full, offsets[:, t], flips[:, t]))
                    hist[t] = torch.stack([terms[k].detach().float() for k in TERM_NAMES])
                    if (t + 1 - checked) >= check_every or (t + 1) % checkpoint_every == 0 or t + 1 == iters:
                        _check_finite(hist, checked, t + 1, bi, len(batches), ckpt)
                        checked = t + 1
                    opt.zero_grad(set_to_none=True)
                    terms["total"].backward()
                    opt.step()
                    if cfg.clip:
                        with torch.no_grad():
                            torch.maximum(torch.minimum(x, hi), lo, out=x)
                    it_done = t + 1
                    bar.update(1)
                    if it_done % 10 == 0 or it_done == iters:
                        bar.set_postfix(
                            {
                                k: f"{v:.4g}"
                                for k, v in zip(TERM_NAMES, hist[t].tolist(), strict=True)
                                if k == "total" or v != 0
                            },
                            refresh=False,
                        )
                    if it_done % checkpoint_every == 0 and it_done < iters:
                        save(it_done)
                    if callback is not None:
                        try:
                            callback(bi, it_done)
                        except KeyboardInterrupt:
                            stop.requested = True
                    if stop.requested:
                        _check_finite(hist, checked, it_done, bi, len(batches), ckpt)
                        save(it_done)
                        stop.deliver()
                curves.append({"batch": bi, **_subsample(hist.cpu())})
                done.append(full_size(x).detach().cpu())
                start_iter = 0
                if pos + 1 < len(order):
                    save_next = {
                        "identity": identity,
                        "batch": pos + 1,
                        "iteration": 0,
                        "curves": curves,
                        "wall_time_s": wall_before + time.monotonic() - t0,
                    }
                    if ckpt is not None:
                        save_checkpoint(ckpt, {"done": torch.cat(done)}, save_next, CKPT_FORMAT)
    finally:
        bar.close()

    # Merge the processes' batches in index order (a single process passes its own through).
    parts = all_gather_object(
        {"batches": order, "images": done, "curves": curves, "wall": wall_before + time.monotonic() - t0}
    )
    by_batch = {bi: img for p in parts for bi, img in zip(p["batches"], p["images"], strict=True)}
    images = torch.cat([by_batch[bi] for bi in range(len(batches))])
    curves = sorted((c for p in parts for c in p["curves"]), key=lambda c: c["batch"])
    wall = max(p["wall"] for p in parts)
    identity.pop("shard", None)
    calib = _assemble(loaded, cfg, comps, method.optimizes, images, labels, model, dev)
    calib.meta.update(identity)
    calib.meta.update(
        {
            "method": cfg.method,
            "seed": cfg.seed,
            "num_images": n,
            "iters": iters,
            "components": {k: getattr(comps, k) for k in ("pse", "apa", "msr", "soft", "tv")},
            "apa_blocks": [i + 1 for i in apa_idx],
            "loss_terms": list(TERM_NAMES),
            "loss_curve": curves,
            "wall_time_s": round(wall, 3),
            "device": str(dev),
            "processes": world,
            "mean": list(loaded.data_config["mean"]),
            "std": list(loaded.data_config["std"]),
            "versions": _versions(),
        }
    )
    if out is not None:
        if rank == 0:
            calib.save(out)
        barrier()  # the set is on disk before any process moves on or drops its checkpoint
        if ckpt is not None and ckpt.exists():
            ckpt.unlink()
    return calib


def image_parametrization(scale: float, size: tuple[int, int, int], lo: torch.Tensor, hi: torch.Tensor,
                          grey: bool = False):  # fmt: skip
    """``(shape of the optimized pixels, map from them to the model's input, their (lo, hi) clip
    range)``. The identity at ``scale`` 1, else a grid ``scale`` times as fine, upsampled bilinearly
    (each output pixel a convex mix of its neighbours, so clipping the coarse pixels keeps the output
    in the pixel range). ``grey``: one channel, normalized by the channels' mean mean and std (so the
    start draws and the learning rate mean what they mean for a colour channel), mapped to every
    channel through that channel's own mean/std; ``lo``/``hi`` are the channels' pixel-0/1 bounds."""
    c, h, w = size
    coarse = (1 if grey else c, max(1, round(h * scale)), max(1, round(w * scale)))
    if grey:
        span = hi - lo  # 1/std per channel: normalized value = lo + span * pixel
        mean, std = (-lo / span).mean(), (1 / span).mean()
        bounds = ((0 - mean) / std).view(1, 1, 1, 1), ((1 - mean) / std).view(1, 1, 1, 1)
    else:
        bounds = lo, hi

    def full_size(x: torch.Tensor) -> torch.Tensor:
        if scale != 1.0:
            x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        if grey:
            x = lo + span * (mean + std * x)  # the grey pixel value, through each channel's mean/std
        return x

    if scale == 1.0 and not grey:
        return size, lambda x: x, bounds
    return coarse, full_size, bounds


def _check_finite(hist: torch.Tensor, a: int, b: int, bi: int, nb: int, ckpt: Path | None) -> None:
    rows = hist[a:b]
    if bool(torch.isfinite(rows).all()):
        return
    bad = (~torch.isfinite(rows)).any(1).nonzero()[0, 0].item() + a
    terms = [
        name
        for name, v in zip(TERM_NAMES, hist[bad].tolist(), strict=True)
        if not torch.isfinite(torch.tensor(v))
    ]
    kept = (
        f"the last good checkpoint {ckpt} is kept"
        if ckpt is not None and ckpt.exists()
        else "no checkpoint was written yet"
    )
    raise SynthesisDivergedError(
        f"synthesis diverged: loss term(s) {', '.join(terms)} became NaN/inf at iteration {bad + 1} of batch "
        f"{bi + 1}/{nb}; {kept}. Rerun with a lower --lr or --apa-weight, or without --bf16"
    )


def _assemble(loaded, cfg, comps, optimized, images, labels, model, dev) -> CalibSet:
    """The CalibSet: images, targets, labels and (for MSR) regions."""
    if optimized:
        calib = CalibSet(images=images, targets=labels.targets, labels=labels.labels)
        if comps.msr:
            calib.regions, calib.region_labels = labels.regions, labels.region_labels
        return calib
    # noise: nothing was optimized toward a label; the teacher's own predictions are the targets.
    with torch.no_grad():
        probs = torch.cat([model(b.to(dev)).float().softmax(-1).cpu() for b in images.split(cfg.batch_size)])
    return CalibSet(images=images, targets=probs, labels=probs.argmax(-1))


def _versions() -> dict:
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__}
