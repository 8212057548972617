"""Fine-tuning a calibrated fake-quant model on a calibration set.

* ``reconstruct_blocks`` — SARDFQ stage 2 / BRECQ-style block-wise output reconstruction: block by
  block, minimize MSE(quantized block(x_q), float block output) where x_q comes from the already
  quantized (and reconstructed) earlier blocks and the target from the float model. Adam,
  lr 4e-5, cosine decay to 0, 100 iterations per block, batch 32 [paper]; rounding through the
  straight-through estimator of ``fake_quantize``; step sizes frozen; only the weights and biases
  of quantized Linears are trained. ``act_lr > 0`` [beyond the paper; BRECQ / QDrop do it]: each
  block's per-tensor activation steps are trained with them, LSQ-style (the gradient through
  rounding and clipping), as a log-factor on the calibrated step at that learning rate; a GPTQ
  rounding fitted to the calibrated ranges and those ranges then move together. ``drop > 0``
  [beyond the paper; QDrop]: while training, each activation quantizer in the block leaves each
  element unquantized with that probability (:class:`calibrators.quantizer.dropped_quantization`),
  so the weights fit a neighbourhood of the calibration images' activations, not their exact rounding.
  ``target="local"`` [beyond the paper]: a block's
  target is the float block applied to its quantized input, so each block fits only its own
  quantization error and passes the earlier blocks' on, rather than learning to undo them on the
  calibration images (a correction that holds only as far as those images' errors are real images').
* ``distill`` — end-to-end distillation [beyond the paper]: KL(teacher ‖ student) on the logits
  (temperature T, scaled by T²) plus, when the calibration set stores soft targets, their soft
  cross-entropy. Same trainable set, Adam with cosine decay. ``augment=True``: each step distils
  on fresh random views of the images (:func:`calibrators.gptq.crop_views`, the teacher run on
  them), so 32 images stand for many more. On DINOv2 at w4a8 (AWQ + nearest, 150 steps, lr 3e-6)
  plain steps learn the 32 images (their KL 0.33 -> 0.006-0.010) and lose 2.15 points on one seed
  of two; views keep those images about as far from the teacher as unseen crops and gain 1.0 and
  1.9 points (bench/dinov2_kd_probe.py, docs/dinov2-accuracy.md).

Both are deterministic for a seed (mini-batches from a seeded ``torch.Generator``), run on the
model's device (CPU or CUDA) and show tqdm progress. Under torchrun they run data-parallel
(:mod:`calibrators.parallel`): same steps as one process, each mini-batch split over processes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from sardfq_export.calibrators.calibrate import iter_batches
from sardfq_export.calibrators.instrument import block_names, mark_modified
from sardfq_export.calibrators.modules import QUANT_WEIGHTED
from sardfq_export.calibrators.parallel import all_reduce_grads, my_slice
from sardfq_export.calibrators.quantizer import TensorQuantizer, dropped_quantization
from sardfq_export.calibrators.scheme import PerTensor

from sardfq_export.core.device import autocast
from sardfq_export.core.distributed import rank_world
from sardfq_export.core.errors import UserInputError

# [paper] SARDFQ stage 2 defaults
RECON_LR = 4e-5
RECON_ITERS = 100
BATCH_SIZE = 32
# [default] our end-to-end distillation defaults (not from a paper)
KD_LR = 1e-5
KD_ITERS = 300
KD_TEMPERATURE = 1.0


def _images_and_targets(data) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All calibration images (N, C, H, W) and optional soft targets (N, classes)."""
    if isinstance(data, torch.Tensor):
        return data, None
    if hasattr(data, "images") and isinstance(data.images, torch.Tensor):
        return data.images, getattr(data, "targets", None)
    batches = list(iter_batches(data))
    if not batches:
        raise UserInputError("fine-tuning needs at least one calibration image")
    return torch.cat(batches), None


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    out = []
    for mname, m in module.named_modules():
        if isinstance(m, QUANT_WEIGHTED):
            for pname in ("weight", "bias"):
                p = getattr(m, pname)
                if p is not None:
                    out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


