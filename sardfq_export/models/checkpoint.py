"""Checkpoint files: read them safely, unwrap them, read the architecture off their shapes, load them.

Reading never unpickles code: safetensors, or ``torch.load(weights_only=True)`` with exactly one
extra allow-listed type, ``argparse.Namespace`` (timm's ``train.py`` saves its arguments under
``'args'``; DeiT's ``main.py`` does the same). Wrappers follow timm's ``load_state_dict``:
``state_dict`` / ``model`` (or ``state_dict_ema`` / ``model_ema`` with ``use_ema``) / ``module``,
and the DDP / ``torch.compile`` prefixes ``module.`` and ``_orig_mod.`` are stripped in any order.

What a checkpoint says about the model it came from (classes, input channels, image size) is read
from tensor shapes against a model built on the meta device; loading then goes through the model
family's own timm ``checkpoint_filter_fn`` (which resamples position embeddings / Swin bias tables
when an explicit ``img_size`` asks for another size) and a strict ``load_state_dict``.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from sardfq_export.core.errors import UserInputError

# Types a torch checkpoint may hold besides tensors and builtin containers: data holders only,
# never a callable (a class whose construction runs code would reopen what weights_only closes).
SAFE_GLOBALS = (argparse.Namespace,)
STATE_KEYS = ("state_dict", "model", "module")  # timm train.py, DeiT/torchvision, bare DDP
EMA_KEYS = ("state_dict_ema", "model_ema")  # timm train.py, DeiT
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile
BOOKKEEPING_KEYS = ("n_averaged",)  # torch.optim.swa_utils.AveragedModel's counter
# A local-dir / hub folder's weights, in timm's order of preference (timm.models._hub).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
# pretrained_cfg keys that describe preprocessing (what a checkpoint may carry for data_config).
DATA_CFG_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode", "label_names")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file's state dict, cleaned, plus what else the file says."""

    path: Path
    state: dict[str, torch.Tensor]
    key: str | None  # the wrapper key the weights came from ('state_dict_ema', ...), None if bare
    pretrained_cfg: dict = field(default_factory=dict)  # preprocessing the file carries, if any
    arch: str | None = None  # the model name the file says it was trained as (timm's 'arch')


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def _is_safetensors(path: Path) -> bool:
    """safetensors by suffix or by content (8-byte header length, then a JSON header)."""
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    return head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _torch_load(path: Path):
    try:
        # torch warns about pickle protocols of non-checkpoint files; the error below says it in one line
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        try:  # names the offending globals by scanning the pickle's opcodes (nothing is run)
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # a legacy (non-zip) file: the unpickler's message names the first one
            unsafe = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))[:1]
        if not unsafe and "Unsupported global" not in str(exc):
            raise UserInputError(  # not a refusal: a corrupt or foreign file
                f"cannot read checkpoint {path} (neither safetensors nor a torch.save file the safe "
                "loader parses): pass a .safetensors file or a torch checkpoint saved with torch.save"
            ) from None
        what = f" ({', '.join(unsafe[:3])})" if unsafe else ""
        raise UserInputError(
            f"checkpoint {path} holds pickled objects other than tensors and plain data{what}; "
            "refused, nothing was unpickled: where you trust it, re-save its weights with "
            "safetensors or torch.save(model.state_dict(), F)"
        ) from None


def read_file(path: str | Path) -> tuple[object, dict]:
    """The raw content of a checkpoint file and the safetensors metadata (``{}`` for torch files)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserInputError(f"checkpoint {path} does not exist: pass a .safetensors or torch file")
    try:
        if _is_safetensors(path):
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
            return load_file(str(path)), meta
        return _torch_load(path), {}
    except UserInputError:
        raise
    except Exception as exc:  # any parse failure is the file's fault, not ours
        raise UserInputError(
            f"cannot read checkpoint {path} ({_first_line(exc)}): pass a .safetensors file or a "
            "torch checkpoint saved with torch.save"
        ) from None


def _is_state(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` however nested (timm's ``clean_state_dict`` strips one of
    each, in a fixed order; DDP around compile around DDP happens)."""
    out = {}
    for k, v in state.items():
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        if k not in BOOKKEEPING_KEYS:
            out[k] = v
    return out


