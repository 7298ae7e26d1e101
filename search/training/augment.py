"""Batches that are cut, augmented and normalised on the training device.

The airbench recipe: the whole split goes to the device once, as uint8, and every epoch is
made from it with a few tensor operations per batch: one gather of pixels picks the batch's
images with their random crops and flips all at once (the same result as `random_crop` then
`random_flip`, which remain the reference), then one conversion and one multiply-add
normalise. There is no PIL, no DataLoader worker and no host synchronisation per batch, so on
a GPU data preparation costs almost nothing, and on a 2-core CPU it stays small next to the
forward and backward passes.

Example:
    >>> from search.training.images import DATASETS, load_split
    >>> spec = DATASETS["fake"]
    >>> loader = BatchLoader(load_split("fake", "data", train=True), batch_size=256,
    ...                      device="cpu", mean=spec.mean, std=spec.std, augment=True,
    ...                      shuffle=True, seed=0)
    >>> images, labels = next(iter(loader))
    >>> images.shape, images.dtype, labels.dtype
    (torch.Size([256, 3, 32, 32]), torch.float32, torch.int64)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from search.config.errors import SearchError
from search.training.images import ImageSet

__all__ = ["BatchLoader", "random_crop", "random_flip"]


# ----------------------------------------------------------------------------------------------
# Batch-level augmentations
# ----------------------------------------------------------------------------------------------


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Crops each image at a random offset from its zero-padded version, all at once.

    Same distribution as torchvision's `RandomCrop(size=H, padding=padding)` with constant-0
    padding: per image, a top-left corner uniform in [0, 2 * padding] in both directions of
    the padded image. Instead of a Python loop over images it gathers every output pixel from
    the padded batch through a computed flat index, which is one kernel on any device and
    needs no host synchronisation (unlike boolean-mask indexing).

    Zero padding means black only in raw pixel units (uint8, or floats in [0, 1]); apply this
    before normalising. Works for any dtype; on uint8 it moves 4x fewer bytes than on floats.

    Args:
        images: Batch of shape (B, C, H, W).
        padding: Pixels of zeros added on each side; 0 returns the batch unchanged.
        generator: Source of the offsets, on the same device as `images`.

    Returns:
        A new (B, C, H, W) tensor.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return images
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))  # Constant 0 = black.
    padded_width = width + 2 * padding
    device = images.device
    top, left = torch.randint(
        0, 2 * padding + 1, (2, batch, 1), generator=generator, device=device
    )
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    # Flat index into each padded (H + 2p) x (W + 2p) plane of the output pixel (i, j).
    index = ((top[:, :, None] + rows) * padded_width + left[:, :, None] + cols).view(batch, 1, -1)
    flat = padded.view(batch, channels, -1).gather(2, index.expand(batch, channels, -1))
    return flat.view(batch, channels, height, width)


def random_flip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirrors each image left-right with probability p (a `torch.where` over a mask).

    Args:
        images: Batch of shape (B, C, H, W), any dtype.
        generator: Source of the coin flips, on the same device as `images`.
        p: Probability that an image is mirrored.

    Returns:
        A new (B, C, H, W) tensor; each image is either unchanged or exactly mirrored.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"flip probability p must lie in [0, 1], got {p}")
    mirrored = torch.rand(len(images), generator=generator, device=images.device) < p
    return torch.where(mirrored.view(-1, 1, 1, 1), images.flip(-1), images)


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    """Mixes (seed, epoch) into one 64-bit seed, so nearby seeds give unrelated streams."""
    state = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1, dtype=np.uint64)
    return int(state[0])


class BatchLoader:
    """Yields normalised (images, labels) batches of one split, living on the device.

    Each `iter()` is a new epoch: the permutation and the augmentations are drawn from a
    generator on the device seeded from (seed, epoch index), so a run is reproducible and
    epochs differ from each other.

    Attributes:
        num_examples: Number of examples in the split (an epoch sees all of them unless
            drop_last drops the incomplete last batch).
        epoch: Number of epochs started so far; the next `iter()` uses this index.

    Args:
        data: The split; its uint8 images are copied to `device` once, here.
        batch_size: Examples per batch.
        device: Where batches are made and returned.
        mean: Per-channel mean in [0, 1] pixel units (e.g. `DatasetSpec.mean`).
        std: Per-channel standard deviation in the same units.
        augment: Apply random crops (zero padding `crop_padding`) and left-right flips; for
            training splits only.
        shuffle: Visit the examples in a new random order every epoch.
        seed: Seed of the shuffling and augmentation streams.
        channels_last: Return batches in channels-last memory format (faster convolutions
            with mixed precision on GPUs).
        drop_last: Drop the last batch when it would be smaller than batch_size, so that
            every step sees the same number of examples.
        dtype: Floating dtype of the returned images.
        crop_padding: Padding of the random crops, in pixels (4 is the CIFAR standard).
    """

    def __init__(
        self,
        data: ImageSet,
        *,
        batch_size: int,
        device: torch.device | str,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        drop_last: bool = False,
        dtype: torch.dtype = torch.float32,
        crop_padding: int = 4,
    ) -> None:
        channels = data.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"mean and std need one value per channel ({channels}), got {len(mean)} "
                f"and {len(std)}"
            )
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SearchError(f"batch_size must be a positive integer, got {batch_size!r}")
        if drop_last and batch_size > len(data):
            raise SearchError(
                f"batch_size {batch_size} is larger than the {len(data)} examples of the "
                "split, so with drop_last an epoch would have no batch at all"
            )
        if crop_padding < 0:
            raise SearchError(f"crop_padding must be >= 0, got {crop_padding}")

        self.device = torch.device(device)
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.dtype = dtype
        self.crop_padding = crop_padding
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.num_examples = len(data)
        self.epoch = 0
        # Moved once; every batch is then cut from device memory. Stored channels-last (and
        # zero-padded when augmenting) as one row of C bytes per pixel, so that a batch with
        # its crops and flips is one row gather, and converting it to a channels-last float
        # batch is a straight copy, not a transpose.
        images = data.images.to(self.device)
        self._height, self._width = images.shape[2:]
        if augment and crop_padding:
            images = F.pad(images, (crop_padding,) * 4)  # Constant 0 = black, as random_crop.
        self._padded_height, self._padded_width = images.shape[2:]
        self._pixels = images.permute(0, 2, 3, 1).reshape(-1, channels)
        self.labels = data.labels.to(self.device)
        # (x / 255 - mean) / std folded into one multiply-add: x * scale + shift. The constants
        # are tiled along a whole row of pixels (c0 c1 c2 c0 c1 c2 ...), the order of the
        # values in channels-last memory, so normalising is one long vectorised loop; a
        # (1, C, 1, 1) broadcast over channels-last data would loop over C = 3 values at a time.
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device)
        self._scale_row = (1.0 / (255.0 * std_t)).repeat(self._width)
        self._shift_row = (-mean_t / std_t).repeat(self._width)

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_epoch_seed(self.seed, self.epoch))
        self.epoch += 1
        return self._batches(generator)

    def _batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = None
        if self.shuffle:
            order = torch.randperm(self.num_examples, generator=generator, device=self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            stop = min(start + self.batch_size, self.num_examples)
            if self.augment:
                index = (torch.arange(start, stop, device=self.device) if order is None
                         else order[start:stop])
                images = self._crop_and_flip(index, generator)
            else:
                whole = self._pixels.view(self.num_examples, self._height, self._width, -1)
                images = whole[start:stop] if order is None else whole[order[start:stop]]
            labels = self.labels[start:stop] if order is None else self.labels[order[start:stop]]
            yield self._normalise(images), labels

    def _crop_and_flip(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`random_flip(random_crop(images[index]))` as one gather of pixel rows, (B, H, W, C).

        The offsets and coin flips are drawn exactly as those two functions draw them, in the
        same order, so the batches are identical; only the work differs (no padded batch, no
        mirrored copy, no `torch.where`). Cropping and flipping uint8 gives exactly what doing
        it on floats in [0, 1] would (padding 0 is black in both) while moving 4x fewer bytes.
        """
        batch, device = len(index), self.device
        rows = torch.arange(self._height, device=device).view(1, -1, 1)
        cols = torch.arange(self._width, device=device).view(1, 1, -1)
        if self.crop_padding:
            top, left = torch.randint(0, 2 * self.crop_padding + 1, (2, batch, 1, 1),
                                      generator=generator, device=device)
            rows, cols_offset = rows + top, left
        else:
            cols_offset = 0
        mirrored = torch.rand(batch, generator=generator, device=device) < 0.5
        cols = torch.where(mirrored.view(-1, 1, 1), self._width - 1 - cols, cols) + cols_offset
        # Flat pixel number in the padded split of output pixel (b, i, j).
        pixel = (index.view(-1, 1, 1) * self._padded_height + rows) * self._padded_width + cols
        return self._pixels.index_select(0, pixel.view(-1)).view(batch, self._height, self._width, -1)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) pixels -> normalised (B, C, H, W) in the loader's dtype and layout."""
        batch, height, width, channels = images.shape
        # One pass converts and normalises (in float32, even for half dtypes); the result's
        # memory is already channels-last, so (B, C, H, W) is a view, not a copy.
        rows = images.reshape(batch * height, width * channels)
        out = torch.addcmul(self._shift_row, rows, self._scale_row)
        out = out.view(batch, height, width, channels).permute(0, 3, 1, 2)
        return out.to(dtype=self.dtype, memory_format=self.memory_format)