def _learnable_steps(module: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    """The module's active per-tensor integer activation quantizers: the steps reconstruction may learn."""
    return [(n, q) for n, q in module.named_modules()
            if isinstance(q, TensorQuantizer) and q.role == "activation" and q.active and q.kind == "int"
            and isinstance(q.granularity, PerTensor)]  # fmt: skip


def _batch_indices(n: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    if n <= batch_size:
        return torch.arange(n)
    return torch.randperm(n, generator=gen)[:batch_size]


def _run_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(c) for c in x.split(batch_size)])


class _Stop(Exception):
    pass


def _capture(model: nn.Module, names: list[str], x: torch.Tensor, what: str, stop_after: str | None = None):
    """Inputs ('in') or outputs ('out') of the named submodules for images ``x``."""
    got: dict[str, torch.Tensor] = {}
    hooks = []
    for n in names:
        mod = model.get_submodule(n)

        def hook(m, args, out, n=n):
            got[n] = (args[0] if what == "in" else out).detach()
            if n == stop_after:
                raise _Stop

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            try:
                model(x)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return got


# how each output element's error counts in a block's loss: uniform (the paper's), by its token's rollout
# reach, or by the squared gradient of the prediction's divergence (BRECQ's Fisher diagonal, per element)
RECON_TOKENS = ("uniform", "rollout", "fisher")
# what a block's output is fitted to: the float model's own output there (the paper's: the block also
# learns to undo the earlier blocks' error) or the float block on the quantized input (its own error only)
RECON_TARGETS = ("float", "local")


