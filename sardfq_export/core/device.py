"""Where torch runs (``--device auto|cpu|cuda[:N]``) and in what precision (``--precision fp32|bf16``).

One resolver for every command and API verb, so "auto" means the same everywhere: the CUDA GPU
when one is visible (under torchrun: ``cuda:LOCAL_RANK``), else the CPU. Asking for CUDA where
there is none is a one-line user error (exit 2), never a silent fall-back to the CPU.

Stages run on the device the model is on; the API verbs move the model(s) there for their work
and back afterwards (:func:`on_device`), so what they return and save is on the CPU and the
artifacts do not depend on the machine that made them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from sardfq_export.core.errors import UserInputError

DEVICE_CHOICES = "auto|cpu|cuda[:N]"
PRECISIONS = ("fp32", "bf16")
PRECISION_CHOICES = ("auto", *PRECISIONS)  # auto: resolve_precision
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def check_device_spec(spec: str | torch.device | None) -> str:
    """``spec`` normalized ("auto", "cpu", "cuda", "cuda:N"); a malformed one is a one-line error."""
    if spec is None:
        return "auto"
    text = str(spec).strip().lower()
    m = _DEVICE_RE.match(text)
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise UserInputError(f"device {str(spec)!r}: use {DEVICE_CHOICES} (e.g. cuda:0)")
    return text


def _local_rank() -> int | None:
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return int(os.environ["LOCAL_RANK"]) if world > 1 and "LOCAL_RANK" in os.environ else None
    except ValueError:
        return None


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """``auto|cpu|cuda[:N]`` (or ``None`` = auto) → a concrete ``torch.device``.

    auto: ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``. ``cuda`` without an index is
    ``cuda:LOCAL_RANK`` under torchrun (one GPU per process), else the current CUDA device. Raises
    :class:`UserInputError` when CUDA is asked for and absent, or the index does not exist.
    """
    text = check_device_spec(spec)
    kind, _, index = text.partition(":")
    has_cuda = torch.cuda.is_available()
    if kind == "cpu" or (kind == "auto" and not has_cuda):
        return torch.device("cpu")
    if not has_cuda:
        raise UserInputError(
            f"--device {text}: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
            "use --device cpu (or auto)"
        )
    count = torch.cuda.device_count()
    local = _local_rank()
    if index:
        if local is not None and int(index) != local:
            raise UserInputError(
                f"--device {text} under torchrun: each process takes cuda:LOCAL_RANK; pass --device cuda"
            )
        n = int(index)
    else:
        n = local if local is not None else torch.cuda.current_device()
    if n >= count:
        raise UserInputError(
            f"--device cuda:{n}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})"
        )
    return torch.device("cuda", n)


def check_precision(precision: str, device: torch.device) -> str:
    """``auto``, ``fp32`` or ``bf16``; bf16 on a CUDA GPU without bf16 support is a one-line error."""
    if precision not in PRECISION_CHOICES:
        raise UserInputError(f"precision {precision!r}: use one of {', '.join(PRECISION_CHOICES)}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserInputError(f"--precision bf16: {device} does not support bfloat16; use --precision fp32")
    return precision


def bf16_native(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 matmuls in hardware: CUDA with bf16 support, or a CPU
    with AVX512-BF16 or AMX (oneDNN's bf16 kernels). Elsewhere bf16 is emulated."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(
    precision: str | None, device: torch.device | str, model_default: str | None = None
) -> str:
    """``auto`` (or None) → the model's own measured default when it has one, else ``bf16`` where
    ``device`` runs it natively and ``fp32`` elsewhere; ``fp32``/``bf16`` stay as asked.

    Why bf16 where native: bench/precision_synthesis.py (docs/precision-synthesis.md) finds the
    calibration from bf16 synthesis as good as fp32's within the seed spread (reference model and a
    ViT-S/14 at 112 px, 3 seeds), and bf16 synthesis 3.2x faster on deit_tiny@224 on an AVX512-BF16
    CPU. The reference model keeps fp32 (its default in the zoo): its matmuls are too small, bf16 ran
    it at 0.47x fp32's speed on that CPU.
    """
    if precision not in (None, "auto"):
        return precision
    if model_default is not None:
        return model_default
    return "bf16" if bf16_native(device) else "fp32"


def precision_note(precision: str, device: torch.device | str) -> str | None:
    """A line to show the user when ``precision`` will run slower than fp32 on ``device``, else None."""
    if precision != "bf16" or bf16_native(device):
        return None
    # Measured (docs/precision-synthesis.md): on a 2-core Xeon without AVX512-BF16, a ViT-S/14 SARDFQ
    # step ran 2-4x slower in bf16 than in fp32, since every bf16 matmul is converted and emulated.
    return (f"note: {device} has no native bfloat16 (no AVX512-BF16/AMX): --precision bf16 is emulated "
            "here and usually slower than fp32")  # fmt: skip


def autocast(device: torch.device | str, precision: str):
    """``torch.autocast`` for ``precision`` on ``device``'s type (a no-op context for fp32)."""
    dev = torch.device(device)
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def module_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); CPU for a module with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextmanager
def on_device(device: torch.device | str | None, *modules: nn.Module) -> Iterator[torch.device]:
    """Move ``modules`` to ``device`` for the block, then back where each was (also on errors).

    ``device=None`` resolves "auto". What a verb returns or saves is therefore on the CPU (when
    the modules were), whatever device did the work.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    homes = [module_device(m) for m in modules]
    for m in modules:
        m.to(dev)
    try:
        yield dev
    finally:
        for m, home in zip(modules, homes, strict=True):
            m.to(home)


def describe_device(device: torch.device) -> str:
    """'cpu (N threads)' or 'cuda:0 (NVIDIA H100 …)', for reports."""
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"
