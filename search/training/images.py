"""Image classification data sets, loaded straight into uint8 tensors.

Every loader returns an `ImageSet`: all images of one split as a single uint8 tensor of shape
(N, C, H, W) plus int64 labels. Keeping the raw bytes (not floats, not PIL images) is what lets
`search.training.augment.BatchLoader` move a whole split to the training device once and do all
augmentation there (the airbench recipe); it also keeps CIFAR-10 at 150 MB instead of 600 MB.

The on-disk formats are parsed here with numpy instead of through torchvision's dataset
classes: that is several times faster (no per-image PIL objects) and works even where
torchvision's compiled extension does not load. torchvision is imported only to *download*
missing files.

Example:
    >>> from search.training.images import DATASETS, load_split, train_val_split
    >>> full = load_split("fake", "data", train=True)
    >>> train, val = train_val_split(full, val_size=DATASETS["fake"].val_size, seed=0)
    >>> len(train), len(val)
    (768, 256)
"""

from __future__ import annotations

import contextlib
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from search.config.datasets import DATASETS, DEFAULT_DATA_DIR, DatasetSpec
from search.config.errors import SearchError
from search.training.file_formats import cifar_images, read_cifar_pickle, read_idx

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "FASHION_MNIST_SYSTEM_DIR",
    "ImageSet",
    "SearchData",
    "load_search_data",
    "load_split",
    "train_val_split",
]