def _token_weights(fp_model: nn.Module, images: torch.Tensor, names: list[str], tokens: str,
                   batch_size: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """``{unit: (N, T)}`` weights of each unit's output tokens in its loss; empty when uniform.

    A block's output token reaches the prediction as its MLP's input token does (fc2's output is
    added to the residual stream in place), so the rollout weights of ``blocks.{i}.mlp.fc2``'s input
    are those of block ``i``'s output. Units without such weights (Swin's, or a non-block unit) keep
    uniform weights; rollout itself refuses models it cannot read (one line, what to use instead)."""
    if tokens not in RECON_TOKENS:
        raise UserInputError(f"unknown recon tokens {tokens!r}: use one of {', '.join(RECON_TOKENS)}")
    if tokens in ("uniform", "fisher"):  # fisher: per block, on the model as reconstructed so far
        return {}
    from sardfq_export.calibrators.rollout import rollout_token_weights

    reach = rollout_token_weights(fp_model, images, batch_size, option="--recon-tokens")
    device = images.device
    return {n: reach[f"{n}.mlp.fc2"].to(device) for n in names if f"{n}.mlp.fc2" in reach}


def _fisher_weights(qmodel: nn.Module, name: str, images: torch.Tensor, fp_logits: torch.Tensor,
                    batch_size: int) -> torch.Tensor:  # fmt: skip
    """``(N, T, D)`` weights of each element of unit ``name``'s output in its loss: the diagonal Fisher
    of the prediction there [BRECQ], g² with g the gradient of KL(float ‖ quantized) on the logits with
    respect to that output, in ``qmodel`` as it stands (earlier units reconstructed, this one and later
    ones calibrated), per image divided by its mean and averaged with uniform: mean 1 per image (the
    uniform loss's scale), at least ½ everywhere, so no element's error goes unfitted on 32 images.

    Why: a ViT's prediction reads a few directions of a few tokens (a linear head on the CLS token), so
    plain MSE spends most of 4-bit reconstruction's capacity on error the prediction never sees."""
    parts = []
    unit = qmodel.get_submodule(name)
    for chunk, ref in zip(images.split(batch_size), fp_logits.split(batch_size), strict=True):
        held: list[torch.Tensor] = []

        def hook(m, args, out, held=held):  # the unit's output as a leaf: only later units are differentiated
            leaf = out.detach().requires_grad_(True)
            held.append(leaf)
            return leaf

        h = unit.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                logits = qmodel(chunk).float()
                # summed over images: each image's gradient is its own (no op mixes images)
                kl = F.kl_div(
                    F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True, reduction="sum"
                )
                (g,) = torch.autograd.grad(kl, held)
        finally:
            h.remove()
        parts.append(g.detach().pow(2))
    f = torch.cat(parts).float()
    scale = f.flatten(1).mean(1).clamp(min=1e-30).view(-1, *([1] * (f.dim() - 1)))
    return 0.5 + 0.5 * f / scale


def reconstruct_blocks(
    qmodel: nn.Module,
    fp_model: nn.Module,
    data,
    iters: int = RECON_ITERS,
    lr: float = RECON_LR,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    progress: bool = True,
    precision: str = "fp32",
    act_lr: float = 0.0,
    drop: float = 0.0,
    tokens: str = "uniform",
    target: str = "float",
) -> dict:
    """Block-wise output reconstruction of a calibrated ``qmodel`` against ``fp_model``.

    ``data``: a tensor of images, a CalibSet-like object (``.images``) or an iterable of batches.
    Runs on ``qmodel``'s device; ``precision="bf16"``: the training forward under bf16 autocast
    (targets, losses and the weights stay fp32). ``act_lr > 0``: the block's activation steps are
    learned too (Adam on their log-factors at this rate); each block's report gives the factors.
    ``drop``: QDrop's probability of leaving an activation element unquantized while training (0: off).
    ``tokens``: how each token's output error counts, "uniform" (the paper's) or "rollout": weighted
    by the token's attention-rollout reach from the block's output to the prediction in ``fp_model``
    (:mod:`calibrators.rollout`, as GPTQ's ``tokens="rollout"``), so the steps fit the tokens the
    prediction reads rather than the patch tokens that outnumber them.
    ``tokens="fisher"``: each output element by its diagonal Fisher (:func:`_fisher_weights`, recomputed
    before each block on the model as reconstructed so far), so the steps fit what the prediction reads.
    ``target``: "float", the float model's output of the block (the paper's), or "local", the float
    block applied to the block's quantized input (its losses are then against that target).
    Returns per-block losses before/after (also kept in the saved model's calibration info).
    """
    from sardfq_export.core.progress import progress_bar

    if target not in RECON_TARGETS:
        raise UserInputError(f"unknown recon target {target!r}: use one of {', '.join(RECON_TARGETS)}")
    images, _ = _images_and_targets(data)
    device = next(qmodel.parameters()).device
    images = images.to(device)
    fp_model = fp_model.to(device).eval()
    qmodel.eval()
    names = block_names(qmodel)
    # float targets of every unit; quantized input of the first unit
    fp_out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    xq_parts = []
    for chunk in images.split(batch_size):
        for n, t in _capture(fp_model, names, chunk, "out").items():
            fp_out[n].append(t)
        xq_parts.append(_capture(qmodel, [names[0]], chunk, "in", stop_after=names[0])[names[0]])
    targets = {n: torch.cat(v) for n, v in fp_out.items()}
    xq = torch.cat(xq_parts)
    weights = _token_weights(fp_model, images, names, tokens, batch_size)
    if tokens == "fisher":
        with torch.no_grad():
            fp_logits = _run_chunks(fp_model, images, batch_size).float()
    gen = torch.Generator().manual_seed(seed)
    report = []
    bar = progress_bar(
        total=len(names) * iters,
        desc="reconstruct",
        unit="it",
        disable=not progress or rank_world()[0] != 0,
        leave=False,
    )
    for n in names:
        unit = qmodel.get_submodule(n)
        params = _trainable(unit)
        if target == "local":  # the float block on this block's quantized input
            with torch.no_grad():
                y = _run_chunks(fp_model.get_submodule(n), xq, batch_size)
        else:
            y = targets[n]
        if tokens == "fisher":
            weights[n] = _fisher_weights(qmodel, n, images, fp_logits, batch_size)
        with torch.no_grad():
            before = F.mse_loss(_run_chunks(unit, xq, batch_size), y).item()
        steps = _learnable_steps(unit) if act_lr > 0 and iters > 0 else []
        gains = [q.learn_step() for _, q in steps]
        if params and iters > 0:
            prior = [p.requires_grad for _, p in params]
            for _, p in params:
                p.requires_grad_(True)
            groups = [{"params": [p for _, p in params], "lr": lr}]
            if gains:
                groups.append({"params": gains, "lr": act_lr})
            opt = torch.optim.Adam(groups)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0)
            # MSE relative to the target's power: the same minimizer, but gradients of order 1 instead of
            # ~1e-8 — which would sit near Adam's eps (damping the step) and in denormal floats (slow on CPU).
            norm = y.pow(2).mean().clamp(min=1e-12)
            trained = [p for _, p in params] + gains
            # one mask stream per block for the whole loop (a generator seeded per block and seed)
            with dropped_quantization(unit, drop, seed=seed * 1000 + names.index(n) + 1):
                for _ in range(iters):
                    idx, share = my_slice(_batch_indices(len(xq), batch_size, gen).to(device))
                    with autocast(device, precision):
                        pred = unit(xq[idx])
                    if n in weights:  # (B, T) token or (B, T, D) element weights, mean 1 per image
                        w = weights[n][idx]
                        err = (pred.float() - y[idx]).pow(2) * (w.unsqueeze(-1) if w.dim() == 2 else w)
                        loss = err.mean() / norm * share
                    else:  # the paper's loss, bit for bit as before (the measured cells, the DDP test)
                        loss = F.mse_loss(pred.float(), y[idx]) / norm * share
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    all_reduce_grads(trained)
                    opt.step()
                    sched.step()
                    bar.update(1)
            for (_, p), flag in zip(params, prior, strict=True):
                p.requires_grad_(flag)
                p.grad = None
            mark_modified(qmodel, {f"{n}.{pn}" for pn, _ in params})
        else:
            bar.update(iters)
        if tokens == "fisher":  # (N, T, D) a block: not kept past it (224 px with views: hundreds of MB)
            weights.pop(n, None)
        factors = {qn: float(g.detach().exp()) for (qn, _), g in zip(steps, gains, strict=True)}
        for _, q in steps:
            q.freeze_step()
        with torch.no_grad():
            xq = _run_chunks(unit, xq, batch_size)
            after = F.mse_loss(xq, y).item()
        report.append({"block": n, "mse_before": before, "mse_after": after}
                      | ({"step_factors": factors} if factors else {}))  # fmt: skip
        bar.set_postfix(block=n, mse=f"{after:.3g}")
    bar.close()
    summary = {"finetune": "recon", "iters_per_block": iters, "lr": lr, "act_lr": act_lr, "drop": drop, "tokens": tokens,
               "target": target,
               "batch_size": batch_size, "precision": precision,
               "seed": seed, "num_images": int(images.shape[0]), "processes": rank_world()[1],
               "blocks": report}  # fmt: skip
    info = getattr(qmodel, "sardfq_quant", None)
    if info is not None:
        info["calibration"].setdefault("finetune", []).append(
            {k: v for k, v in summary.items() if k != "blocks"}
            | {"final_mse": report[-1]["mse_after"] if report else None}
        )
    return summary


