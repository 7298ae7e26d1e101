"""Tests for search.training.images: file formats, error messages, the validation split, fake data."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from search.config.errors import SearchError
from search.training import images as data_module
from search.training.images import DATASETS, ImageSet, load_split, train_val_split

# ----------------------------------------------------------------------------------------------
# Writers of tiny files in the real on-disk formats
# ----------------------------------------------------------------------------------------------


def _cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write_cifar_batch(path: Path, rows: np.ndarray, labels: list[int], label_key: bytes) -> None:
    # Same layout as the official python pickles (read back with encoding="bytes").
    batch = {
        b"batch_label": b"tiny batch",
        label_key: labels,
        b"data": rows,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=2)


def _write_cifar10(root: Path, per_batch: int = 4, test_size: int = 6) -> dict[str, np.ndarray]:
    """Writes data_batch_1..5 and test_batch; returns the rows and labels written."""
    folder = root / "cifar-10-batches-py"
    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows = _cifar_rows(per_batch, seed=i)
        labels = [(i + k) % 10 for k in range(per_batch)]
        _write_cifar_batch(folder / f"data_batch_{i}", rows, labels, b"labels")
        train_rows.append(rows)
        train_labels += labels
    test_rows = _cifar_rows(test_size, seed=99)
    test_labels = [k % 10 for k in range(test_size)]
    _write_cifar_batch(folder / "test_batch", test_rows, test_labels, b"labels")
    return {
        "train_rows": np.concatenate(train_rows),
        "train_labels": np.array(train_labels),
        "test_rows": test_rows,
        "test_labels": np.array(test_labels),
    }


def _write_idx(path: Path, array: np.ndarray, *, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _fashion_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, size=n, dtype=np.uint8),
    )


def _write_fashion(directory: Path, *, train: bool, n: int, compress: bool) -> tuple:
    prefix = "train" if train else "t10k"
    images, labels = _fashion_arrays(n, seed=int(train))
    _write_idx(directory / f"{prefix}-images-idx3-ubyte", images, compress=compress)
    _write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, compress=compress)
    return images, labels


@pytest.fixture(autouse=True)
def no_system_fashion_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hides the machine's own Fashion-MNIST so tests see only the files they write."""
    monkeypatch.setattr(data_module, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-dir")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Makes every download attempt fail as it would offline; records the attempts."""
    attempts: list[tuple] = []

    def fail(class_name: str, root: Path, train: bool) -> None:
        attempts.append((class_name, root, train))
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data_module, "_torchvision_download", fail)
    return attempts


# ----------------------------------------------------------------------------------------------
# Registry and ImageSet
# ----------------------------------------------------------------------------------------------


def test_dataset_registry_has_exactly_the_documented_names() -> None:
    assert set(DATASETS) == {"cifar10", "cifar100", "fashion_mnist", "fake"}
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert len(spec.mean) == len(spec.std) == spec.channels
    assert DATASETS["cifar10"].val_size == DATASETS["cifar100"].val_size == 5000
    assert DATASETS["fashion_mnist"].val_size == 5000
    assert DATASETS["fake"].val_size == 256


def test_unknown_dataset_lists_allowed_names(tmp_path: Path) -> None:
    with pytest.raises(SearchError) as error:
        load_split("imagenet", tmp_path, train=True)
    for name in DATASETS:
        assert repr(name) in str(error.value)
    assert "imagenet" in str(error.value)


def test_image_set_rejects_wrong_dtypes() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        ImageSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="labels"):
        ImageSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------------------


def test_cifar10_train_and_test_layout(tmp_path: Path) -> None:
    written = _write_cifar10(tmp_path)
    rows = written["train_rows"]
    # A known pixel: channel 1 (green), row 5, column 7 of the third image.
    rows[2, 1 * 1024 + 5 * 32 + 7] = 201
    _write_cifar_batch(
        tmp_path / "cifar-10-batches-py" / "data_batch_1",
        rows[:4],
        written["train_labels"][:4].tolist(),
        b"labels",
    )

    train = load_split("cifar10", tmp_path, train=True, download=False)
    assert train.images.shape == (20, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.images.is_contiguous()
    assert train.labels.dtype == torch.int64
    assert train.images[2, 1, 5, 7].item() == 201
    np.testing.assert_array_equal(train.images.numpy(), rows.reshape(20, 3, 32, 32))
    np.testing.assert_array_equal(train.labels.numpy(), written["train_labels"])

    test = load_split("cifar10", tmp_path, train=False, download=False)
    assert test.images.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(test.images.numpy(), written["test_rows"].reshape(6, 3, 32, 32))
    np.testing.assert_array_equal(test.labels.numpy(), written["test_labels"])


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    rows = _cifar_rows(10, seed=3)
    rows[9, 2 * 1024 + 31 * 32 + 0] = 17  # Blue, bottom-left pixel of the last image.
    fine = [99, 0, 57, 3, 12, 45, 67, 88, 1, 2]
    batch = {b"data": rows, b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]}
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "test").write_bytes(
        pickle.dumps({b"data": rows[:3], b"fine_labels": fine[:3]}, protocol=2)
    )

    train = load_split("cifar100", tmp_path, train=True, download=False)
    assert train.images.shape == (10, 3, 32, 32)
    assert train.images[9, 2, 31, 0].item() == 17
    assert train.labels.tolist() == fine
    test = load_split("cifar100", tmp_path, train=False, download=False)
    assert test.labels.tolist() == fine[:3]


