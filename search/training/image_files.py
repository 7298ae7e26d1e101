"""Images a person brings to a trained model (`search.predict`): a folder of PNG/JPEG files, one
picture, an idx file (Fashion-MNIST's format) or a CIFAR batch file, read into the uint8
(N, C, H, W) tensor a `search.training.classifier.Classifier` takes.

Pictures are converted to the model's channels (grey or RGB), never resized: a model trained on
32x32 images says nothing useful about a 640x480 photo squeezed down, so a wrong size is refused
with the size the model needs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from search.config.errors import SearchError
from search.training.images import read_idx

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
IDX_MAGIC_3D = bytes([0, 0, 0x08, 3])  # unsigned bytes, 3 dimensions: (N, H, W) images


def read_images(path: str | Path, *, channels: int, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """The images at `path` and a name for each (a file name, or `file[i]` inside a file).

    Raises:
        SearchError: no such path, a folder without pictures, a file that is no image, or images
            whose size or channels the model cannot take.
    """
    path = Path(path)
    if not path.exists():
        raise SearchError(f"images={path}: no such file or folder.")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in PICTURE_SUFFIXES)
        if not files:
            raise SearchError(f"images={path}: the folder has no pictures "
                              f"({', '.join(PICTURE_SUFFIXES)}).")
        images = [_read_picture(p, channels, image_size) for p in files]
        return torch.stack(images), [p.name for p in files]
    if path.suffix.lower() in PICTURE_SUFFIXES:
        return _read_picture(path, channels, image_size).unsqueeze(0), [path.name]
    images = _read_array_file(path)
    found = tuple(images.shape[1:])
    if found != (channels, image_size, image_size):
        raise SearchError(f"images={path}: holds images of {_shape(found)}; this model takes "
                          f"{_shape((channels, image_size, image_size))}.")
    return images, [f"{path.name}[{i}]" for i in range(len(images))]


def _shape(chw: tuple[int, ...]) -> str:
    return f"{chw[1]}x{chw[2]} pixels with {chw[0]} channel(s)"


def _read_picture(path: Path, channels: int, image_size: int) -> torch.Tensor:
    from PIL import (  # Pillow comes with torchvision and matplotlib
        Image,
        UnidentifiedImageError,
    )

    try:
        with Image.open(path) as picture:
            picture = picture.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise SearchError(f"images={path}: not a readable image ({error}).") from None
    if picture.size != (image_size, image_size):
        width, height = picture.size
        raise SearchError(f"images={path}: the picture is {width}x{height} pixels; this model "
                          f"takes {image_size}x{image_size} (resize or crop it first).")
    array = np.array(picture, dtype=np.uint8)  # a copy: tensors need writable memory
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def _read_array_file(path: Path) -> torch.Tensor:
    """An idx file of images (N, H, W) or a CIFAR batch (a pickled dict with b"data")."""
    with path.open("rb") as file:
        head = file.read(4)
    if head == IDX_MAGIC_3D or path.suffix == ".gz":
        return torch.from_numpy(read_idx(path, ndim=3)).unsqueeze(1)
    try:
        with path.open("rb") as file:
            batch = pickle.load(file, encoding="bytes")
        rows = np.asarray(batch[b"data"], dtype=np.uint8)
        # CIFAR: each row is the R plane, then G, then B, each 32x32 row-major: exactly NCHW.
        return torch.from_numpy(np.ascontiguousarray(rows.reshape(-1, 3, 32, 32)))
    except Exception:  # noqa: BLE001 - whatever the file is, it is none of the formats
        raise SearchError(f"images={path}: not a picture ({', '.join(PICTURE_SUFFIXES)}), an idx "
                          "file of images, or a CIFAR batch file.") from None