def distill(
    qmodel: nn.Module,
    fp_model: nn.Module,
    data,
    iters: int = KD_ITERS,
    lr: float = KD_LR,
    batch_size: int = BATCH_SIZE,
    temperature: float = KD_TEMPERATURE,
    soft_target_weight: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    precision: str = "fp32",
    augment: bool = False,
    float_lr: float | None = None,
) -> dict:
    """End-to-end distillation: KL to the float teacher (+ soft targets of the calibration set).

    Runs on ``qmodel``'s device; ``precision="bf16"``: the student forward under bf16 autocast.
    ``augment``: every step takes ``batch_size`` random crop views of randomly drawn images and the
    teacher's logits on them (soft targets belong to the original images, so they are not used).
    ``float_lr``: also train every 1-D parameter (the quantized layers' biases, LayerNorm affines,
    LayerScale gammas), at this learning rate. They stay float in the deployed graph, so they can
    take per-channel corrections of the quantization error that the 4-bit weights, at ``lr``, are
    too coarse to make. ``None``: only the quantized layers' weights and biases, at ``lr``."""
    from sardfq_export.calibrators.gptq import crop_views

    from sardfq_export.core.progress import progress_bar

    images, soft = _images_and_targets(data)
    device = next(qmodel.parameters()).device
    images = images.to(device)
    soft = soft.to(device) if soft is not None else None
    fp_model = fp_model.to(device).eval()
    qmodel.eval()
    with torch.no_grad():
        teacher = _run_chunks(fp_model, images, batch_size)
    if augment:
        soft = None
    if soft is not None and soft.shape != teacher.shape:
        raise UserInputError(
            f"soft targets {tuple(soft.shape)} do not match the model's logits {tuple(teacher.shape)}"
        )
    params = _trainable(qmodel)
    groups = [{"params": [p for _, p in params], "lr": lr}]
    if float_lr is not None:
        seen = {n for n, _ in params}
        params += [(n, p) for n, p in qmodel.named_parameters() if p.ndim == 1 and n not in seen]
        is_float = {id(p) for _, p in params if p.ndim == 1}
        groups = [{"params": [p for _, p in params if id(p) not in is_float], "lr": lr},
                  {"params": [p for _, p in params if id(p) in is_float], "lr": float_lr}]  # fmt: skip
    prior = [p.requires_grad for _, p in params]
    for _, p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iters, 1), eta_min=0.0)
    gen = torch.Generator().manual_seed(seed)
    t = temperature
    losses = []
    trained = [p for _, p in params]
    bar = progress_bar(
        range(iters), desc="distill", unit="it", disable=not progress or rank_world()[0] != 0, leave=False
    )
    try:
        for _ in bar:
            if augment:  # every process draws the same views, then takes its slice of them
                picks = torch.randint(len(images), (batch_size,), generator=gen)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(torch.randint(2**62, (), generator=gen)))
                    views = crop_views(images[picks.to(device)])
                idx, share = my_slice(torch.arange(batch_size, device=device))
                batch = views[idx]
                with torch.no_grad():
                    target = fp_model(batch).float()
            else:
                idx, share = my_slice(_batch_indices(len(images), batch_size, gen).to(device))
                batch, target = images[idx], teacher[idx]
            with autocast(device, precision):
                logits = qmodel(batch)
            logits = logits.float()
            loss = F.kl_div(
                F.log_softmax(logits / t, -1),
                F.log_softmax(target / t, -1),
                reduction="batchmean",
                log_target=True,
            ) * (t * t)
            if soft is not None and soft_target_weight > 0:
                loss = loss + soft_target_weight * -(soft[idx] * F.log_softmax(logits, -1)).sum(-1).mean()
            loss = loss * share  # this process's share of the full mini-batch mean
            opt.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_grads(trained)
            opt.step()
            sched.step()
            losses.append(loss.detach())
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1].item():.4g}")
    finally:
        for (_, p), flag in zip(params, prior, strict=True):
            p.requires_grad_(flag)
            p.grad = None
    mark_modified(qmodel, {n for n, _ in params})
    curve = [float(v) for v in torch.stack(losses).cpu()] if losses else []
    summary = {"finetune": "kd", "iters": iters, "lr": lr, "batch_size": batch_size, "temperature": t,
               "precision": precision, "augment": augment, "float_lr": float_lr,
               "soft_targets": soft is not None, "soft_target_weight": soft_target_weight, "seed": seed,
               "num_images": int(images.shape[0]), "loss_first": curve[0] if curve else None,
               "loss_last": curve[-1] if curve else None}  # fmt: skip
    info = getattr(qmodel, "sardfq_quant", None)
    if info is not None:
        info["calibration"].setdefault("finetune", []).append(summary)
    return summary
