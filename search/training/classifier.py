"""A trained network made usable on its own: the network, its input normalisation and its card
(`ModelCard`) in one module that takes images as they are stored (uint8 pixels, N x C x H x W)
and returns logits. Saved as a weights file that `torch.load(weights_only=True)` can read (no
pickled code), and logged to MLflow as a PyTorch model by `search.tracking.model_registry`.

Why the normalisation lives inside the model: a user of a saved model should not need to know
the data set's per-channel mean and standard deviation, nor whether the search trained in
channels-last bf16; uint8 pixels in, class scores out.

Example:
    >>> model = load_classifier("reports/cnn3/models/trial-0007-seed-1.pt")  # doctest: +SKIP
    >>> model.card.classes[int(model(images).argmax(1)[0])]                        # doctest: +SKIP
    'cat'
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from search.config.errors import SearchError, first_line, shown
from search.training.images import ImageSet
from search.training.models import build_model
from search.training.results import MODEL_FORMAT, ModelCard

# Images per forward pass when scoring or predicting: large enough to keep a GPU busy, small
# enough for a CPU's cache and any GPU's memory with these models.
BATCH_SIZE = 500


class Classifier(nn.Module):
    """A trained network with its normalisation: uint8 (or 0..255 float) pixels -> logits.

    Attributes:
        network: The trained `cnn3`/`resnet20` module (`forward_features` gives the
            penultimate features).
        card: What the model is and where it came from (`search.training.results.ModelCard`).
    """

    def __init__(self, network: nn.Module, card: ModelCard) -> None:
        super().__init__()
        self.network = network
        self.card = card
        mean = torch.tensor(card.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(card.std, dtype=torch.float32).view(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply-add. Derived from the card, so not saved.
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.card.channels, self.card.image_size, self.card.image_size

    @property
    def device(self) -> torch.device:
        """Where the model's tensors are (give it images there)."""
        return self.scale.device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of `images`, which must be on the model's device. No `.to()` here, not even
        for the dtype: `torch.export` (the MLflow model) records a conversion with the example
        input's device as a constant (`to(cpu)`, and an assertion that the input is on the CPU),
        and the exported graph then fails on a device mismatch after `.to("cuda")`."""
        if images.dim() != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, self.input_shape))})"
                             f" (uint8 pixels, channels first), got {tuple(images.shape)}")
        # uint8 * float32 promotes to float32 inside addcmul (exactly: 0..255 are floats).
        return self.network(torch.addcmul(self.shift, images, self.scale))


def classifier_from_state(card: ModelCard, state_dict: Mapping[str, torch.Tensor]) -> Classifier:
    """Rebuilds the network the card names and loads the weights; in eval mode, on the CPU.

    The final evaluation measures test accuracy on a model made by this function from the
    trained weights, exactly as `load_classifier` makes it later, so the recorded accuracy is
    the accuracy of the model as loaded (to the image, on the same kind of device).
    """
    network = build_model(card.model, card.params, in_channels=card.channels,
                          image_size=card.image_size, num_classes=len(card.classes))
    network.load_state_dict(state_dict)
    return Classifier(network, card).eval()


def model_file(trial_number: int, repeat: int) -> str:
    """The saved model's file name: `trial-0007-seed-1.pt` for trial 7's first seed."""
    return f"trial-{trial_number:04d}-seed-{repeat + 1}.pt"


def network_weights(network: nn.Module) -> dict[str, torch.Tensor]:
    """A trained network's weights as contiguous CPU tensors (whatever device and memory
    format it trained in), so they load anywhere."""
    return {k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}


def save_classifier(model: Classifier, path: str | Path) -> Path:
    """Writes the card and the weights to one file (atomically: a crash leaves no half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    torch.save({"card": model.card.as_dict(), "state_dict": network_weights(model.network)}, partial)
    partial.replace(path)
    return path


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """A model saved by `save_classifier` (a final model of `search.report` or `search.train`).

    The file is read as untrusted: `weights_only=True` (no pickled code runs, and no advice to
    retry without it is taken), a zip entry that would inflate is refused before it is read,
    and the weights are held against the network the card describes, built on the meta device
    (no memory), before anything is allocated for it.

    Raises:
        SearchError: no such file, not a model saved by this package (or by a newer version),
            or weights that do not fit the card; the message names the file and the misfit.
    """
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"model={path}: no such file; a report with retrain=topN saves its "
                          "models under reports/<study_name>/models/.")
    try:
        _check_stored(path)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        card = ModelCard.from_dict(saved["card"])
        state_dict = saved["state_dict"]
    except Exception as error:  # noqa: BLE001 - any unpickling error: not our file
        raise SearchError(f"model={path}: not a model saved by search ({type(error).__name__}: "
                          f"{first_line(error)}).") from None
    if card.format > MODEL_FORMAT:
        raise SearchError(f"model={path}: saved in format {card.format} by a newer version of "
                          f"search (this one reads format {MODEL_FORMAT}); upgrade search.")
    misfit = _misfit(card, state_dict)
    if misfit:
        raise SearchError(f"model={path}: its weights do not fit its card ({misfit}); the file "
                          "was edited, or holds another model's weights.")
    return classifier_from_state(card, state_dict).to(device)


