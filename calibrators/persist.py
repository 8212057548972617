"""Save / load a calibrated fake-quant model without recomputing anything.

Layout of ``DIR/quantized/`` (DIR is ``--out``; passing the ``quantized`` folder itself also works):

    scheme.json          the Scheme (Scheme.to_dict)
    quantized.json       format, base-model reference, fingerprint of the float model, calibration
                         settings, which quantizers are enabled, which parameters were fine-tuned
    state.safetensors    every quantizer scale + the parameters changed after instrumentation
                         (fine-tuning / smoothing), or every tensor when ``include_weights=True``

Loading rebuilds the instrumentation on the float model the caller passes and refuses (one-line
``UserInputError``) a base model whose structure or weights differ from the one quantized.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from sardfq_export.calibrators.scheme import Scheme

from sardfq_export.core.errors import UserInputError
from sardfq_export.core.io import atomic_dir

FORMAT = "sardfq-quantized-1"
SUBDIR = "quantized"


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """sha256 of the float model's structure (names, shapes, dtypes, class) and of its weights."""
    structure, weights = hashlib.sha256(), hashlib.sha256()
    structure.update(type(model).__name__.encode())
    for name, t in sorted(model.state_dict().items()):
        line = f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode()
        structure.update(line)
        weights.update(line)
        weights.update(_tensor_bytes(t))
    return {"structure": structure.hexdigest()[:32], "weights": weights.hexdigest()[:32]}


def resolve_dir(path: str | Path) -> Path:
    """``DIR`` or ``DIR/quantized`` → the folder holding quantized.json (or a clear error)."""
    path = Path(path).expanduser()
    for cand in (path / SUBDIR, path):
        if (cand / "quantized.json").is_file():
            return cand
    raise UserInputError(
        f"{path} holds no quantized model (no {SUBDIR}/quantized.json): run 'sardfq-export quantize --out {path}'"
    )


def is_quantized_dir(path: str | Path) -> bool:
    try:
        resolve_dir(path)
    except UserInputError:
        return False
    return True


