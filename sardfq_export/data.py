"""Real labelled image data: IDX files (Fashion-MNIST from Debian) and ImageNet-style folders.

A dataset lists what it will read up front (file paths, or the IDX arrays, which are small) and
decodes an image only when it is asked for it, so memory is bounded by the batch, not the dataset;
``limit`` selects images before anything is decoded. Batches come from a ``torch`` DataLoader
(worker processes for folders).

Every image gets exactly timm's eval transform for the model's data config
(``timm.data.create_transform(**data_config, is_training=False)``: resize, centre crop, to
tensor, normalize), applied to a PIL image in the model's channel mode:

- a 1-channel model takes 'L' (RGB → luma, ITU-R 601-2, PIL's conversion), a 3-channel model
  'RGB' (grayscale replicated);
- 16-bit images ('I;16*', and 'I' taken as 0..65535) are rounded to 8 bits, v8 = round(v16·255/65535):
  the rest is then timm's transform on the same 8-bit image timm would see from an 8-bit export
  (error ≤ 0.5/255; timm's ToTensor does not scale 16-bit images at all). Float images ('F') are
  taken as 0..1 and rounded the same way;
- alpha (RGBA, LA, palette with transparency) is composited over white, what an image viewer
  shows (timm's own loader drops alpha, which only differs under transparent pixels);
- IDX images (uint8 grayscale) take the same path, so both sources match.

Overrides as in timm's validate.py (interpolation, crop_pct, crop_mode, mean, std) go through
:func:`data_config_with` and are kept in the config (``"overrides"``) and on the dataset.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from sardfq_export.core.errors import UserInputError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_TRAIN_DIRS, _TEST_DIRS = ("train", "training"), ("val", "test", "validation")
# What timm's validate.py lets a user override, and the values timm's transforms accept.
OVERRIDABLE = ("interpolation", "crop_pct", "crop_mode", "mean", "std")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")
_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


# --------------------------------------------------------------------------- IDX files
def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise UserInputError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserInputError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)) * dtype.itemsize:
        raise UserInputError(f"{path} is truncated or corrupt (size does not match its header)")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(tuple(dims))


def find_fashion_mnist(root: Path = FASHION_MNIST_DIR) -> Path:
    """The folder holding the Debian package's Fashion-MNIST IDX files, or a clear error."""
    if not (root / "t10k-images-idx3-ubyte.gz").exists():
        raise UserInputError(
            f"Fashion-MNIST not found in {root}: install it with "
            "'sudo apt-get install dataset-fashion-mnist' or pass --data DIR"
        )
    return root


def _idx_files(folder: Path, split: str) -> tuple[Path, Path] | None:
    prefix = "t10k" if split == "test" else "train"
    for suffix in (".gz", ""):
        img = folder / f"{prefix}-images-idx3-ubyte{suffix}"
        lab = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
        if img.exists() and lab.exists():
            return img, lab
    return None


def _has_idx(folder: Path) -> bool:
    return any(folder.glob("*-images-idx3-ubyte*"))


