"""The one calibration-spec resolver: ``--calib`` → (calibration set, held-out set).

Every command and the API resolve a spec here, so ``real:DIR`` means the same images everywhere:

- a synthesis method name (``sardfq``, ``psaq``, ``noise``): synthesize ``n + holdout`` images;
- ``psaq2`` (PSAQ-ViT V2): not resolved here: it trains the quantized model together with its
  images, so the API (``sx.psaq2``, ``sx.quantize(model, "psaq2")``) and the main job run it;
- ``real:DIR`` / ``real:fashion-mnist``: the *train* split, shuffled by ``seed``; the first ``n``
  calibrate, the next ``holdout`` are held out (so ``quantize`` and the main job with the same
  ``--num-images`` and ``--seed`` calibrate on the same images);
- a ``calib.safetensors`` file (or a folder holding one): its first ``n`` images calibrate, the
  rest (when ``holdout``) are held out.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sardfq_export.core.calibset import CalibSet
from sardfq_export.core.errors import UserInputError

# Specs whose images co-evolve with the quantized student (calibrators.adaptive), run by the API.
ADAPTIVE_CALIBS = ("psaq2",)


def calib_kind(spec: str) -> str:
    """'real', 'file', 'method' (a registered synthesis method) or 'adaptive' (psaq2); else refused."""
    from sardfq_export.synthesis.methods import METHODS

    if spec.startswith("real:"):
        return "real"
    if spec in METHODS:
        return "method"
    if spec in ADAPTIVE_CALIBS:
        return "adaptive"
    path = Path(spec).expanduser()
    if path.is_file() or (path.is_dir() and (path / "calib.safetensors").is_file()):
        return "file"
    raise UserInputError(
        f"--calib {spec!r}: use {', '.join([*METHODS, *ADAPTIVE_CALIBS])}, real:DIR, real:fashion-mnist or a "
        "calib.safetensors file"
    )


def real_calibration(source: str, data_config: dict, n: int, holdout: int = 0, seed: int = 0):
    """``n`` (+ ``holdout``) real *train* images, shuffled by ``seed``."""
    from sardfq_export.data import load_dataset

    if not source:
        raise UserInputError(
            "--calib real: needs a folder or 'fashion-mnist' (e.g. --calib real:fashion-mnist)"
        )
    ds = load_dataset(source, data_config, split="train")
    if len(ds) < n + min(holdout, 1):
        raise UserInputError(
            f"--calib real:{source} has {len(ds)} images; need at least {n + min(holdout, 1)}"
        )
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=gen)[: min(len(ds), n + holdout)].numpy()
    images, labels = ds.take(idx)
    meta = {"method": "real", "source": ds.name, "split": "train", "num_images": n, "seed": seed}
    return CalibSet(images=images, labels=labels, meta=meta)


def file_calibration(spec: str, input_size: tuple[int, ...]) -> CalibSet:
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "calib.safetensors"
    cal = CalibSet.load(path)
    if tuple(cal.images.shape[1:]) != tuple(input_size):
        raise UserInputError(
            f"{path} holds images of shape {tuple(cal.images.shape[1:])}, the model takes {tuple(input_size)}"
        )
    return cal


def resolve_calibration(
    spec: str,
    loaded,
    n: int,
    holdout: int = 0,
    seed: int = 0,
    *,
    synth_config=None,
    out: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    say=None,
    device=None,
) -> tuple[CalibSet, CalibSet | None]:
    """(calibration set of ``n`` images, held-out set of up to ``holdout`` images or None).

    ``synth_config`` (a :class:`SynthConfig`) overrides the synthesis settings for method specs;
    its ``num_images`` and ``seed`` are set from ``n + holdout`` and ``seed``. ``device``: where
    synthesis runs (``auto``: CUDA when present).
    """
    from dataclasses import replace

    kind = calib_kind(spec)
    if kind == "adaptive":
        raise UserInputError(
            f"--calib {spec} trains the quantized model together with its images: run the main job "
            f"(sardfq-export --calib {spec}) or quantize with it (sx.quantize(model, {spec!r}))"
        )
    if kind == "real":
        full = real_calibration(spec[len("real:") :], loaded.data_config, n, holdout, seed)
    elif kind == "file":
        full = file_calibration(spec, loaded.input_size)
        if holdout and len(full) <= n and say is not None:
            say(f"note: {spec} has no images beyond the {n} for calibration; fidelity reuses them")
    else:
        from sardfq_export.synthesis.config import SynthConfig
        from sardfq_export.synthesis.runner import synthesize

        cfg = synth_config or SynthConfig(method=spec)
        cfg = replace(cfg.with_model_defaults(loaded.extra), method=spec, num_images=n + holdout, seed=seed)
        full = synthesize(loaded, cfg, out=out, resume=resume, progress=progress, device=device)
    if not holdout:
        return (full.split(n)[0] if len(full) > n else full), None
    if len(full) <= n:
        return full, full
    cal, held = full.split(n)
    return cal, held