def read_meta(path: str | Path) -> dict:
    """The quantized.json of a saved model (base model reference, scheme, calibration...)."""
    folder = resolve_dir(path)
    try:
        meta = json.loads((folder / "quantized.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"cannot read {folder / 'quantized.json'}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise UserInputError(f"{folder} was written in format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def save_quantized(
    qmodel: nn.Module,
    out_dir: str | Path,
    base_model_ref: dict | None = None,
    extra: dict | None = None,
    include_weights: bool = False,
) -> Path:
    """Write ``qmodel``'s scales (+ fine-tuned weights) to ``out_dir/quantized/`` atomically.

    ``base_model_ref`` says how to rebuild the float model (e.g. ``{"name": ..., "checkpoint": ...}``);
    ``include_weights`` stores every tensor (for base models that cannot be rebuilt, e.g. random init).
    """
    from safetensors.torch import save_file
    from sardfq_export.calibrators.instrument import iter_quantizers

    info = getattr(qmodel, "sardfq_quant", None)
    scheme: Scheme | None = getattr(qmodel, "scheme", None)
    if info is None or scheme is None:
        raise ValueError("save_quantized needs a model made by calibrators.quantize_model")
    state = qmodel.state_dict()
    quant_keys = {f"{n}.scale" for n, _ in iter_quantizers(qmodel)}
    if include_weights:
        keep = set(state)
    else:
        keep = quant_keys | {k for k in state if k in info["modified"]}
    tensors = {k: state[k].detach().cpu().contiguous() for k in sorted(keep)}
    meta = {
        "format": FORMAT,
        "base_model": base_model_ref or {},
        "fingerprint": info["fingerprint"],
        "scheme": scheme.to_dict(),
        "calibration": info.get("calibration", {}),
        "enabled": {n: q.enabled for n, q in iter_quantizers(qmodel)},
        "modified": sorted(info["modified"]),
        "weights_included": bool(include_weights),
        "versions": {"torch": torch.__version__},
        **(extra or {}),
    }
    out_dir = Path(out_dir)
    final = out_dir / SUBDIR
    with atomic_dir(final) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"), metadata={"format": FORMAT})
        (tmp / "scheme.json").write_text(scheme.to_json() + "\n")
        (tmp / "quantized.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return final


def load_quantized(path: str | Path, base_model: nn.Module) -> nn.Module:
    """Rebuild the fake-quant model saved in ``path`` on top of the float ``base_model``.

    Refuses a base model that is not the one that was quantized (structure or weights differ).
    """
    from safetensors.torch import load_file
    from sardfq_export.calibrators.instrument import iter_quantizers, quantize_model

    folder = resolve_dir(path)
    meta = read_meta(folder)
    scheme = Scheme.from_dict(meta["scheme"])
    saved_fp = meta.get("fingerprint", {})
    fp = model_fingerprint(base_model)
    ref = meta.get("base_model", {}).get("name", "?")
    if fp["structure"] != saved_fp.get("structure"):
        raise UserInputError(
            f"{folder} was quantized from a different model architecture ({ref}): pass the same --model "
            "(and timm options) it was made with"
        )
    try:
        tensors = load_file(str(folder / "state.safetensors"))
    except Exception as exc:
        raise UserInputError(f"cannot read {folder / 'state.safetensors'}: {exc}") from None
    if meta.get("weights_included"):
        base_model.load_state_dict(
            {k: v for k, v in tensors.items() if not k.endswith("_quantizer.scale")}, strict=False
        )
    elif fp["weights"] != saved_fp.get("weights"):
        raise UserInputError(
            f"{folder} was quantized from other weights of {ref} (fingerprint mismatch): pass the same "
            "--model/--checkpoint it was made with, or quantize again"
        )
    qmodel = quantize_model(base_model, scheme)
    qmodel.sardfq_quant["fingerprint"] = saved_fp
    expected = qmodel.state_dict()
    for k, v in tensors.items():
        if k not in expected or tuple(expected[k].shape) != tuple(v.shape):
            raise UserInputError(f"{folder}: saved tensor {k} {tuple(v.shape)} does not fit the model")
    missing = [f"{n}.scale" for n, _ in iter_quantizers(qmodel) if f"{n}.scale" not in tensors]
    if missing:
        raise UserInputError(f"{folder}: {len(missing)} quantizer scales missing (e.g. {missing[:2]})")
    qmodel.load_state_dict(tensors, strict=False)
    enabled = meta.get("enabled", {})
    for n, q in iter_quantizers(qmodel):
        q.enabled = bool(enabled.get(n, q.enabled))
    qmodel.sardfq_quant["modified"] = set(meta.get("modified", []))
    qmodel.sardfq_quant["calibration"] = meta.get("calibration", {})
    return qmodel.eval()


def load_quantized_model(
    path: str | Path,
    model: str | None = None,
    checkpoint: str | None = None,
    random_init: bool = False,
):
    """The one quantized-model loader: ``(float LoadedModel, fake-quant model)`` from ``quantized/``.

    ``path`` is a ``quantized/`` folder or the ``--out`` holding it. The float model is rebuilt from
    the folder's recorded base-model reference unless ``model``/``checkpoint`` name another (which
    must then match the recorded fingerprint, else a one-line error).
    """
    from sardfq_export.models import ModelSettings, load_model
    from sardfq_export.models.loading import with_preprocessing
    from sardfq_export.models.reference import REFERENCE_NAME

    meta = read_meta(path)
    base = meta.get("base_model") or {}
    if model is None and checkpoint is None and base.get("settings"):
        # the loader's own record: num_classes / img_size / kwargs exactly as first loaded
        loaded = load_model(**ModelSettings.from_dict(base["settings"]).to_dict())
    else:
        if model is None and checkpoint is None:
            model = None if base.get("name") in (None, REFERENCE_NAME) else base.get("name")
            checkpoint = base.get("checkpoint")
            random_init = random_init or bool(base.get("random_init"))
        loaded = load_model(model, checkpoint, pretrained=not random_init)  # random init is seeded there
        # the preprocessing the model was quantized with travels with the folder, whoever names the model
        loaded = with_preprocessing(loaded, (base.get("settings") or {}).get("preprocessing"))
    qmodel = load_quantized(path, loaded.model).eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    return loaded, qmodel
