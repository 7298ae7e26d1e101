"""Batches that are cut, augmented and normalised on the training device.

The airbench recipe: the whole split goes to the device once, as uint8, and every epoch is
made from it with a few tensor operations per batch (a gather for random crops, a
`torch.where` for flips, one multiply-add to normalise). There is no PIL, no DataLoader
worker and no host synchronisation per batch, so on a GPU data preparation costs almost
nothing, and on a 2-core CPU it stays small next to the forward and backward passes.

Example:
    >>> from search.data import DATASETS, load_split
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

from search.data import ImageSet
from search.errors import SearchError

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
        # Moved once; every batch is then cut from device memory.
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        # (x / 255 - mean) / std folded into one multiply-add: x * scale + shift.
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t

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
            if order is None:
                images, labels = self.images[start:stop], self.labels[start:stop]
            else:
                index = order[start:stop]
                images, labels = self.images[index], self.labels[index]
            yield self._prepare(images, generator), labels

    def _prepare(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.augment:
            # Cropping and flipping the uint8 batch gives exactly what doing it on floats in
            # [0, 1] would (padding 0 is black in both) while moving 4x fewer bytes.
            images = random_crop(images, self.crop_padding, generator)
            images = random_flip(images, generator)
        # Normalise in float32 even for half dtypes, then cast and lay out in one copy.
        images = images.to(torch.float32).mul_(self._scale).add_(self._shift)
        return images.to(dtype=self.dtype, memory_format=self.memory_format)