def test_loading_train_never_opens_the_test_file(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    test_file = tmp_path / "cifar-10-batches-py" / "test_batch"
    test_file.write_bytes(b"this is not a pickle")
    assert len(load_split("cifar10", tmp_path, train=True, download=False)) == 20
    with pytest.raises(SearchError, match="test_batch.*extract the archive again"):
        load_split("cifar10", tmp_path, train=False, download=False)
    test_file.unlink()
    assert len(load_split("cifar10", tmp_path, train=True, download=False)) == 20


def test_cifar_missing_without_download_names_directory_and_url(
    tmp_path: Path, no_network: list
) -> None:
    with pytest.raises(SearchError) as error:
        load_split("cifar10", tmp_path, train=True, download=False)
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert no_network == []  # download=False must not even try.


def test_cifar_download_failure_becomes_search_error(tmp_path: Path, no_network: list) -> None:
    with pytest.raises(SearchError) as error:
        load_split("cifar100", tmp_path, train=False, download=True)
    message = str(error.value)
    assert str(tmp_path / "cifar-100-python") in message
    assert "cifar-100-python.tar.gz" in message
    assert "name resolution" in message  # The reason the download failed.
    assert no_network == [("CIFAR100", tmp_path, False)]


def test_a_refused_data_dir_leaves_no_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision makes its folders before it fetches; offline, they must not stay."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep").mkdir()  # a folder the user had stays, empty or not

    def offline(class_name: str, root: Path, train: bool) -> None:
        (root / "FashionMNIST" / "raw").mkdir(parents=True, exist_ok=True)
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data_module, "_torchvision_download", offline)
    for data_dir in (tmp_path / "new" / "deeper", tmp_path / "mine"):
        with pytest.raises(SearchError):
            load_split("fashion_mnist", data_dir, train=True)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "mine", "mine/keep"]


def test_cifar_download_bug_is_not_swallowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(class_name: str, root: Path, train: bool) -> None:
        raise TypeError("a bug, not a network problem")

    monkeypatch.setattr(data_module, "_torchvision_download", broken)
    with pytest.raises(TypeError):
        load_split("cifar10", tmp_path, train=True)


def test_cifar_successful_download_is_then_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        data_module, "_torchvision_download", lambda class_name, root, train: _write_cifar10(root)
    )
    assert len(load_split("cifar10", tmp_path, train=True)) == 20