def _read_idx_pair(folder: Path, img: Path, lab: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    images, labels = read_idx(img), read_idx(lab)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserInputError(f"{img} and {lab} do not hold matching images and labels")
    if images.dtype != np.uint8:
        raise UserInputError(f"{img} holds {images.dtype} pixels; image IDX files hold uint8")
    classes = tuple(str(c) for c in range(int(labels.max()) + 1))
    if "fashion" in str(folder).lower() and len(classes) == 10:
        classes = FASHION_MNIST_CLASSES
    return images[..., None], labels.astype(np.int64), classes


# --------------------------------------------------------------------------- image folders
class _PathTable:
    """File paths packed into one byte buffer: forked DataLoader workers reading a Python list of
    a million strings would touch (and so copy) every object's refcount page."""

    def __init__(self, root: Path, relative: Sequence[str]):
        encoded = [os.fsencode(p) for p in relative]
        self.root = str(root)
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        rel = self._buf[self._offsets[i] : self._offsets[i + 1]].tobytes()
        return os.path.join(self.root, os.fsdecode(rel))


def _list_folder(folder: Path) -> tuple[_PathTable, np.ndarray, tuple[str, ...]] | None:
    """Class sub-folders → (paths, labels, class names), listing names only (no file is opened).

    Hidden files (``.*``, e.g. macOS ``._x.jpg`` resource forks) are skipped."""
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        return None
    relative: list[str] = []
    labels: list[int] = []
    for label, cdir in enumerate(class_dirs):
        found = []
        for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = os.path.relpath(dirpath, folder)
            found += [
                os.path.join(rel_dir, f)
                for f in filenames
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES
            ]
        found.sort()
        relative += found
        labels += [label] * len(found)
    if not relative:
        return None
    return _PathTable(folder, relative), np.asarray(labels, dtype=np.int64), tuple(p.name for p in class_dirs)


def _split_folder(folder: Path, split: str) -> Path:
    """The sub-tree of an image folder that holds ``split``.

    A folder with ``train/`` and ``val/`` (or ``test/``) sub-folders uses those; a plain class-folder
    root is the test split only (calibrating on it would leak test images), unless it is itself
    named ``train``."""
    named = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    train = next((named[n] for n in _TRAIN_DIRS if n in named), None)
    test = next((named[n] for n in _TEST_DIRS if n in named), None)
    if split == "train":
        if train is not None:
            return train
        if folder.name.lower() in _TRAIN_DIRS:
            return folder
        raise UserInputError(
            f"{folder} has no train/ split: calibrating on it would use test images; "
            "pass real:TRAIN_DIR (a folder named train/, or one holding train/ and val/)"
        )
    if test is not None:
        return test
    if train is not None:
        raise UserInputError(
            f"{folder} has a train/ split but no val/ or test/ one: pass the test folder itself"
        )
    return folder


def _resolve_folder(spec: str | Path) -> Path:
    if str(spec) == "fashion-mnist":
        return find_fashion_mnist()
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise UserInputError(
            f"data folder {folder} does not exist: pass an ImageNet-style folder "
            "(one sub-folder per class), a folder of IDX files, or 'fashion-mnist'"
        )
    return folder


def _no_images(folder: Path) -> UserInputError:
    return UserInputError(
        f"no images found in {folder}: expected class sub-folders of images "
        "(ImageNet layout) or IDX files (*-images-idx3-ubyte[.gz])"
    )


# --------------------------------------------------------------------------- decoding, channels
def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _over_white(im):
    from PIL import Image

    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_model_mode(im, in_chans: int):
    """A PIL image of any mode → 'L' (``in_chans`` 1) or 'RGB' (3), as the module docstring says."""
    from PIL import Image

    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im)
        if mode == "F":
            a = np.rint(np.clip(np.nan_to_num(a.astype(np.float64)), 0.0, 1.0) * 255.0)
        else:
            a = (np.clip(a.astype(np.int64), 0, 65535) * 255 + 32767) // 65535
        im = Image.fromarray(a.astype(np.uint8), "L")
    elif (mode == "P" and "transparency" in im.info) or mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        im = _over_white(im)
    if in_chans == 1:
        return im if im.mode == "L" else im.convert("L")
    return im if im.mode == "RGB" else im.convert("RGB")


