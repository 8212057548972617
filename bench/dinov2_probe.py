"""Probe: fake-quant (and optionally deployed) top-1 of the DINOv2 benchmark model per recipe.

    bash tools/dev.sh python bench/dinov2_probe.py --calib real --scheme w4a16 --rounding gptq --limit 2000

One JSON line per run on stdout (appended to --log when given): the recipe, fp32 and fake-quant
top-1 on the first --limit Fashion-MNIST test images, and the flip rate under 1e-6 input noise
(the fragility the real-ViT issue describes). Calibration sets are cached under --cache so
repeated probes do not re-synthesize. This is the exploration tool; the published table comes
from bench/dinov2_table.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import sardfq_export as sx
from sardfq_export.data import load_raw, preprocess


def _commit() -> str:
    """The code a row was measured with: HEAD, "+dirty" when code had changes (docs/, where this
    log is appended, does not count)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return (head or "unknown") + ("+dirty" if dirty else "")


def calib_set(model, kind: str, n: int, seed: int, cache: Path, iters: int | None, bf16: bool = False,
              pse_weight: float | None = None):  # fmt: skip
    """A calibration set by kind (noise / real / sardfq / psaq), cached on disk by its recipe;
    ``pse_weight``: PSAQ-ViT's patch-similarity entropy weight (SARDFQ + PSE, an experiment)."""
    from sardfq_export.core.calibset import CalibSet

    if kind == "real":
        cal, _ = sx.calibration_set("real:fashion-mnist", model, n, seed=seed, progress=False)
        return cal
    pse = "" if pse_weight is None else f"-pse{pse_weight:g}"
    path = cache / f"{kind}{pse}-n{n}-s{seed}-it{iters}{'-bf16' if bf16 else ''}.safetensors"
    if path.exists():
        return CalibSet.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # saved there by the runner; a stopped run (Ctrl-C, SIGTERM) leaves its checkpoint beside it and
    # the next probe resumes it (a slow host synthesizes for an hour)
    # Unframed (frame 0), as when the probes' results in docs/ were measured, before the model's
    # synthesis default became framed: the file name above does not carry the frame.
    extra = {"frame": 0.0} if pse_weight is None else {"frame": 0.0, "pse_weight": pse_weight}
    return sx.synthesize(model, method=kind, num_images=n, seed=seed, iters=iters, bf16=bf16, out=path,
                         resume=True, progress=True, **extra)  # fmt: skip


