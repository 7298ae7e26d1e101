"""Images a person brings to a trained model (`search.predict`): a folder of PNG/JPEG files, one
picture, an idx file (Fashion-MNIST's format) or a CIFAR batch file, read into the uint8
(N, C, H, W) tensor a `search.training.classifier.Classifier` takes.

Pictures are converted to the model's channels (grey or RGB), never resized: a model trained on
32x32 images says nothing useful about a 640x480 photo squeezed down, so a wrong size is refused
with the size the model needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from search.config.errors import SearchError
from search.training.file_formats import (
    cifar_images,
    idx_header,
    read_cifar_pickle,
    read_idx,
    regular_file,
)

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def read_images(path: str | Path, *, channels: int, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """The images at `path` and a name for each (a file name, or `file[i]` inside a file).

    Every refusal names the file and what the model takes, so the fix is plain.

    Raises:
        SearchError: no such path, a folder without pictures, a file that is no image (or not a
            regular file), or images whose size or channels the model cannot take.
    """
    path = Path(path)
    takes = f"; this model takes {_shape((channels, image_size, image_size))}"
    if not path.exists():
        kind = "a broken link or a link loop" if path.is_symlink() else "no such file or folder"
        raise SearchError(f"images={path}: {kind}{takes}.")
    with _saying(takes):
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in PICTURE_SUFFIXES)
            if not files:
                raise SearchError(f"images={path}: the folder has no pictures "
                                  f"({', '.join(PICTURE_SUFFIXES)}).")
            images = [_read_picture(p, channels, image_size, takes) for p in files]
            return torch.stack(images), [p.name for p in files]
        if path.suffix.lower() in PICTURE_SUFFIXES:
            return _read_picture(path, channels, image_size, takes).unsqueeze(0), [path.name]
        images = _read_array_file(path, channels, image_size)
        return images, [f"{path.name}[{i}]" for i in range(len(images))]


@contextlib.contextmanager
def _saying(takes: str) -> Iterator[None]:
    """Every refusal of an input ends by saying what the model takes (once)."""
    try:
        yield
    except SearchError as error:
        text = str(error)
        raise SearchError(text if takes in text else f"{text.removesuffix('.')}{takes}.") from None


def _shape(chw: tuple[int, ...]) -> str:
    return f"{chw[1]}x{chw[2]} pixels with {chw[0]} channel(s)"


def _read_picture(path: Path, channels: int, image_size: int, takes: str) -> torch.Tensor:
    from PIL import Image  # Pillow comes with torchvision and matplotlib

    regular_file(path, "images=")
    try:
        with Image.open(path) as picture:
            # The header's size, before a pixel is decoded: a picture that claims 20000x20000
            # is refused here, not inflated.
            if picture.size != (image_size, image_size):
                width, height = picture.size
                raise SearchError(f"images={path}: the picture is {width}x{height} pixels"
                                  f"{takes} (resize or crop it first).")
            picture = picture.convert("L" if channels == 1 else "RGB")
    except SearchError:
        raise
    except Exception as error:  # noqa: BLE001 - Pillow's decoders raise all kinds; none is ours
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SearchError(f"images={path}: not a readable image ({reason}).") from None
    array = np.array(picture, dtype=np.uint8)  # a copy: tensors need writable memory
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def _read_array_file(path: Path, channels: int, image_size: int) -> torch.Tensor:
    """An idx file of images (N, H, W) or a CIFAR batch (a pickled dict with b"data"), refused
    from its header when its images are not of the model's size."""
    regular_file(path, "images=")
    dims = idx_header(path, 3)
    if path.suffix == ".gz" or dims is not None:
        found = (1, *dims[1:]) if dims else None
        if found is not None and found != (channels, image_size, image_size):
            raise SearchError(f"images={path}: holds images of {_shape(found)}.")
        images = read_idx(path, ndim=3, item_shape=(image_size, image_size), what="images=")
        return torch.from_numpy(images).unsqueeze(1)
    with path.open("rb") as file:
        is_pickle = file.read(1) == b"\x80"  # PROTO, the first opcode of protocols 2 and later
    if not is_pickle:
        raise SearchError(f"images={path}: not a picture ({', '.join(PICTURE_SUFFIXES)}), an idx "
                          "file of images, or a CIFAR batch file.")
    images = torch.from_numpy(cifar_images(read_cifar_pickle(path, "images="), path, "images="))
    if tuple(images.shape[1:]) != (channels, image_size, image_size):
        raise SearchError(f"images={path}: holds images of {_shape(tuple(images.shape[1:]))}.")
    return images