def open_image(path: str | Path, in_chans: int = 3):
    """Decode one image file into the model's mode; an unreadable file → one line naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return to_model_mode(im, in_chans)
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as exc:
        raise UserInputError(f"cannot read image {path}: {_one_line(exc)}") from None


def _array_image(a: np.ndarray, in_chans: int):
    """(H, W[, C]) uint8 → PIL image in the model's mode."""
    from PIL import Image

    a = np.ascontiguousarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        im = Image.fromarray(a, "L")
    elif a.shape[2] in (3, 4):
        im = Image.fromarray(a, "RGB" if a.shape[2] == 3 else "RGBA")
    else:
        raise UserInputError(f"images of shape {a.shape}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    return to_model_mode(im, in_chans)


def _in_chans(data_config: dict) -> int:
    c = int(data_config["input_size"][0])
    if c not in (1, 3):
        raise UserInputError(
            f"the model takes {c} input channels: only 1 (grayscale) or 3 (RGB) images are supported"
        )
    return c


# --------------------------------------------------------------------------- preprocessing
def data_config_with(data_config: dict, **overrides) -> dict:
    """``data_config`` with timm validate.py-style overrides (``None`` = keep the model's value).

    Accepts ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean`` and ``std`` (one value for
    every channel, one per channel, or a comma-separated string); the applied overrides are kept
    under ``"overrides"`` so datasets and reports can show them."""
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise TypeError(f"data_config_with() got unknown overrides {unknown}; use {OVERRIDABLE}")
    cfg = dict(data_config)
    applied = dict(cfg.get("overrides") or {})
    in_chans = int(cfg["input_size"][0])
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "interpolation":
            value = str(value).lower()
            if value not in INTERPOLATIONS:
                raise UserInputError(f"interpolation {value!r}: use one of {', '.join(INTERPOLATIONS)}")
        elif key == "crop_mode":
            value = str(value).lower()
            if value not in CROP_MODES:
                raise UserInputError(f"crop_mode {value!r}: use one of {', '.join(CROP_MODES)}")
        elif key == "crop_pct":
            value = _floats(key, value, 1)[0]
            if not 0.0 < value <= 1.0:
                raise UserInputError(f"crop_pct {value}: use a fraction in (0, 1] (e.g. 0.875, 1.0)")
        else:
            value = _floats(key, value, in_chans)
            if key == "std" and min(value) <= 0:
                raise UserInputError(f"std {value}: every value must be > 0")
        cfg[key] = value
        applied[key] = value
    if applied:
        cfg["overrides"] = applied
    return cfg


def _floats(key: str, value, n: int) -> tuple[float, ...]:
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    items = list(items) if isinstance(items, (list, tuple)) else [items]
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise UserInputError(f"{key} {value!r}: expected numbers") from None
    if len(out) == 1 and n > 1:
        out = out * n
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise UserInputError(
            f"{key} {value!r}: expected 1 or {n} finite numbers (the model takes {n} channels)"
        )
    return out


def eval_transform(data_config: dict) -> Callable:
    """timm's eval transform for ``data_config`` (PIL image in the model's mode → normalized tensor)."""
    from timm.data import create_transform

    kwargs = {k: data_config[k] for k in _TRANSFORM_KEYS if data_config.get(k) is not None}
    kwargs["input_size"] = tuple(kwargs["input_size"])
    return create_transform(**kwargs, is_training=False)


def preprocess(images: np.ndarray, data_config: dict) -> torch.Tensor:
    """uint8 (N, H, W, C) (or an object array of (H, W, C) images) → float (N, C', H', W'), each
    image through the same path as a dataset's (model mode, then timm's eval transform)."""
    in_chans, transform = _in_chans(data_config), eval_transform(data_config)
    with _one_thread():
        return torch.stack([transform(_array_image(a, in_chans)) for a in images])


def describe_conversion(kind: str, in_chans: int) -> str:
    """What happens to an image's channels/depth before the transform, for reports."""
    if kind == "idx":
        return "none (grayscale)" if in_chans == 1 else "grayscale → RGB (replicated)"
    common = "alpha over white, 16-bit rounded to 8-bit"
    if in_chans == 1:
        return f"to grayscale: RGB → L (ITU-R 601-2 luma), {common}"
    return f"to RGB: grayscale replicated, {common}"


# --------------------------------------------------------------------------- raw access (compat)
@dataclass(frozen=True)
class RawImages:
    """Raw uint8 images (N, H, W, C) with integer labels, before any model preprocessing."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.labels)


def load_raw(spec: str | Path, split: str = "test") -> RawImages:
    """``--data`` → all of a split's raw images in memory (IDX arrays; folders decoded to RGB, a
    ragged object array when sizes differ). For small data only: evaluation streams through
    :func:`load_dataset`."""
    ds = load_dataset(spec, {"input_size": (3, 1, 1)}, split)
    if ds._images is not None:
        return RawImages(ds._images, ds._labels, ds.classes, ds.name)
    arrays = [np.asarray(open_image(ds._paths[i], 3)) for i in range(len(ds._paths))]
    same = len({a.shape for a in arrays}) == 1
    images = np.stack(arrays) if same else np.empty(len(arrays), dtype=object)
    if not same:
        for i, a in enumerate(arrays):
            images[i] = a
    return RawImages(images, ds._labels, ds.classes, ds.name)


# --------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class _Unreadable:
    """Stands in for a sample that failed to decode, so the one-line message reaches the main
    process intact (a DataLoader worker's exception comes back wrapped in its traceback)."""

    message: str


class _Batches(Dataset):
    """What a DataLoader reads: whole batches at once (``__getitems__``, one output tensor filled in
    place, in shared memory inside a worker), a decode failure as ``_Unreadable``."""

    def __init__(self, dataset: LabelledDataset, indices: np.ndarray | None = None):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.dataset) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, positions: list[int]):
        if self.indices is not None:
            positions = [int(self.indices[p]) for p in positions]
        try:
            return self.dataset.batch(positions)
        except UserInputError as exc:
            return _Unreadable(str(exc))