# ----------------------------------------------------------------------------------------------
# Splits in memory (the data sets themselves are described in `search.config.datasets`)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSet:
    """One split of a data set, whole, as tensors.

    Attributes:
        images: uint8 tensor of shape (N, C, H, W); the loaders here return it contiguous
            and on the CPU.
        labels: int64 tensor of shape (N,).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        # Catch mix-ups (float images, (N, H, W, C) arrays) where they are made, not deep
        # inside a training loop.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                "ImageSet.images must be a uint8 tensor of shape (N, C, H, W), got "
                f"{self.images.dtype} of shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                "ImageSet.labels must be an int64 tensor of shape (N,), got "
                f"{self.labels.dtype} of shape {tuple(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"ImageSet has {len(self.images)} images but {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)


def _dataset_names() -> str:
    return ", ".join(repr(name) for name in DATASETS)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def load_split(
    name: str, data_dir: str | Path, *, train: bool, download: bool = True
) -> ImageSet:
    """Loads the training or the test split of a data set into memory.

    Only the files of the requested split are opened, so the test split cannot leak into a
    search that only ever asks for `train=True`.

    Args:
        name: One of the keys of `DATASETS`.
        data_dir: Directory holding the data set files (see the per-data-set notes below).
        train: True for the training split (which `train_val_split` then divides), False for
            the held-out test split.
        download: For CIFAR and Fashion-MNIST, fetch missing files with torchvision first.
            Ignored by "fake".

    Returns:
        The split as uint8 images (N, C, H, W) and int64 labels.

    Raises:
        SearchError: If the name is unknown, or the files are missing (and could not be
            downloaded) or corrupt; the message says which files are expected where.

    Files looked for:
        cifar10: `data_dir/cifar-10-batches-py/data_batch_1..5` and `test_batch`.
        cifar100: `data_dir/cifar-100-python/train` and `test`.
        fashion_mnist: the four idx files (plain or .gz) in `data_dir`,
            `data_dir/fashion_mnist`, `data_dir/FashionMNIST/raw`, then, for the default
            `data_dir` only, `FASHION_MNIST_SYSTEM_DIR` (Debian's `dataset-fashion-mnist`).
        fake: nothing; 1024 training and 256 test images are generated.
    """
    if name not in DATASETS:
        raise SearchError(f"unknown dataset {name!r}; allowed: {_dataset_names()}")
    data_dir = Path(data_dir)
    if name == "cifar10":
        return _load_cifar(_CIFAR10, data_dir, train=train, download=download)
    if name == "cifar100":
        return _load_cifar(_CIFAR100, data_dir, train=train, download=download)
    if name == "fashion_mnist":
        return _load_fashion_mnist(data_dir, train=train, download=download)
    return _make_fake(train=train)


def train_val_split(data: ImageSet, *, val_size: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """Divides a training split into a training part and a validation part.

    The division is a seeded random permutation, independent of the global RNG, so that every
    trial of a study (and a later retraining) validates on exactly the same images. Both
    parts keep the original order of the examples.

    Args:
        data: Usually `load_split(..., train=True)`; never pass the test split here.
        val_size: Number of examples in the validation part, 0 < val_size < len(data).
        seed: Seed of the permutation.

    Returns:
        (train, val): disjoint, together covering `data`.

    Raises:
        SearchError: If val_size leaves either part empty.
    """
    n = len(data)
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 < val_size < n:
        raise SearchError(
            f"val_size must be an integer between 1 and {n - 1} (the training split has "
            f"{n} examples), got {val_size!r}"
        )
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(n, generator=generator)
    val_index = permutation[:val_size].sort().values
    train_index = permutation[val_size:].sort().values
    return _subset(data, train_index), _subset(data, val_index)


@dataclass(frozen=True)
class SearchData:
    """The splits a search uses: train and validation only; the test set is never loaded here."""

    spec: DatasetSpec
    train: ImageSet
    val: ImageSet


def load_search_data(name: str, data_dir: str | Path, *, val_size: int | None,
                     seed: int) -> SearchData:
    """The training split of a data set, cut into train and validation with the study seed
    (`val_size` None: the data set's default)."""
    spec = DATASETS[name]
    full = load_split(name, data_dir, train=True)
    train, val = train_val_split(full, val_size=val_size or spec.val_size, seed=seed)
    return SearchData(spec=spec, train=train, val=val)


def _subset(data: ImageSet, index: torch.Tensor) -> ImageSet:
    # index_select copies into fresh contiguous tensors, so the parts own their memory.
    return ImageSet(data.images.index_select(0, index), data.labels.index_select(0, index))


# ----------------------------------------------------------------------------------------------
# Downloading (the only place torchvision is imported)
# ----------------------------------------------------------------------------------------------


def _torchvision_download(class_name: str, root: Path, train: bool) -> None:
    """Fetches a data set with torchvision's own downloader (checks the MD5 sums).

    Raises:
        OSError, RuntimeError, ImportError: When there is no network, the archive is
            corrupt, or torchvision cannot be imported; callers turn these into SearchError.
    """
    import torchvision.datasets  # Lazily: slow to import, and only needed to download.

    getattr(torchvision.datasets, class_name)(root=str(root), train=train, download=True)


# Errors a failed download can raise: URLError/socket errors are OSErrors, torchvision raises
# RuntimeError for bad checksums, a cut-off archive raises EOFError or TarError, and a
# torchvision build that does not match torch fails at import (ImportError or RuntimeError).
# Anything else (TypeError, ...) is a bug and propagates unchanged.
_DOWNLOAD_ERRORS = (OSError, RuntimeError, ImportError, EOFError, tarfile.TarError)


def _try_download(class_name: str, root: Path, train: bool) -> str:
    """Attempts a download; returns "" on success or a description of why it failed. A failed
    download leaves no folder behind that it made (torchvision makes them before it fetches)."""
    existed = _folders(root)
    try:
        _torchvision_download(class_name, root, train)
    except _DOWNLOAD_ERRORS as error:
        for folder in sorted(_folders(root) - existed, key=lambda f: -len(f.parts)):
            with contextlib.suppress(OSError):  # only empty ones go
                folder.rmdir()
        return f"{type(error).__name__}: {error}"
    return ""


def _folders(root: Path) -> set[Path]:
    """`root` and every folder below it, and its existing ancestors, as absolute paths."""
    root = root.absolute()
    return {Path(folder) for folder, _, _ in os.walk(root)} | {p for p in root.parents if p.is_dir()}


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: pickled dicts of (N, 3072) uint8 rows, RGB planes, row-major
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarFormat:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    url: str
    torchvision_class: str


_CIFAR10 = _CifarFormat(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key=b"labels",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    torchvision_class="CIFAR10",
)
_CIFAR100 = _CifarFormat(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    label_key=b"fine_labels",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    torchvision_class="CIFAR100",
)


def _load_cifar(fmt: _CifarFormat, data_dir: Path, *, train: bool, download: bool) -> ImageSet:
    folder = data_dir / fmt.folder
    paths = [folder / f for f in (fmt.train_files if train else fmt.test_files)]
    if not all(p.is_file() for p in paths):
        failure = "download=False"
        if download:
            failure = _try_download(fmt.torchvision_class, data_dir, train)
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            archive = fmt.url.rsplit("/", 1)[1]
            raise SearchError(
                f"{fmt.name} files missing from {folder}: {', '.join(missing)}. Expected "
                f"{', '.join(fmt.train_files + fmt.test_files)} in that directory; download "
                f"{fmt.url} and extract it into {data_dir} (tar xzf {archive} -C {data_dir}). "
                f"Automatic download was not possible ({failure})."
            )
    num_classes = DATASETS[fmt.name].num_classes
    parts = [_read_cifar_batch(p, fmt.label_key, num_classes) for p in paths]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels))


