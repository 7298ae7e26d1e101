"""Tests for search.training.augment: crop/flip semantics and the on-device batch loader."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from search.config.errors import SearchError
from search.training.augment import BatchLoader, random_crop, random_flip
from search.training.images import ImageSet

MEAN = (0.4, 0.5, 0.6)
STD = (0.2, 0.25, 0.3)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _distinct_images(batch: int, channels: int = 2, size: int = 8) -> torch.Tensor:
    """Floats where every pixel is different and none is 0, so padding is recognisable."""
    count = batch * channels * size * size
    return torch.arange(1, count + 1, dtype=torch.float32).view(batch, channels, size, size)


def _numbered(n: int, size: int = 8) -> ImageSet:
    """Example i has label i; its pixels are random but fixed."""
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=_generator(7))
    return ImageSet(images, torch.arange(n))


def _epoch(loader: BatchLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


# ----------------------------------------------------------------------------------------------
# random_crop / random_flip
# ----------------------------------------------------------------------------------------------


def test_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    padding, size = 4, 8
    images = _distinct_images(300, size=size)
    out = random_crop(images, padding, _generator())
    assert out.shape == images.shape
    padded = F.pad(images, (padding,) * 4)
    shifts_seen = set()
    for image, cropped in zip(padded, out):
        matches = [
            (dy, dx)
            for dy in range(-padding, padding + 1)
            for dx in range(-padding, padding + 1)
            if torch.equal(
                cropped,
                image[:, padding + dy : padding + dy + size, padding + dx : padding + dx + size],
            )
        ]
        assert len(matches) == 1, "every output must be exactly one shifted window"
        shifts_seen.add(matches[0])
    # Offsets are uniform over the whole range, extremes included.
    assert {dy for dy, _ in shifts_seen} == set(range(-padding, padding + 1))
    assert {dx for _, dx in shifts_seen} == set(range(-padding, padding + 1))


def test_crop_on_uint8_equals_crop_on_unit_floats() -> None:
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=_generator(1))
    as_uint8 = random_crop(images, 2, _generator(5))
    as_float = random_crop(images.float() / 255, 2, _generator(5))
    assert as_uint8.dtype == torch.uint8
    torch.testing.assert_close(as_uint8.float() / 255, as_float)


def test_crop_without_padding_is_identity() -> None:
    images = _distinct_images(4)
    assert torch.equal(random_crop(images, 0, _generator()), images)


def test_flip_is_mirror_or_identity_per_image() -> None:
    images = _distinct_images(400)
    out = random_flip(images, _generator())
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images)])
    unchanged = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert bool((mirrored ^ unchanged).all())
    assert 0.4 < mirrored.float().mean().item() < 0.6
    assert torch.equal(random_flip(images, _generator(), p=0.0), images)
    assert torch.equal(random_flip(images, _generator(), p=1.0), images.flip(-1))


# ----------------------------------------------------------------------------------------------
# BatchLoader
# ----------------------------------------------------------------------------------------------


def test_normalisation_matches_reference() -> None:
    data = _numbered(10)
    loader = BatchLoader(data, batch_size=4, device="cpu", mean=MEAN, std=STD)
    images = torch.cat([batch for batch, _ in loader])
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    expected = (data.images.float() / 255 - mean) / std
    assert images.dtype == torch.float32
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)


def test_same_seed_same_batches_new_epoch_new_batches() -> None:
    data = _numbered(50)

    def loader(seed: int) -> BatchLoader:
        return BatchLoader(
            data, batch_size=16, device="cpu", mean=MEAN, std=STD, augment=True, shuffle=True,
            seed=seed,
        )

    first, second = loader(0), loader(0)
    epoch0 = _epoch(first)
    torch.manual_seed(4321)  # The global RNG must not matter.
    for (a, la), (b, lb) in zip(epoch0, _epoch(second), strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    epoch1 = _epoch(first)
    assert first.epoch == 2
    assert not torch.equal(epoch0[0][1], epoch1[0][1])  # A new permutation.
    other_seed = _epoch(loader(1))
    assert not torch.equal(epoch0[0][1], other_seed[0][1])


def test_augmentation_changes_per_epoch_without_shuffle() -> None:
    loader = BatchLoader(
        _numbered(8), batch_size=8, device="cpu", mean=MEAN, std=STD, augment=True
    )
    (a, la), (b, lb) = next(iter(loader)), next(iter(loader))
    assert torch.equal(la, torch.arange(8)) and torch.equal(lb, torch.arange(8))
    assert not torch.equal(a, b)


def test_every_example_once_per_epoch() -> None:
    loader = BatchLoader(
        _numbered(103), batch_size=10, device="cpu", mean=MEAN, std=STD, augment=True,
        shuffle=True,
    )
    assert len(loader) == 11 and loader.num_examples == 103
    for _ in range(2):
        batches = _epoch(loader)
        assert len(batches) == 11
        assert [len(labels) for _, labels in batches] == [10] * 10 + [3]
        labels = torch.cat([labels for _, labels in batches])
        assert labels.dtype == torch.int64
        assert sorted(labels.tolist()) == list(range(103))


def test_drop_last() -> None:
    loader = BatchLoader(
        _numbered(103), batch_size=10, device="cpu", mean=MEAN, std=STD, shuffle=True,
        drop_last=True,
    )
    assert len(loader) == 10
    batches = _epoch(loader)
    assert [len(images) for images, _ in batches] == [10] * 10
    assert len(set(torch.cat([labels for _, labels in batches]).tolist())) == 100
    with pytest.raises(SearchError, match="drop_last"):
        BatchLoader(_numbered(5), batch_size=10, device="cpu", mean=MEAN, std=STD, drop_last=True)


def test_channels_last_and_dtype() -> None:
    loader = BatchLoader(
        _numbered(6), batch_size=4, device="cpu", mean=MEAN, std=STD, augment=True,
        channels_last=True, dtype=torch.bfloat16,
    )
    for images, _ in loader:
        assert images.dtype == torch.bfloat16
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert images.device.type == "cpu"


def test_bad_arguments() -> None:
    with pytest.raises(SearchError, match="batch_size"):
        BatchLoader(_numbered(5), batch_size=0, device="cpu", mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="channel"):
        BatchLoader(_numbered(5), batch_size=2, device="cpu", mean=(0.5,), std=(0.2,))