def test_cifar_corrupt_labels_are_reported(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    _write_cifar_batch(
        tmp_path / "cifar-10-batches-py" / "data_batch_3", _cifar_rows(4, 0), [0, 1, 2, 10],
        b"labels",
    )
    with pytest.raises(SearchError, match="data_batch_3"):
        load_split("cifar10", tmp_path, train=True, download=False)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
def test_fashion_mnist_idx_layout(tmp_path: Path, compress: bool) -> None:
    images, labels = _write_fashion(tmp_path, train=True, n=7, compress=compress)
    images[3, 27, 1] = 250
    _write_idx(tmp_path / "train-images-idx3-ubyte", images, compress=compress)

    loaded = load_split("fashion_mnist", tmp_path, train=True, download=False)
    assert loaded.images.shape == (7, 1, 28, 28)
    assert loaded.images.dtype == torch.uint8 and loaded.images.is_contiguous()
    assert loaded.labels.dtype == torch.int64
    assert loaded.images[3, 0, 27, 1].item() == 250
    np.testing.assert_array_equal(loaded.images[:, 0].numpy(), images)
    np.testing.assert_array_equal(loaded.labels.numpy(), labels)


@pytest.mark.parametrize("subdir", ["fashion_mnist", "FashionMNIST/raw"])
def test_fashion_mnist_found_in_subdirectories(tmp_path: Path, subdir: str) -> None:
    _, labels = _write_fashion(tmp_path / subdir, train=False, n=5, compress=True)
    loaded = load_split("fashion_mnist", tmp_path, train=False, download=False)
    np.testing.assert_array_equal(loaded.labels.numpy(), labels)


def test_only_the_default_data_dir_falls_back_to_the_system_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    system = tmp_path / "usr-share"
    _write_fashion(system, train=True, n=3, compress=True)
    monkeypatch.setattr(data_module, "FASHION_MNIST_SYSTEM_DIR", system)
    monkeypatch.chdir(tmp_path)
    assert len(load_split("fashion_mnist", "data", train=True, download=False)) == 3
    assert f"fashion_mnist from {system}" in capsys.readouterr().err  # which copy is used
    # A data_dir that was given, with a file missing, is refused: not swapped for the system's.
    given = tmp_path / "mine"
    _write_fashion(given, train=True, n=5, compress=True)
    (given / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SearchError, match="used only with the default data_dir"):
        load_split("fashion_mnist", given, train=True, download=False)


def test_fashion_mnist_missing_names_directories_and_apt(tmp_path: Path, no_network: list) -> None:
    with pytest.raises(SearchError) as error:
        load_split("fashion_mnist", tmp_path, train=True, download=True)
    message = str(error.value)
    assert "train-images-idx3-ubyte" in message
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert no_network == [("FashionMNIST", tmp_path, True)]


def test_fashion_mnist_bad_magic_and_truncation(tmp_path: Path) -> None:
    _write_fashion(tmp_path, train=True, n=4, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    good = path.read_bytes()
    path.write_bytes(good[:-10])
    with pytest.raises(SearchError, match="truncated"):
        load_split("fashion_mnist", tmp_path, train=True, download=False)
    path.write_bytes(b"\x00\x00\x0d\x03" + good[4:])  # Float type code instead of ubyte.
    with pytest.raises(SearchError, match="magic"):
        load_split("fashion_mnist", tmp_path, train=True, download=False)


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_test_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        data_module, "FASHION_MNIST_SYSTEM_DIR", Path("/usr/share/datasets/fashion-mnist")
    )
    monkeypatch.chdir(tmp_path)  # the default data_dir, empty: the system's copy is used
    test = load_split("fashion_mnist", "data", train=False, download=False)
    assert test.images.shape == (10000, 1, 28, 28)
    assert test.labels.bincount().tolist() == [1000] * 10


# ----------------------------------------------------------------------------------------------
# Validation split
# ----------------------------------------------------------------------------------------------


def _numbered(n: int) -> ImageSet:
    """Example i has label i and every pixel i % 256, so rows can be traced after a split."""
    labels = torch.arange(n)
    images = (labels % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return ImageSet(images, labels)


def test_split_is_disjoint_covering_and_sized() -> None:
    data = _numbered(100)
    train, val = train_val_split(data, val_size=30, seed=0)
    assert len(train) == 70 and len(val) == 30
    assert set(train.labels.tolist()).isdisjoint(val.labels.tolist())
    assert sorted(train.labels.tolist() + val.labels.tolist()) == list(range(100))
    for part in (train, val):  # Images travel with their labels.
        assert torch.equal(part.images[:, 0, 0, 0].long(), part.labels % 256)
        assert part.images.is_contiguous()


def test_split_depends_only_on_seed() -> None:
    data = _numbered(100)
    _, val_a = train_val_split(data, val_size=10, seed=1)
    torch.manual_seed(12345)  # The global RNG must not matter.
    _, val_b = train_val_split(data, val_size=10, seed=1)
    _, val_c = train_val_split(data, val_size=10, seed=2)
    assert torch.equal(val_a.labels, val_b.labels)
    assert not torch.equal(val_a.labels, val_c.labels)


@pytest.mark.parametrize("val_size", [0, -1, 100, 101, 2.5])
def test_split_rejects_sizes_leaving_a_part_empty(val_size: int) -> None:
    with pytest.raises(SearchError, match="val_size"):
        train_val_split(_numbered(100), val_size=val_size, seed=0)


# ----------------------------------------------------------------------------------------------
# Fake data
# ----------------------------------------------------------------------------------------------


def test_fake_is_deterministic_and_cifar_shaped(tmp_path: Path) -> None:
    train = load_split("fake", tmp_path, train=True)
    torch.manual_seed(999)
    again = load_split("fake", tmp_path, train=True)
    test = load_split("fake", tmp_path, train=False)
    assert train.images.shape == (1024, 3, 32, 32) and test.images.shape == (256, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert train.labels.bincount().min() > 0 and int(train.labels.max()) == 9
    assert not torch.equal(train.images[:256], test.images)
    # The declared statistics match the generated images (they normalise the fake data).
    pixels = train.images.float() / 255
    spec = DATASETS["fake"]
    assert torch.allclose(pixels.mean((0, 2, 3)), torch.tensor(spec.mean), atol=0.01)
    assert torch.allclose(pixels.std((0, 2, 3)), torch.tensor(spec.std), atol=0.01)


def test_fake_labels_are_learnable_but_not_trivial(tmp_path: Path) -> None:
    train = load_split("fake", tmp_path, train=True)
    test = load_split("fake", tmp_path, train=False)
    centroids = torch.stack(
        [train.images[train.labels == k].float().mean(0).flatten() for k in range(10)]
    )
    distances = torch.cdist(test.images.float().flatten(1), centroids)
    accuracy = (distances.argmin(1) == test.labels).float().mean().item()
    assert accuracy > 0.6  # Far above chance (0.1): the classes differ.
    # Mean colour alone is not enough, so a network has something to learn.
    colour = centroids.view(10, 3, -1).mean(-1)
    colour_distances = torch.cdist(test.images.float().mean((2, 3)), colour)
    colour_accuracy = (colour_distances.argmin(1) == test.labels).float().mean().item()
    assert 0.15 < colour_accuracy < accuracy - 0.2
