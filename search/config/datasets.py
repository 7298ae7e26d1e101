"""The data sets a study can name, described without loading anything (and without PyTorch, so
that the config and `--help` can check a study quickly): shape, classes, normalisation, and the
default size of the validation split. `search.training.images` loads them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path("data")  # relative to the working directory, like mlruns/


@dataclass(frozen=True)
class DatasetSpec:
    """What a model and a loader need to know about a data set before loading it.

    Attributes:
        name: Key in `DATASETS`.
        channels: Colour channels (3 for RGB, 1 for grey).
        image_size: Height and width in pixels (all data sets here are square).
        num_classes: Number of labels, which are 0..num_classes-1.
        mean: Per-channel mean of the training images in [0, 1] pixel units, for normalising.
        std: Per-channel standard deviation in the same units.
        val_size: Default number of training images held out as the validation split, so
            that the test split is never used for choosing hyperparameters.
        classes: The name of each label, in label order (saved with every final model, so a
            prediction reads "cat", not 3).
    """

    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_size: int
    classes: tuple[str, ...]


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
# The 100 "fine" labels in label order (CIFAR-100's `meta` file lists them alphabetically).
CIFAR100_CLASSES = tuple("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
    camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile
    cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp
    lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
    oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
    possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
    spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
    train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")

_SPECS = (
    # name, channels, image size, classes, per-channel mean and std, default validation size.
    # CIFAR: per-pixel statistics of the 50k training images (the values airbench uses).
    DatasetSpec("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 5000,
                CIFAR10_CLASSES),
    DatasetSpec("cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 5000,
                CIFAR100_CLASSES),
    DatasetSpec("fashion_mnist", 1, 28, 10, (0.2860,), (0.3530,), 5000, FASHION_MNIST_CLASSES),
    # Statistics measured on the generated training images (see `_make_fake`).
    DatasetSpec("fake", 3, 32, 10, (0.4604, 0.4824, 0.4957), (0.1798, 0.1885, 0.1815), 256,
                tuple(f"class {i}" for i in range(10))),
)
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}
