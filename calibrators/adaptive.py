"""PSAQ-ViT V2's adaptive teacher-student fine-tuning (ALGORITHMS.md §1.4), data-free and label-free.

Images and the quantized student evolve in turn under the float teacher:

* **image steps** *maximize* the teacher-vs-student discrepancy D = T²·KL(softmax(t/T) ‖ softmax(s/T))
  of the logits, regularized by the teacher's image prior (PSAQ-ViT's patch-similarity entropy and
  |TV − τ|): loss = prior − disc_weight·D, Adam on the pixels (gradients reach them through the
  student's straight-through quantizers), each channel clamped to the pixel range after a step;
* **student steps** *minimize* D on those images: Adam on the weights and biases of the quantized
  Linears/Convs (the same trainable set as ``distill``), rounding through the straight-through
  estimator of ``fake_quantize``, scales frozen — so the result exports as plain QDQ / INT4 blocks.

No class labels anywhere. Schedule (every number is an :class:`AdaptiveConfig` field, recorded with
the images and the quantized model): ``warmup_iters`` prior-only image steps per batch first, so the
student's ranges are calibrated (``prepare``) on images that already carry the prior rather than on
noise; then ``rounds`` rounds, each visiting every batch: ``image_steps`` image updates, then
``student_steps`` student updates. Image lr: cosine from ``image_lr`` to 0 over each batch's image
steps; student lr: cosine from ``student_lr`` to 0 over all student steps. The paper states no
numbers we could read (no public code), so all are [default] except PSAQ-ViT's optimizer settings.

The teacher side (the float model with the prior) is passed in as a callable, so this stage needs
nothing from synthesis (``sardfq_export.synthesis.prior.PatchSimilarityTeacher`` is the one the API
passes). Resumable like synthesis: a checkpoint (images, both optimizers' state, the student's whole
state, the loss history) is written atomically every ``checkpoint_every`` steps and when Ctrl-C /
SIGTERM arrives (at the end of the current step, then the signal takes its course);
``resume=True`` continues bit-exactly. Nothing is random inside the loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from sardfq_export.calibrators.instrument import mark_modified
from sardfq_export.calibrators.reconstruct import _trainable

from sardfq_export.core.checkpoint import curve_rows, load_checkpoint, save_checkpoint
from sardfq_export.core.errors import SardfqError, UserInputError
from sardfq_export.core.interrupt import Interrupt
from sardfq_export.models.families import get_family

CKPT_FORMAT = "sardfq-psaq2-ckpt-1"
PHASES = ("warmup", "image", "student")  # the loss curve's phase codes 0, 1, 2
COLUMNS = ("phase", "disc", "pse", "tv", "loss")
CURVE_POINTS = 400  # loss-curve rows kept in the metadata (subsampled)
# [default] for models without their own: our distill's KD lr, and the prior and discrepancy weighed alike.
# Real ViTs need their own: on DINOv2 ViT-S/14, 40 Adam steps of 1e-5 *raise* the student's KL to the
# teacher even on SARDFQ images (docs/dinov2-accuracy.md, "PSAQ-ViT V2 on DINOv2").
STUDENT_LR = 1e-5
DISC_WEIGHT = 1.0


class AdaptiveDivergedError(SardfqError):
    """A loss became NaN/inf; the message names the step and the checkpoint kept."""

    exit_code = 1


@dataclass(frozen=True)
class AdaptiveConfig:
    """PSAQ-ViT V2's schedule. ``None`` fields take the model family's default (:meth:`resolve`)."""

    rounds: int = 40  # alternations; each visits every batch: image steps, then student steps [default]
    warmup_iters: int = 100  # prior-only image steps per batch before the student is calibrated [default]
    image_steps: int = 5  # image updates per round and batch [default]
    student_steps: int = 5  # student updates per round and batch [default]
    batch_size: int = 32  # images optimized (and distilled on) together [paper: PSAQ-ViT's B = 32]
    image_lr: float | None = None  # Adam lr on the pixels (None: the family's synthesis lr, 0.20 / 0.25)
    image_betas: tuple[float, float] = (0.5, 0.9)  # [paper: PSAQ-ViT's image optimizer]
    # Adam lr on the student's weights (None: the model's own default, else STUDENT_LR)
    student_lr: float | None = None
    student_betas: tuple[float, float] = (0.9, 0.999)  # [default: Adam's]
    temperature: float = 1.0  # T of the discrepancy T²·KL(softmax(t/T) ‖ softmax(s/T)) [default]
    # weight of the discrepancy against the prior in image steps (None: the model's own, else 1.0)
    disc_weight: float | None = None

    def resolve(self, family: str, model_defaults: dict | None = None) -> AdaptiveConfig:
        """A copy with every ``None`` filled and the values checked (one-line errors): from
        ``model_defaults`` (a model's own schedule, measured on it: ``LoadedModel.extra["psaq2"]``)
        first, then from ``family`` (image lr) and this module's defaults."""
        own = model_defaults or {}
        fallback = {
            "student_lr": STUDENT_LR,
            "disc_weight": DISC_WEIGHT,
            "image_lr": get_family(family).synth_lr,
        }
        if unknown := set(own) - set(fallback):
            raise ValueError(
                f"a model's psaq2 defaults cover {', '.join(fallback)} only, not {sorted(unknown)}"
            )
        cfg = dataclasses.replace(
            self, **{k: own.get(k, v) for k, v in fallback.items() if getattr(self, k) is None}
        )
        for name in ("rounds", "warmup_iters", "image_steps", "student_steps"):
            if getattr(cfg, name) < 0:
                raise UserInputError(f"psaq2 {name} must be 0 or more, got {getattr(cfg, name)}")
        if cfg.batch_size < 1:
            raise UserInputError(f"psaq2 batch_size must be at least 1, got {cfg.batch_size}")
        if cfg.temperature <= 0 or cfg.image_lr < 0 or cfg.student_lr < 0 or cfg.disc_weight < 0:
            raise UserInputError(
                "psaq2 temperature must be positive, learning rates and disc_weight non-negative"
            )
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdaptiveConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserInputError(
                f"unknown psaq2 settings: {sorted(unknown)} (use {', '.join(sorted(names))})"
            )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def discrepancy(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), batch mean: what image steps raise and student steps lower."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits.float() / t, -1),
        F.log_softmax(teacher_logits.float() / t, -1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def schedule(cfg: AdaptiveConfig, num_batches: int, with_student: bool) -> list[tuple[int, int, int, int]]:
    """Every step in order: (phase, batch, round, step in phase); round -1 in the warm-up."""
    steps = [(0, b, -1, j) for b in range(num_batches) for j in range(cfg.warmup_iters)]
    if with_student:
        for r in range(cfg.rounds):
            for b in range(num_batches):
                steps += [(1, b, r, j) for j in range(cfg.image_steps)]
                steps += [(2, b, r, j) for j in range(cfg.student_steps)]
    return steps


def _cosine(lr: float, i: int, total: int) -> float:
    return lr * 0.5 * (1 + math.cos(math.pi * i / max(1, total)))


def _opt_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{prefix}.{i}.{k}"] = v
    return out


def _load_opt(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            i, k = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(i), {})[k] = v.clone()
    if state:
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _subsample(hist: torch.Tensor) -> dict[str, list]:
    idx = curve_rows(hist.shape[0], CURVE_POINTS)
    rows = hist[idx].tolist() if idx else []
    curve: dict[str, list] = {"step": [i + 1 for i in idx]}
    for j, name in enumerate(COLUMNS):
        curve[name] = [int(r[j]) if name == "phase" else r[j] for r in rows]
    return curve


def _phase_ends(
    hist: torch.Tensor, steps: list[tuple[int, int, int, int]], cfg: AdaptiveConfig
) -> list[dict]:
    """Per round: the discrepancy at the first and at the last image / student step, summed over
    batches (image steps should raise it, student steps lower it)."""
    length = {1: cfg.image_steps, 2: cfg.student_steps}
    rounds: dict[int, dict[str, float]] = {}
    for k, (phase, _b, r, j) in enumerate(steps[: hist.shape[0]]):
        if phase == 0:
            continue
        row = rounds.setdefault(r, {})
        d = float(hist[k, 1])
        for end, hit in (("first", j == 0), ("last", j == length[phase] - 1)):
            if hit:
                name = f"{PHASES[phase]}_{end}"
                row[name] = row.get(name, 0.0) + d
    return [{"round": r, **v} for r, v in sorted(rounds.items())]


def teacher_student(
    student: nn.Module | None,
    teacher: Callable,
    images: torch.Tensor,
    config: AdaptiveConfig,
    *,
    clip: Callable[[torch.Tensor], torch.Tensor] | None = None,
    prepare: Callable[[nn.Module, torch.Tensor], dict] | None = None,
    index_offset: int = 0,
    checkpoint: str | Path | None = None,
    identity: dict | None = None,
    resume: bool = False,
    checkpoint_every: int = 50,
    callback: Callable[[int], None] | None = None,
    progress: bool = True,
    desc: str = "psaq2",
    keep_checkpoint: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Run PSAQ-ViT V2's schedule; returns ``(images, summary)``; ``student`` is trained in place.

    ``teacher(x, first_index)`` → ``(logits, {"pse", "tv"}, prior_loss)`` is entered as a context
    manager for the run (e.g. :class:`~sardfq_export.synthesis.prior.PatchSimilarityTeacher`).
    ``images`` (N, C, H, W): the start images, on the device the run uses. ``student``: the
    instrumented fake-quant model, still uncalibrated: ``prepare(student, images)`` calibrates it
    after the warm-up (its return value is kept in the summary); ``None``: warm-up only (images
    with the prior alone, e.g. held-out images the student must not see). ``index_offset``: the
    image index of ``images[0]`` (τ is drawn per batch from its first image's index).
    ``checkpoint``: where the resumable state lives while the run is unfinished (removed at the
    end, unless ``keep_checkpoint``: then it holds the finished state, and a resumed call returns
    at once; for a caller with several runs, which removes them when all are done);
    ``identity``: what must match to resume from it. ``callback(steps_done)`` runs after every
    step (tests use it to interrupt). ``config`` must be resolved.
    """
    from sardfq_export.core.progress import progress_bar

    cfg = config
    if None in (cfg.image_lr, cfg.student_lr, cfg.disc_weight):
        raise ValueError("teacher_student needs a resolved AdaptiveConfig (config.resolve(family))")
    device = images.device
    n = images.shape[0]
    starts = list(range(0, n, cfg.batch_size))
    nb = len(starts)
    with_student = student is not None
    steps = schedule(cfg, nb, with_student)
    total = len(steps)
    warm_total = nb * cfg.warmup_iters
    img_total = cfg.warmup_iters + (cfg.rounds * cfg.image_steps if with_student else 0)
    stu_total = cfg.rounds * nb * cfg.student_steps
    ident = json.loads(json.dumps({"config": cfg.to_dict(), "num_images": n, "index_offset": index_offset,
                                   "student": with_student, **(identity or {})}, default=str))  # fmt: skip
    ckpt = Path(checkpoint) if checkpoint is not None else None

    xs = [images[s : s + cfg.batch_size].detach().clone().requires_grad_(True) for s in starts]
    img_opts = [torch.optim.Adam([x], lr=cfg.image_lr, betas=cfg.image_betas) for x in xs]
    params: list[tuple[str, nn.Parameter]] = []
    stu_opt = None
    if with_student:
        for p in student.parameters():
            p.requires_grad_(False)  # only student steps switch their trainable set on
        params = _trainable(student)
        stu_opt = torch.optim.Adam([p for _, p in params], lr=cfg.student_lr, betas=cfg.student_betas)
    hist = torch.zeros(total, len(COLUMNS), device=device)
    done, prepared, prep_summary, wall_before = 0, False, None, 0.0

    if resume and ckpt is not None and ckpt.exists():
        tensors, state = load_checkpoint(ckpt, CKPT_FORMAT, "psaq2 checkpoint")
        if state["identity"] != ident:
            raise UserInputError(
                f"checkpoint {ckpt} was made with other settings or another model; rerun without --resume "
                "(it will be replaced) or with the same settings"
            )
        done, prepared, wall_before = state["done"], state["prepared"], state["wall_time_s"]
        prep_summary = state.get("prepare")
        with torch.no_grad():
            for b, x in enumerate(xs):
                x.copy_(tensors[f"x.{b}"].to(device))
        for b, opt in enumerate(img_opts):
            _load_opt(opt, tensors, f"img{b}")
        hist[:done] = tensors["hist"].to(device)
        if prepared:
            student.load_state_dict(
                {k[len("student.") :]: v for k, v in tensors.items() if k.startswith("student.")}, strict=True
            )
            info = getattr(student, "sardfq_quant", None)
            if info is not None:
                info["calibration"] = state["student_info"]["calibration"]
                info["modified"] = set(state["student_info"]["modified"])
            _load_opt(stu_opt, tensors, "sopt")

    def save() -> None:
        if ckpt is None:
            return
        tensors = {f"x.{b}": x for b, x in enumerate(xs)}
        for b, opt in enumerate(img_opts):
            tensors.update(_opt_tensors(opt, f"img{b}"))
        tensors["hist"] = hist[:done]
        state = {"identity": ident, "done": done, "prepared": prepared, "prepare": prep_summary,
                 "wall_time_s": wall_before + time.monotonic() - t0}  # fmt: skip
        if prepared:
            tensors.update({f"student.{k}": v for k, v in student.state_dict().items()})
            tensors.update(_opt_tensors(stu_opt, "sopt"))
            info = getattr(student, "sardfq_quant", {}) or {}
            state["student_info"] = {"calibration": info.get("calibration", {}),
                                     "modified": sorted(info.get("modified", ()))}  # fmt: skip
        save_checkpoint(ckpt, tensors, state, CKPT_FORMAT)

    def check(k: int) -> None:
        row = hist[k]
        if bool(torch.isfinite(row).all()):
            return
        phase, b, r, j = steps[k]
        kept = f"the last good checkpoint {ckpt} is kept" if ckpt is not None and ckpt.exists() else (
            "no checkpoint was written yet")  # fmt: skip
        raise AdaptiveDivergedError(
            f"psaq2 diverged: a loss became NaN/inf at step {k + 1} ({PHASES[phase]} step {j + 1} of batch "
            f"{b + 1}/{nb}, round {r + 1}); {kept}. Rerun with a lower image or student learning rate"
        )

    t0 = time.monotonic()
    bar = progress_bar(total=total, initial=done, disable=not progress or total == 0, desc=desc, unit="step",
                       dynamic_ncols=True)  # fmt: skip
    teacher_cache: dict[tuple[int, int], torch.Tensor] = {}
    check_every = 1 if device.type == "cpu" else 10
    try:
        with Interrupt() as stop, teacher:
            if with_student and not prepared and done >= warm_total:
                prep_summary, prepared = _prepare(student, prepare, xs), True
            for k in range(done, total):
                if with_student and not prepared and k == warm_total:
                    prep_summary, prepared = _prepare(student, prepare, xs), True
                    save()
                phase, b, r, j = steps[k]
                x, first = xs[b], index_offset + starts[b]
                if phase in (0, 1):
                    opt = img_opts[b]
                    i_img = j if phase == 0 else cfg.warmup_iters + r * cfg.image_steps + j
                    for g in opt.param_groups:
                        g["lr"] = _cosine(cfg.image_lr, i_img, img_total)
                    t_logits, terms, prior = teacher(x, first)
                    if phase == 1:
                        disc = discrepancy(t_logits, student(x), cfg.temperature)
                        loss = prior - cfg.disc_weight * disc
                    else:
                        disc, loss = prior.new_zeros(()), prior
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if clip is not None:
                        with torch.no_grad():
                            x.copy_(clip(x))
                    hist[k] = torch.stack([loss.new_tensor(float(phase)), disc.detach(), terms["pse"].detach(),
                                           terms["tv"].detach(), loss.detach()])  # fmt: skip
                else:
                    i_stu = (r * nb + b) * cfg.student_steps + j
                    for g in stu_opt.param_groups:
                        g["lr"] = _cosine(cfg.student_lr, i_stu, stu_total)
                    key = (r, b)
                    if key not in teacher_cache:
                        teacher_cache.clear()  # images are fixed during one student phase only
                        with torch.no_grad():
                            teacher_cache[key] = teacher(x.detach(), first)[0]
                    for _, p in params:
                        p.requires_grad_(True)
                    try:
                        disc = discrepancy(teacher_cache[key], student(x.detach()), cfg.temperature)
                        stu_opt.zero_grad(set_to_none=True)
                        disc.backward()
                        stu_opt.step()
                    finally:
                        for _, p in params:
                            p.requires_grad_(False)
                            p.grad = None
                    zero = disc.new_zeros(())
                    hist[k] = torch.stack([disc.new_tensor(2.0), disc.detach(), zero, zero, disc.detach()])
                if (k + 1) % check_every == 0 or k + 1 == total:
                    for kk in range(max(0, k + 1 - check_every), k + 1):
                        check(kk)
                done = k + 1
                bar.update(1)
                if done % checkpoint_every == 0 and done < total:
                    save()
                if callback is not None:
                    try:
                        callback(done)
                    except KeyboardInterrupt:
                        stop.requested = True
                if stop.requested:
                    check(k)
                    save()
                    stop.deliver()
            if with_student and not prepared:  # no warm-up steps at all and no rounds: still calibrated
                prep_summary, prepared = _prepare(student, prepare, xs), True
    finally:
        bar.close()
    if with_student and params:
        mark_modified(student, {name for name, _ in params})
    out = torch.cat([x.detach() for x in xs]) if xs else images.detach()
    summary = {
        "method": "psaq2",
        "config": cfg.to_dict(),
        "steps": total,
        "warmup_steps": warm_total,
        "image_steps_total": nb * img_total,
        "student_steps_total": stu_total if with_student else 0,
        "trainable_tensors": len(params),
        "prepare": prep_summary,
        "columns": list(COLUMNS),
        "phases": list(PHASES),
        "curve": _subsample(hist.cpu()),
        "rounds": _phase_ends(hist.cpu(), steps, cfg),
        "wall_time_s": round(wall_before + time.monotonic() - t0, 3),
    }
    if keep_checkpoint:
        save()
    elif ckpt is not None and ckpt.exists():
        ckpt.unlink()
    return out, summary


def _prepare(student: nn.Module, prepare, xs: list[torch.Tensor]):
    """Calibrate the student on the current (warmed-up) images; its summary is kept."""
    images = torch.cat([x.detach() for x in xs])
    return prepare(student, images) if prepare is not None else None