def top1(model, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        logits = torch.cat([model(c) for c in x.split(batch)])
    return float((logits.argmax(1) == y).float().mean()), logits


def model_cache(root: Path, loaded) -> Path:
    """``root``/model-<weights hash>: calibration sets, FP32 logits and finished cells belong to one
    build of the model's weights, so a rebuilt model (a new head recipe, say) never reuses another's."""
    from sardfq_export import calibrators

    return root / f"model-{calibrators.model_fingerprint(loaded.model)['weights'][:12]}"


def fp32_top1(
    loaded, x: torch.Tensor, y: torch.Tensor, cache: Path, limit: int
) -> tuple[float, torch.Tensor]:
    """The float model's top-1 and logits on the first ``limit`` test images, cached under ``cache``
    (minutes per probe on 2 cores otherwise)."""
    from sardfq_export import calibrators

    path = cache / f"fp32-logits-{calibrators.model_fingerprint(loaded.model)['weights'][:12]}-{limit}.pt"
    if path.exists():
        logits = torch.load(path)
        return float((logits.argmax(1) == y).float().mean()), logits
    acc, logits = top1(loaded.model, x, y)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(logits, path)
    return acc, logits


@dataclass
class Setup:
    """What every DINOv2 probe starts from: the model, the first ``limit`` test images and labels,
    the per-weights cache folder, the float model's top-1 and logits, and the calibration set."""

    loaded: object
    x: torch.Tensor
    y: torch.Tensor
    cache: Path
    fp32_top1: float
    fp32_logits: torch.Tensor
    cal: object
    calib_seconds: float


def setup(model: str, calib: str, num_images: int, seed: int, cache: Path, iters: int | None, limit: int,
          bf16: bool = False, pse_weight: float | None = None) -> Setup:  # fmt: skip
    loaded = sx.load_model(model)
    raw = load_raw("fashion-mnist", "test")
    x = preprocess(raw.images[:limit], loaded.data_config)
    y = torch.as_tensor(raw.labels[:limit]).long()
    cache = model_cache(cache, loaded)
    fp_top1, fp_logits = fp32_top1(loaded, x, y, cache, limit)
    t0 = time.perf_counter()
    cal = calib_set(loaded, calib, num_images, seed, cache, iters, bf16, pse_weight)
    return Setup(loaded, x, y, cache, fp_top1, fp_logits, cal, time.perf_counter() - t0)


def emit(row: dict, log: Path | None) -> None:
    """One JSON line on stdout, appended to ``log`` when given."""
    line = json.dumps(row)
    print(line, flush=True)
    if log:
        with open(log, "a") as fh:
            fh.write(line + "\n")


def _grey_crop_views(data_config: dict) -> None:
    """Experiment: wrap ``calibrators.gptq.hessian_views`` so that views 4, 6, … (every second
    random crop) are grey: ``0.299 R + 0.587 G + 0.114 B`` of the un-normalized crop, replicated to
    three channels and normalized again. Grey images are among DINOv2's training augmentations
    (RandomGrayscale), so they are label-preserving for the model; here they also happen to be what
    the Fashion-MNIST test data look like, so a gain is an upper bound for other data."""
    from sardfq_export.calibrators import gptq

    plain = gptq.hessian_views
    mean = torch.tensor(data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, -1, 1, 1)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def views(images, n, seed=0):
        out = plain(images, n, seed)
        k = len(images)
        for v in range(3, n, 2):
            crops = out[v * k : (v + 1) * k] * std + mean
            grey = (crops * luma).sum(1, keepdim=True).expand_as(crops)
            out[v * k : (v + 1) * k] = (grey - mean) / std
        return out

    gptq.hessian_views = views


def _token_mix(mix: float) -> None:
    """Experiment: GPTQ's rollout token weights (``--gptq-tokens rollout``, calibrators.rollout)
    blended with uniform ones, ``(1 − mix) + mix·w``; mix 1 is the product's rollout weighting.
    Wraps what ``calibrators.gptq`` calls (not in the product)."""
    from sardfq_export.calibrators import gptq

    full = gptq.rollout_token_weights

    def mixed(model, images, batch_size=32):
        return {k: (1 - mix) + mix * v for k, v in full(model, images, batch_size).items()}

    gptq.rollout_token_weights = mixed


def _shrunk_hessian(shrink: float) -> None:
    """Experiment: GPTQ rounds on ``(1 − shrink)·H + shrink·diag(H)``, the calibration tokens'
    input correlations trusted less (a diagonal H is round-to-nearest). Why tried: per Linear, GPTQ
    from 32 synthetic images leaves 0.93 (SARDFQ) / 0.82 (PSAQ-ViT) of round-to-nearest's error on
    real inputs' H, and 0.70 / 0.63 with shrink 0.5 (bench/dinov2_hessian_probe.py). Wraps what
    ``calibrators.gptq`` calls (not in the product: measured no top-1 gain)."""
    from sardfq_export.calibrators import gptq

    plain = gptq.gptq_round

    def shrunk(weight, hessian, q, damp=gptq.DAMP, act_order=True):
        h = (1 - shrink) * hessian + shrink * torch.diag(torch.diag(hessian))
        return plain(weight, h, q, damp, act_order)

    gptq.gptq_round = shrunk


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dinov2_s14_fmnist")
    ap.add_argument("--calib", default="real", choices=["noise", "real", "sardfq", "psaq"])
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scheme", default="w8a8")
    ap.add_argument("--range", default="auto")
    ap.add_argument("--weight-range", default="mse")
    ap.add_argument("--rounding", default="auto")
    ap.add_argument(
        "--gptq-views", type=int, default=1, help="GPTQ Hessian from the images and their variants"
    )
    ap.add_argument(
        "--gptq-damp", type=float, default=0.01, help="GPTQ dampening (fraction of the mean diagonal)"
    )
    ap.add_argument("--finetune", default="none")
    ap.add_argument(
        "--smoothquant", type=float, default=0.0, help="0: off (stated: the model may default it on)"
    )
    ap.add_argument("--smooth-fc2", action="store_true")
    ap.add_argument("--centre-fc2", action="store_true")
    ap.add_argument("--bias-correct", action="store_true")
    ap.add_argument("--awq", action="store_true", help="activation-aware scaling of 4-bit weights")
    ap.add_argument("--keep-fp", nargs="*", default=[])
    ap.add_argument(
        "--sensitivity",
        type=int,
        default=0,
        metavar="N",
        help="also rank the quantized Linears by what each alone costs (calibrators.layer_sensitivity) on "
        "the first N test images and on a held-out synthetic set (the next seed's)",
    )
    ap.add_argument(
        "--calib-seeds",
        type=int,
        nargs="+",
        help="calibrate on the union of these seeds' sets (--num-images each; synthetic sets are cached "
        "per seed, so more images without a longer synthesis)",
    )
    ap.add_argument(
        "--grey-views",
        action="store_true",
        help="experiment (not in the product yet): every second crop view of --gptq-views is turned grey "
        "(luminance in pixel space, the model's mean/std), a view from DINOv2's own training augmentations",
    )
    ap.add_argument("--bf16", action="store_true", help="synthesize under bf16 autocast")
    ap.add_argument("--gptq-tokens", choices=["uniform", "rollout"], default="uniform")
    ap.add_argument(
        "--token-mix", type=float, default=None,
        help="experiment (with --gptq-tokens rollout): rollout weights blended with uniform ones",
    )  # fmt: skip
    ap.add_argument("--deployed", action="store_true", help="also export and run the ONNX Runtime graph")
    ap.add_argument(
        "--ort-unsigned", choices=["auto", "on", "off"], default="auto",
        help="--deployed: UINT8 Q/DQ codes in the ORT graph (auto: where this CPU's INT8 GEMM saturates)",
    )  # fmt: skip
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/sardfq-export/bench-calib")
    ap.add_argument("--gptq-shrink", type=float, default=0.0,
                    help="experiment: GPTQ on (1-s)·H + s·diag(H) (bench/dinov2_hessian_probe.py); 0: the product's")  # fmt: skip
    ap.add_argument("--pse-weight", type=float,
                    help="synthesize with PSAQ-ViT's patch-similarity entropy at this weight (with --calib sardfq: SARDFQ + PSE)")  # fmt: skip
    ap.add_argument("--also", nargs="*", default=[], choices=["noise", "real", "sardfq", "psaq"],
                    help="calibrate on these kinds' sets (same seed and size) too, appended to --calib's")  # fmt: skip
    ap.add_argument("--log", type=Path)
    a = ap.parse_args(argv)
    commit = _commit()  # at the start: the code this process imported, not HEAD when it ends

    p = setup(a.model, a.calib, a.num_images, a.seed, a.cache, a.iters, a.limit, a.bf16, a.pse_weight)
    loaded, x, y, cal = p.loaded, p.x, p.y, p.cal
    fp_top1, fp_logits, t_cal = p.fp32_top1, p.fp32_logits, p.calib_seconds
    if a.calib_seeds:
        parts = [calib_set(loaded, a.calib, a.num_images, s, p.cache, a.iters, a.bf16, a.pse_weight)
                 for s in a.calib_seeds]  # fmt: skip
        cal = torch.cat([c.images for c in parts])
    if a.also:  # a union of sources (bench/dinov2_hessian_probe.py: their GPTQ Hessians carry over better)
        extra = [calib_set(loaded, k, a.num_images, a.seed, p.cache, a.iters, a.bf16) for k in a.also]
        cal = torch.cat([cal if isinstance(cal, torch.Tensor) else cal.images, *(c.images for c in extra)])
    if a.grey_views:
        _grey_crop_views(loaded.data_config)
    if a.gptq_shrink:
        _shrunk_hessian(a.gptq_shrink)
    if a.token_mix is not None:
        _token_mix(a.token_mix)
    t0 = time.perf_counter()
    q = sx.quantize(loaded, cal, scheme=a.scheme, range=a.range, weight_range=a.weight_range,
                    weight_rounding=a.rounding, gptq_views=a.gptq_views, gptq_tokens=a.gptq_tokens, gptq_damp=a.gptq_damp, finetune=a.finetune, seed=a.seed, smoothquant=a.smoothquant,
                    smooth_fc2=a.smooth_fc2, centre_fc2=a.centre_fc2, bias_correct=a.bias_correct, awq=a.awq, keep_fp=tuple(a.keep_fp), progress=False)  # fmt: skip
    t_q = time.perf_counter() - t0
    fq_top1, fq_logits = top1(q.model, x, y)
    gen = torch.Generator().manual_seed(1)
    noisy = x[:500] + 1e-6 * torch.randn(x[:500].shape, generator=gen)
    _, noisy_logits = top1(q.model, noisy, y[:500])
    flips = float((noisy_logits.argmax(1) != fq_logits[:500].argmax(1)).float().mean())
    sensitivity = {}
    if a.sensitivity:  # which layers the drop comes from, on real images and on what the product sees
        from sardfq_export import calibrators

        held = calib_set(loaded, "sardfq", 32, a.seed + 1, p.cache, a.iters or 100)
        for where, imgs in (("real", x[: a.sensitivity]), ("synthetic_holdout", held.images)):
            sens = calibrators.layer_sensitivity(q.model, imgs)
            sensitivity[where] = {"images": sens["images"], "all": sens["all"], "layers": sens["layers"][:12]}
    deployed = {}
    if a.deployed:  # the ONNX Runtime graph the main job deploys, on the same images
        import tempfile

        from dinov2_table import logits_of, ort_runner

        with tempfile.TemporaryDirectory() as tmp:
            res = sx.export(q, Path(tmp) / "model.onnx", target="onnxruntime")
            unsigned = {"auto": None, "on": True, "off": False}[a.ort_unsigned]
            dep_logits = logits_of(ort_runner(Path(res.path), Path(tmp), unsigned), x)
        deployed = {
            "deployed_top1": float((dep_logits.argmax(1) == y).float().mean()),
            "deployed_vs_fakequant": float((dep_logits.argmax(1) == fq_logits.argmax(1)).float().mean()),
            "ort_unsigned_int8": a.ort_unsigned,
            "deployed_vs_fakequant_cosine": float(
                torch.nn.functional.cosine_similarity(dep_logits, fq_logits, dim=1).mean()
            ),
        }
    row = {
        "model": a.model, "weights": p.cache.name.removeprefix("model-"), "bf16_synthesis": a.bf16, **deployed, "calib": a.calib, "num_images": len(cal), "calib_seeds": a.calib_seeds, "also": a.also, "gptq_shrink": a.gptq_shrink, "pse_weight": a.pse_weight, "iters": a.iters, "seed": a.seed,
        "scheme": a.scheme, "range": a.range, "weight_range": a.weight_range, "rounding": a.rounding, "gptq_views": a.gptq_views, "gptq_damp": a.gptq_damp,
        **({"grey_views": True} if a.grey_views else {}), "gptq_tokens": a.gptq_tokens, **({"token_mix": a.token_mix} if a.token_mix is not None else {}), "finetune": a.finetune, "smoothquant": a.smoothquant, "smooth_fc2": a.smooth_fc2, "centre_fc2": a.centre_fc2, "bias_correct": a.bias_correct, "awq": a.awq, "keep_fp": a.keep_fp, "limit": a.limit, "fp32_top1": fp_top1, "fakequant_top1": fq_top1,
        "drop_points": round(100 * (fp_top1 - fq_top1), 2),
        "agreement_vs_fp32": float((fq_logits.argmax(1) == fp_logits.argmax(1)).float().mean()),
        "noise_flip_rate": flips, "calib_seconds": round(t_cal, 1), "quantize_seconds": round(t_q, 1),
        "summary": {k: v for k, v in q.summary.items() if k in ("gptq", "recon", "bias_correction")},
        **({"awq": {**{k: v for k, v in aw.items() if k != "layers"}, "alpha": {r["name"]: r["alpha"] for r in aw["layers"]}}}
           if (aw := q.summary.get("calibration", {}).get("awq")) else {}),
        **({"sensitivity": sensitivity} if sensitivity else {}),
        "commit": commit,
    }  # fmt: skip
    emit(row, a.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
