"""Real labelled image data: IDX files (Fashion-MNIST from Debian) and ImageNet-style folders.

Every dataset yields images already transformed with the *model's* preprocessing (input size,
channels, mean/std from timm's data config), so the same loader serves any model.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


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


@dataclass(frozen=True)
class RawImages:
    """Raw uint8 images (N, H, W, C) with integer labels, before any model preprocessing."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.labels)


def _idx_split(folder: Path, split: str) -> RawImages | None:
    prefix = "t10k" if split == "test" else "train"
    for suffix in (".gz", ""):
        img = folder / f"{prefix}-images-idx3-ubyte{suffix}"
        lab = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
        if img.exists() and lab.exists():
            images, labels = read_idx(img), read_idx(lab)
            if images.ndim != 3 or len(images) != len(labels):
                raise UserInputError(f"{img} and {lab} do not hold matching images and labels")
            classes = tuple(str(c) for c in range(int(labels.max()) + 1))
            if "fashion" in str(folder).lower() and len(classes) == 10:
                classes = FASHION_MNIST_CLASSES
            return RawImages(images[..., None], labels.astype(np.int64), classes, str(img))
    return None


def _folder_split(folder: Path) -> RawImages | None:
    from PIL import Image, UnidentifiedImageError

    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        return None
    images, labels = [], []
    for label, cdir in enumerate(class_dirs):
        for f in sorted(cdir.rglob("*")):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    images.append(im.convert("RGB"))
            except (UnidentifiedImageError, OSError) as exc:
                raise UserInputError(f"cannot read image {f}: {exc}") from None
            labels.append(label)
    if not images:
        return None
    arrays = [np.asarray(im) for im in images]
    return RawImages(
        _stack_ragged(arrays),
        np.asarray(labels, dtype=np.int64),
        tuple(p.name for p in class_dirs),
        str(folder),
    )


def _stack_ragged(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Stack images; differently sized ones are kept as an object array and resized later."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def load_raw(spec: str | Path, split: str = "test") -> RawImages:
    """Resolve ``--data``: ``fashion-mnist``, a folder of IDX files, or class sub-folders.

    ``split`` picks train/test files for IDX data; a class-folder tree may hold ``train/`` and
    ``val/`` (or ``test/``) sub-trees, otherwise the folder itself is the split.
    """
    if split not in ("train", "test"):
        raise UserInputError(f"unknown split {split!r}: use 'train' or 'test'")
    if str(spec) == "fashion-mnist":
        folder = find_fashion_mnist()
    else:
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise UserInputError(
                f"data folder {folder} does not exist: pass an ImageNet-style folder "
                "(one sub-folder per class), a folder of IDX files, or 'fashion-mnist'"
            )
    found = _idx_split(folder, split)
    if found is None:
        names = ("train",) if split == "train" else ("val", "test", "validation")
        sub = next((folder / n for n in names if (folder / n).is_dir()), folder)
        found = _folder_split(sub)
    if found is None or len(found) == 0:
        raise UserInputError(
            f"no images found in {folder}: expected class sub-folders of images "
            "(ImageNet layout) or IDX files (*-images-idx3-ubyte[.gz])"
        )
    return found


def preprocess(images: np.ndarray, data_config: dict) -> torch.Tensor:
    """uint8 (N, H, W, C) → float (N, C', H', W') with the model's size, channels and mean/std.

    Resizing keeps timm's eval recipe (resize the short side to size/crop_pct, centre crop).
    """
    c_model, h_model, w_model = data_config["input_size"]
    if images.dtype == object:
        return torch.cat([preprocess(a[None], data_config) for a in images])
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] != c_model:
        if c_model == 1:
            weights = torch.tensor([0.299, 0.587, 0.114])[: x.shape[1]]
            x = (x * (weights / weights.sum()).view(1, -1, 1, 1)).sum(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, c_model, -1, -1)
        else:
            raise UserInputError(f"images have {x.shape[1]} channels, the model takes {c_model}")
    if x.shape[-2:] != (h_model, w_model):
        crop_pct = float(data_config.get("crop_pct") or 1.0)
        scale = max(h_model, w_model) / crop_pct / min(x.shape[-2:])
        size = (max(h_model, round(x.shape[-2] * scale)), max(w_model, round(x.shape[-1] * scale)))
        mode = "bicubic" if data_config.get("interpolation") == "bicubic" else "bilinear"
        x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
        top, left = (size[0] - h_model) // 2, (size[1] - w_model) // 2
        x = x[..., top : top + h_model, left : left + w_model].clamp_(0, 1)
    mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


class LabelledDataset:
    """Real labelled images with the model's preprocessing, served in batches."""

    def __init__(self, raw: RawImages, data_config: dict, limit: int | None = None):
        self.raw = raw
        self.data_config = dict(data_config)
        self.n = len(raw) if limit is None else min(limit, len(raw))

    def __len__(self) -> int:
        return self.n

    @property
    def name(self) -> str:
        return self.raw.source

    def take(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels at ``indices``, preprocessed."""
        idx = np.asarray(indices, dtype=np.int64)
        return preprocess(self.raw.images[idx], self.data_config), torch.from_numpy(self.raw.labels[idx])

    def batches(self, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) batches in order."""
        for start in range(0, self.n, batch_size):
            yield self.take(np.arange(start, min(start + batch_size, self.n)))


def load_dataset(
    spec: str | Path, data_config: dict, split: str = "test", limit: int | None = None
) -> LabelledDataset:
    """``--data`` spec → preprocessed labelled dataset for a model with ``data_config``."""
    return LabelledDataset(load_raw(spec, split), data_config, limit)