def _read_cifar_batch(
    path: Path, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reads one pickled batch as (N, 3, 32, 32) uint8 images and (N,) int64 labels."""
    try:
        batch = read_cifar_pickle(path)
        images = cifar_images(batch, path)
    except SearchError as error:  # the remedy the loader's messages have always given
        raise SearchError(f"{str(error).removesuffix('.')}; delete it and extract the archive "
                          "again.") from None
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise SearchError(
            f"{path} is not a valid CIFAR batch (its {label_key.decode()} cannot be read: "
            f"{type(error).__name__}: {error}); delete it and extract the archive again"
        ) from None
    labels_in_range = len(labels) == 0 or 0 <= labels.min() <= labels.max() < num_classes
    if labels.ndim != 1 or len(labels) != len(images) or not labels_in_range:
        raise SearchError(
            f"{path} is corrupt: {len(images)} images, {len(labels)} labels, labels must lie "
            f"in 0..{num_classes - 1}; delete it and extract the archive again"
        )
    return images, labels


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST: idx files (big-endian header, then raw uint8), plain or gzip-compressed
# ----------------------------------------------------------------------------------------------

#: Where Debian's `dataset-fashion-mnist` package installs the idx files (a module constant
#: so that tests can point it elsewhere).
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_ANNOUNCED: set[Path] = set()  # system copies already named on stderr by this process

_FASHION_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _fashion_mnist_dirs(data_dir: Path) -> list[Path]:
    """Where the idx files are looked for. A data_dir a person gave is used or refused, never
    swapped for another copy: only the default `data` falls back to the system's copy."""
    # data_dir/FashionMNIST/raw is where torchvision's downloader puts the files.
    dirs = [data_dir, data_dir / "fashion_mnist", data_dir / "FashionMNIST" / "raw"]
    return dirs + [FASHION_MNIST_SYSTEM_DIR] if data_dir == DEFAULT_DATA_DIR else dirs


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_fashion_mnist(data_dir: Path, *, train: bool, download: bool) -> ImageSet:
    image_stem, label_stem = _FASHION_FILES[train]
    found = _find_fashion_mnist(data_dir, image_stem, label_stem)
    failure = "download=False"
    if found is None and download:
        failure = _try_download("FashionMNIST", data_dir, train) or "files not where expected"
        found = _find_fashion_mnist(data_dir, image_stem, label_stem)
    if found is None:
        searched = ", ".join(str(d) for d in _fashion_mnist_dirs(data_dir))
        system = ("" if data_dir == DEFAULT_DATA_DIR else
                  f" (the system's copy in {FASHION_MNIST_SYSTEM_DIR} is used only with the "
                  f"default data_dir={DEFAULT_DATA_DIR})")
        raise SearchError(
            f"fashion_mnist files {image_stem}(.gz) and {label_stem}(.gz) not found; searched "
            f"{searched}{system}. Install them with `sudo apt-get install dataset-fashion-mnist` "
            f"or put the four idx files into {data_dir}. "
            f"Automatic download was not possible ({failure})."
        )
    image_path, label_path = found
    if image_path.parent == FASHION_MNIST_SYSTEM_DIR and image_path not in _ANNOUNCED:
        _ANNOUNCED.add(image_path)
        print(f"note: fashion_mnist from {FASHION_MNIST_SYSTEM_DIR} (Debian's "
              f"dataset-fashion-mnist; there is no copy under {data_dir}/).", file=sys.stderr)
    spec = DATASETS["fashion_mnist"]
    images = read_idx(image_path, ndim=3, item_shape=(spec.image_size, spec.image_size))
    labels = read_idx(label_path, ndim=1).astype(np.int64)
    if len(images) != len(labels) or (len(labels) > 0 and labels.max() >= 10):
        raise SearchError(
            f"{image_path} and {label_path} do not match: {len(images)} images, "
            f"{len(labels)} labels (which must lie in 0..9)"
        )
    images = images[:, None, :, :]  # Add the channel axis: (N, 28, 28) -> (N, 1, 28, 28).
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))