def unwrap(obj: object, path: Path, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict inside a checkpoint object and the key it sat under (timm's preference)."""
    key = None
    for _ in range(3):  # e.g. {'model': {'module': {...}}}; deeper is not a checkpoint we know
        if _is_state(obj) or not isinstance(obj, dict):
            break
        if use_ema and key is None:
            found = next((k for k in EMA_KEYS if isinstance(obj.get(k), dict)), None)
            if found is None:
                raise UserInputError(
                    f"checkpoint {path} holds no EMA weights ({'/'.join(EMA_KEYS)}; it has "
                    f"{', '.join(map(str, list(obj)[:6]))}): drop --use-ema"
                )
        else:
            found = next((k for k in STATE_KEYS if isinstance(obj.get(k), dict)), None)
        if found is None:
            if not use_ema and any(isinstance(obj.get(k), dict) for k in EMA_KEYS):
                raise UserInputError(f"checkpoint {path} holds only EMA weights: pass --use-ema")
            break
        key, obj = found if key is None else f"{key}.{found}", obj[found]
    if use_ema and key is None:
        raise UserInputError(
            f"checkpoint {path} is a bare state dict, it holds no EMA weights: drop --use-ema"
        )
    if not _is_state(obj):
        keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
        raise UserInputError(
            f"checkpoint {path} does not hold a state dict of tensors (found {keys}): pass the "
            "file train.py or torch.save(model.state_dict(), F) wrote"
        )
    return strip_prefixes(obj), key


def open_checkpoint(path: str | Path, use_ema: bool = False) -> Checkpoint:
    """Read, unwrap and clean a checkpoint file (safetensors or torch; nothing unpickled)."""
    path = Path(path).expanduser().resolve()
    raw, meta = read_file(path)
    state, key = unwrap(raw, path, use_ema)
    cfg: dict = {}
    if isinstance(raw, dict) and isinstance(raw.get("pretrained_cfg"), dict):
        cfg = raw["pretrained_cfg"]
    elif "pretrained_cfg" in meta:
        try:
            cfg = json.loads(meta["pretrained_cfg"])
        except ValueError:
            cfg = {}
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in DATA_CFG_KEYS}
    arch = raw.get("arch") if isinstance(raw, dict) and isinstance(raw.get("arch"), str) else None
    return Checkpoint(path, state, key, cfg, arch)


def find_weights(folder: Path) -> Path:
    """The weights file of a timm-format folder (``save_for_hf``'s names first, then any)."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    for ext in (".safetensors", ".pth", ".pth.tar", ".bin"):
        files = sorted(folder.glob(f"*{ext}"))
        if files:
            return files[0]
    raise UserInputError(
        f"{folder} has no weights file ({', '.join(WEIGHT_FILES)}): save it with "
        "timm.models.save_for_hf(model, DIR, safe_serialization=True)"
    )


# ---------------------------------------------------------------------------------------------
# What the shapes say


def classifier_name(model: nn.Module) -> str | None:
    """The module name of the model's classifier ('head' for ViT, 'head.fc' for Swin)."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        return None
    cls = get()
    return next((n for n, m in model.named_modules() if m is cls), None)


def _window(table: torch.Tensor) -> int:
    """Window side from a relative-position bias table of (2w-1)^2 rows (square windows)."""
    return (math.isqrt(table.shape[0]) + 1) // 2


def _swin_tables(state: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in state.items() if k.endswith("relative_position_bias_table")}


def _swin_img_size(state, model, patch: int, build: Callable[[int], nn.Module]) -> int | None:
    """Swin's image size, where the checkpoint fixes it.

    timm's Swin keeps ``attn_mask`` / ``relative_position_index`` non-persistent and its weights do
    not depend on the image size, except that a stage whose feature map is no larger than the window
    gets its window clamped to the map (``_calc_window_shift``, ``always_partition=False``): its bias
    table then gives that stage's size. Older checkpoints (timm < 0.9, Microsoft's repo) persisted
    ``attn_mask`` (windows x ws² x ws²), which gives it too. Otherwise the size cannot be known from
    the file (a 224 and a 256 checkpoint are identical in shape): the model's default is kept and
    ``img_size`` must be passed. Square inputs assumed; each candidate is verified on a meta build.
    """
    candidates = []
    for k, v in sorted(state.items()):
        m = re.fullmatch(r"layers\.(\d+)\.blocks\.\d+\.attn_mask", k)
        if m and v.ndim == 3:
            side, ws = math.isqrt(v.shape[0]), math.isqrt(v.shape[1])
            candidates.append(side * ws * 2 ** int(m.group(1)) * patch)
    tables = _swin_tables(state)
    mine = _swin_tables(model.state_dict())
    if not candidates and tables == mine:
        return None  # nothing in the file contradicts the default size
    for k, shape in sorted(tables.items()):
        m = re.match(r"layers\.(\d+)\.", k)
        if m and mine.get(k) is not None and shape[0] < mine[k][0]:  # clamped in the checkpoint
            candidates.append(_window(state[k]) * 2 ** int(m.group(1)) * patch)
    for img in dict.fromkeys(candidates):
        if _swin_tables(build(img).state_dict()) == tables:
            return img
    return None


def infer_settings(
    state: dict[str, torch.Tensor],
    model: nn.Module,
    family: str,
    build: Callable[[int], nn.Module],
    want: tuple[str, ...] = ("num_classes", "in_chans", "img_size"),
) -> dict[str, object]:
    """``num_classes``, ``in_chans``, ``img_size`` (those in ``want``) as the checkpoint's shapes give them.

    ``model`` is the architecture as asked for (meta device); ``build(img_size)`` builds it again at
    another size (Swin's candidates are checked that way). A value the shapes cannot give is left out.
    """
    found: dict[str, object] = {}
    cls = classifier_name(model)
    keys = [f"{cls}.weight"] if cls else []
    keys += [k for k in ("head.weight", "head.fc.weight") if k not in keys]
    weight = next((state[k] for k in keys if k in state), None)
    if weight is not None and weight.ndim == 2:
        found["num_classes"] = int(weight.shape[0])
    elif weight is None and cls is not None and not any(k.startswith("head") for k in state):
        found["num_classes"] = 0  # a headless (feature) checkpoint
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return found
    found["in_chans"] = int(proj.shape[1])
    ph, pw = (int(s) for s in proj.shape[-2:])
    if "img_size" not in want:
        pass
    elif family == "vit":
        pos = state.get("pos_embed")
        if pos is not None and pos.ndim == 3 and getattr(model, "pos_embed", None) is not None:
            prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
            grid = math.isqrt(max(pos.shape[1] - prefix, 0))
            if grid > 0 and grid * grid == pos.shape[1] - prefix:  # square grids only: else ask
                found["img_size"] = grid * ph if ph == pw else (grid * ph, grid * pw)
    elif family == "swin" and ph == pw:
        img = _swin_img_size(state, model, ph, build)
        if img is not None:
            found["img_size"] = img
    return {k: v for k, v in found.items() if k in want}


# ---------------------------------------------------------------------------------------------
# Loading


def _arch_hints(state: dict[str, torch.Tensor], model: nn.Module, family: str) -> str:
    """What to pass when the checkpoint's depth / width differ from the model's."""
    mine = model.state_dict()
    hints = []
    pattern = r"blocks\.(\d+)\." if family == "vit" else r"layers\.(\d+)\.blocks\.(\d+)\."

    def depth(keys) -> tuple[int, ...]:
        seen: dict[int, int] = {}
        for k in keys:
            m = re.match(pattern, k)
            if m:
                stage, block = (0, int(m.group(1))) if family == "vit" else map(int, m.groups())
                seen[stage] = max(seen.get(stage, -1), block)
        return tuple(seen[s] + 1 for s in sorted(seen))

    theirs, ours = depth(state), depth(mine)
    if theirs and theirs != ours:
        hints.append(f"depth={theirs[0]}" if family == "vit" else f"depths={','.join(map(str, theirs))}")
    proj, my_proj = state.get("patch_embed.proj.weight"), mine.get("patch_embed.proj.weight")
    if proj is not None and my_proj is not None and proj.shape[0] != my_proj.shape[0]:
        hints.append(f"embed_dim={proj.shape[0]}")
    return f", e.g. --model-kwargs {' '.join(hints)}" if hints else ""


def load_into(
    model: nn.Module,
    ckpt: Checkpoint,
    family: str,
    what: str,
    *,
    resample: bool = False,
    resample_patch: bool = False,
) -> None:
    """Load ``ckpt`` into ``model`` strictly, through the family's timm ``checkpoint_filter_fn``.

    timm's filters resample a different position-embedding grid / Swin window table / patch kernel
    silently. That is only right when asked for: ``resample`` (an explicit ``img_size``) and
    ``resample_patch`` (an explicit ``patch_size``); otherwise a mismatch is a one-line error.
    """
    raw = ckpt.state
    said = f" (it says {ckpt.arch!r})" if ckpt.arch and ckpt.arch != what else ""
    fix = f"Pass the --model{said} and --model-kwargs the checkpoint was trained with"
    if family == "vit":
        from timm.models.vision_transformer import checkpoint_filter_fn
    else:
        from timm.models.swin_transformer import checkpoint_filter_fn
    mine = model.state_dict()
    try:  # timm's conversions (foreign layouts, old Swin) and resampling
        state = checkpoint_filter_fn(dict(raw), model)
    except (RuntimeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise UserInputError(
            f"checkpoint {ckpt.path} does not fit {what}: {_first_line(exc)}. {fix}"
        ) from None
    fitting = [k for k in state if k in mine]
    if len(fitting) < len(state) / 2:  # another architecture altogether: say so, not a shape detail
        strangers = [k for k in state if k not in mine][:2]
        raise UserInputError(
            f"checkpoint {ckpt.path} does not fit {what}: only {len(fitting)} of its {len(state)} "
            f"tensors have a place in it (e.g. not {strangers}). {fix}"
        )
    proj, my_proj = raw.get("patch_embed.proj.weight"), mine.get("patch_embed.proj.weight")
    if (
        not resample_patch
        and proj is not None
        and my_proj is not None
        and proj.ndim == 4
        and proj.shape[-2:] != my_proj.shape[-2:]
    ):
        raise UserInputError(
            f"checkpoint {ckpt.path} has {tuple(proj.shape[-2:])} patches, {what} "
            f"{tuple(my_proj.shape[-2:])}: pass --model-kwargs patch_size={proj.shape[-1]} (or the "
            "--model it was trained with)"
        )
    if family == "vit":
        pos, my_pos = raw.get("pos_embed"), mine.get("pos_embed")
        if not resample and pos is not None and my_pos is not None and pos.shape[1] != my_pos.shape[1]:
            raise UserInputError(
                f"checkpoint {ckpt.path} has {pos.shape[1]} position embeddings, {what} "
                f"{my_pos.shape[1]}: pass --img-size (the size it was trained at) or the "
                "--model-kwargs it was trained with"
            )
    else:
        tables, my_tables = _swin_tables(raw), _swin_tables(mine)
        if not resample and any(my_tables.get(k, s) != s for k, s in tables.items()):
            raise UserInputError(
                f"checkpoint {ckpt.path}'s attention windows do not fit {what} at its image size: "
                "pass --img-size (the size it was trained at)"
            )
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        line = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), _first_line(exc))
        raise UserInputError(
            f"checkpoint {ckpt.path} does not fit {what}: {line[:200]}. {fix}"
            f"{_arch_hints(state, model, family)}"
        ) from None
    if missing or unexpected:
        raise UserInputError(
            f"checkpoint {ckpt.path} does not fit {what}: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}). {fix}"
            f"{_arch_hints(state, model, family)}"
        )