def _check_stored(path: Path) -> None:
    """`torch.save` stores its zip entries uncompressed: a compressed one could inflate past
    anything the file holds, so it is refused from the zip's directory, before it is read."""
    with zipfile.ZipFile(path) as archive:
        for entry in archive.infolist():
            if entry.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"entry {entry.filename} is compressed, as torch.save never does")


def _misfit(card: ModelCard, state_dict: object) -> str:
    """What does not fit between the card and the weights ("" when all fits): the card's own
    sizes, then each tensor's name and shape against the network the card describes."""
    try:
        sizes_fit = (card.channels in (1, 3) and isinstance(card.image_size, int)
                     and 0 < card.image_size <= 1024
                     and len(card.mean) == len(card.std) == card.channels and len(card.classes) > 1)
    except TypeError:  # a number where a list belongs
        sizes_fit = False
    if not sizes_fit:
        return (f"the card's sizes disagree: channels={shown(card.channels)}, "
                f"image_size={shown(card.image_size)}, mean={shown(card.mean)}, "
                f"std={shown(card.std)}, classes={shown(card.classes)}")
    try:
        with torch.device("meta"):  # shapes only: not a byte is allocated
            expected = build_model(card.model, card.params, in_channels=card.channels,
                                   image_size=card.image_size,
                                   num_classes=len(card.classes)).state_dict()
    except Exception as error:  # noqa: BLE001 - an edited card can break the build any way
        return f"the card's {card.model} cannot be built: {first_line(error)}"
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        return "the weights are not a mapping of names to tensors"
    missing, extra = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    if missing:
        return f"{min(missing)} is missing from the file"
    if extra:
        return f"{min(extra, key=str)} is in the file, not in {card.model}"
    for name, tensor in expected.items():
        if state_dict[name].shape != tensor.shape or state_dict[name].dtype != tensor.dtype:
            return (f"{name} is {_form(state_dict[name])} in the file, {_form(tensor)} in "
                    f"{card.model} with the card's parameters")
    return ""


def _form(tensor: torch.Tensor) -> str:
    return f"{'x'.join(map(str, tensor.shape)) or 'a scalar'} {str(tensor.dtype).removeprefix('torch.')}"


@torch.inference_mode()
def class_scores(model: Classifier, images: torch.Tensor, *, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """Logits of uint8 images (N, C, H, W), computed in fp32 batch by batch on the model's
    device; returned on the CPU. No autocast: a model scored twice gives the same numbers."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size].to(model.device)).float().cpu()
                      for i in range(0, len(images), batch_size)])


def score(model: Classifier, data: ImageSet) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a model on a labelled split."""
    logits = class_scores(model, data.images)
    loss = nn.functional.cross_entropy(logits, data.labels).item()
    return loss, int((logits.argmax(1) == data.labels).sum()) / len(data)


def top_classes(model: Classifier, images: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
    """The k most probable classes of each image, as (class name, probability), best first."""
    probabilities = class_scores(model, images).softmax(1)
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
    return [[(model.card.classes[i], p) for i, p in zip(row_indices.tolist(), row_values.tolist())]
            for row_values, row_indices in zip(values, indices)]