def _find_fashion_mnist(
    data_dir: Path, image_stem: str, label_stem: str
) -> tuple[Path, Path] | None:
    # Both files must come from one directory, so a stray file cannot pair with the wrong set.
    for directory in _fashion_mnist_dirs(data_dir):
        image_path = _find_idx(directory, image_stem)
        label_path = _find_idx(directory, label_stem)
        if image_path and label_path:
            return image_path, label_path
    return None


# ----------------------------------------------------------------------------------------------
# Fake: tiny, deterministic, learnable CIFAR-shaped data for smoke tests
# ----------------------------------------------------------------------------------------------

_FAKE_SEED = 20240229
_FAKE_SIZES = {True: 1024, False: 256}


def _make_fake(*, train: bool) -> ImageSet:
    """Generates CIFAR-shaped images whose labels a small network can learn, but not at once.

    Each class has a fixed template: a colour shift plus a smooth, left-right symmetric
    pattern (symmetric and smooth so that flips and 4-pixel crops keep it recognisable). An
    image is mid-grey + its class template + a random colour cast + per-pixel noise. The colour
    alone gives a partial answer and the pattern the rest, so accuracy after a few epochs
    depends on the hyperparameters, which is what pruner smoke tests need. A private
    generator makes the data identical on every call, whatever the global RNG state.
    """
    spec = DATASETS["fake"]
    size, classes = spec.image_size, spec.num_classes
    generator = torch.Generator().manual_seed(_FAKE_SEED)
    colours = (torch.rand(classes, 3, 1, 1, generator=generator) - 0.5) * 60
    coarse = torch.randn(classes, 3, 4, 4, generator=generator)
    pattern = torch.nn.functional.interpolate(
        coarse, size=(size, size), mode="bilinear", align_corners=False
    )
    pattern = (pattern + pattern.flip(-1)) / 2
    pattern = pattern / pattern.std() * 18
    templates = colours + pattern

    # Each split has its own stream, so the test images do not depend on the training size.
    generator.manual_seed(_FAKE_SEED + (1 if train else 2))
    n = _FAKE_SIZES[train]
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=generator)]
    cast = torch.randn(n, 3, 1, 1, generator=generator) * 20
    noise = torch.randn(n, 3, size, size, generator=generator) * 35
    images = (127.5 + templates[labels] + cast + noise).round().clamp(0, 255)
    return ImageSet(images.to(torch.uint8).contiguous(), labels)