@contextmanager
def _one_thread():
    """Per-image tensor ops (ToTensor, Normalize on one image) in one thread: intra-op threads only
    add overhead on tensors this small, 10-30x on a busy machine. DataLoader workers already run
    single-threaded; in the main process the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    if threads == 1 or get_worker_info() is not None:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _as_is(batch):
    return batch


class _Loader(DataLoader):
    """A DataLoader whose unreadable samples raise one-line ``UserInputError`` in the main process."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, _Unreadable):
                raise UserInputError(batch.message)
            yield batch


def default_workers(dataset: LabelledDataset, batch_size: int, n: int | None = None) -> int:
    """0 for in-memory IDX arrays; for folders up to 4 (CPU count, number of batches of ``n``)."""
    if dataset._images is not None:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = len(dataset) if n is None else n
    return max(0, min(4, cpus, math.ceil(n / batch_size)))


def _limit_index(total: int, limit: int | None, spread: bool) -> np.ndarray:
    """Positions kept by ``limit``: the first N of IDX files (already shuffled by their authors),
    N evenly spaced over a folder's sorted list (its first N would all be of the first class)."""
    if limit is None or limit >= total:
        return np.arange(total, dtype=np.int64)
    if limit < 1:
        raise UserInputError(f"limit {limit}: use at least 1 image")
    if not spread:
        return np.arange(limit, dtype=np.int64)
    return (np.arange(limit, dtype=np.int64) * total) // limit


class LabelledDataset(Dataset):
    """Real labelled images, decoded one at a time, with the model's preprocessing.

    ``dataset[i]`` → (C, H, W) float tensor, int label; :meth:`loader`/:meth:`batches` stream
    batches; :meth:`take` returns chosen images as one tensor. ``conversion`` and ``preprocessing``
    say what was done to the images (for reports)."""

    def __init__(
        self,
        *,
        labels: np.ndarray,
        classes: tuple[str, ...],
        name: str,
        data_config: dict,
        images: np.ndarray | None = None,
        paths: _PathTable | None = None,
        split: str = "test",
        limit: int | None = None,
    ):
        if (images is None) == (paths is None):
            raise ValueError("pass exactly one of images (in-memory arrays) or paths (files)")
        self._images, self._paths, self._labels = images, paths, labels
        self.classes, self.name, self.split = classes, name, split
        self.data_config = dict(data_config)
        self.in_chans = _in_chans(self.data_config)
        self._transform = eval_transform(self.data_config)
        self._index = _limit_index(len(labels), limit, spread=paths is not None)
        self.conversion = describe_conversion("idx" if images is not None else "folder", self.in_chans)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def n(self) -> int:
        return len(self)

    @property
    def overrides(self) -> dict:
        """The data-config overrides applied (``data_config_with``), empty when none."""
        return dict(self.data_config.get("overrides") or {})

    @property
    def preprocessing(self) -> dict:
        """The effective preprocessing, JSON-ready, for reports."""
        cfg = self.data_config
        out = {k: (list(cfg[k]) if isinstance(cfg.get(k), tuple) else cfg.get(k)) for k in _TRANSFORM_KEYS}
        return {**out, "conversion": self.conversion, "overrides": self.overrides}

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self._labels[self._index])

    def path(self, i: int) -> str | None:
        """The file behind item ``i`` (None for IDX data)."""
        return None if self._paths is None else self._paths[int(self._index[i])]

    def image(self, i: int):
        """Item ``i`` decoded as a PIL image in the model's mode, before the transform."""
        j = int(self._index[i])
        if self._images is not None:
            return _array_image(self._images[j], self.in_chans)
        return open_image(self._paths[j], self.in_chans)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._transform(self.image(i)), int(self._labels[self._index[i]])

    def limited(self, limit: int | None) -> LabelledDataset:
        """The same dataset cut to ``limit`` images (the rule of ``load_dataset``'s ``limit``)."""
        if limit is None or limit >= len(self):
            return self
        out = object.__new__(LabelledDataset)
        out.__dict__.update(self.__dict__)
        out._index = self._index[_limit_index(len(self), limit, spread=self._paths is not None)]
        return out

    def batch(self, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Items at ``positions`` as one (images, labels) batch; only they are decoded."""
        out = torch.empty(len(positions), *self.data_config["input_size"])
        if get_worker_info() is not None:  # what a worker sends back: shared, not copied on pickling
            out.share_memory_()
        with _one_thread():
            for k, i in enumerate(positions):
                out[k] = self._transform(self.image(i))
        labels = self._labels[self._index[np.asarray(positions, dtype=np.int64)]]
        return out, torch.from_numpy(labels)

    def loader(self, batch_size: int = 256, num_workers: int | None = None, indices=None) -> DataLoader:
        """A DataLoader of (images, labels) batches in order (``indices``: only those items).

        An unreadable image raises a one-line ``UserInputError`` naming its file in the process
        that iterates, also when a worker decoded it."""
        data = _Batches(self, None if indices is None else np.asarray(indices, dtype=np.int64))
        if num_workers is None:
            num_workers = default_workers(self, batch_size, len(data))
        return _Loader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_as_is)

    def batches(
        self, batch_size: int = 256, num_workers: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) batches in order."""
        yield from self.loader(batch_size, num_workers)

    def take(
        self, indices: Sequence[int] | np.ndarray, num_workers: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels at ``indices`` (positions in this dataset), preprocessed; only those
        images are decoded."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a dataset of {len(self)} images")
        idx = idx % max(len(self), 1)
        images = torch.empty(len(idx), *self.data_config["input_size"])
        labels = torch.empty(len(idx), dtype=torch.long)
        done = 0
        for x, y in self.loader(256, num_workers, indices=idx):
            images[done : done + len(y)], labels[done : done + len(y)] = x, y
            done += len(y)
        return images, labels


def split_source(spec: str | Path, split: str) -> Path:
    """What ``load_dataset(spec, ..., split=split)`` reads: the IDX image file or the image folder
    (after the train/val choice), resolved; the same errors as ``load_dataset``."""
    folder = _resolve_folder(spec)
    idx = _idx_files(folder, split)
    if idx is not None:
        return idx[0].resolve()
    return _split_folder(folder, split).resolve()


def check_disjoint(calib_spec: str | Path, data_spec: str | Path) -> tuple[Path, Path]:
    """(calibration source, evaluation source) of ``--calib real:CALIB`` and ``--data DATA``; the
    same files, or one folder inside the other, is a one-line error: calibrating on the images the
    accuracy is measured on would overstate it."""
    calib, data = split_source(calib_spec, "train"), split_source(data_spec, "test")
    if calib == data or calib in data.parents or data in calib.parents:
        raise UserInputError(
            f"--calib real:{calib_spec} would calibrate on {calib}, the images --data {data_spec} evaluates on "
            f"({data}): use a folder with train/ and val/ sub-folders (calibration takes train/, evaluation "
            "val/), or two different folders"
        )
    return calib, data


def load_dataset(
    spec: str | Path, data_config: dict, split: str = "test", limit: int | None = None
) -> LabelledDataset:
    """``--data`` spec (``fashion-mnist``, a folder of IDX files, or class sub-folders, optionally
    under ``train/`` + ``val/``) → a streaming dataset in the preprocessing of a model with
    ``data_config``. Lists file paths only; nothing is decoded until asked for.

    ``split="train"`` on a folder without a train split is refused (it would calibrate on test
    images)."""
    if split not in ("train", "test"):
        raise UserInputError(f"unknown split {split!r}: use 'train' or 'test'")
    folder = _resolve_folder(spec)
    idx = _idx_files(folder, split)
    if idx is not None:
        images, labels, classes = _read_idx_pair(folder, *idx)
        return LabelledDataset(
            images=images, labels=labels, classes=classes, name=str(idx[0]),
            data_config=data_config, split=split, limit=limit,
        )  # fmt: skip
    if _has_idx(folder):
        prefix = "t10k" if split == "test" else "train"
        raise UserInputError(
            f"{folder} has no {prefix}-images-idx3-ubyte[.gz] + {prefix}-labels-idx1-ubyte[.gz] ({split} split)"
        )
    listed = _list_folder(_split_folder(folder, split))
    if listed is None:
        raise _no_images(folder)
    paths, labels, classes = listed
    return LabelledDataset(
        paths=paths, labels=labels, classes=classes, name=paths.root,
        data_config=data_config, split=split, limit=limit,
    )  # fmt: skip
