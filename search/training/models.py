"""The image classifiers a trial can train, built from the trial's flat parameter dict.

Every model exposes ``forward_features(x) -> (B, F)`` (the penultimate-layer features, kept
apart so the report can draw a t-SNE of them) and ``forward(x) = classifier(forward_features(x))``
returning logits. The forward passes have no data-dependent Python branches and use only
ops that accept ``channels_last`` tensors and bf16 autocast, so ``torch.compile`` and the
trainer's fast paths work on every model unchanged.

``params`` is the whole set of a trial's sampled hyperparameters (lr, batch size, ... too):
each builder reads only its own keys and falls back to defaults for absent ones, so a search
space may tune any subset of a model's knobs.

Example:
    >>> model = build_model("cnn3", {"width_1": 16, "lr": 0.1},
    ...                     in_channels=3, image_size=32, num_classes=10)
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from search.config.errors import SearchError
from search.config.params import MODELS as MODEL_PARAMS
from search.config.params import ACTIVATIONS as ACTIVATION_MODULES
from search.config.params import model_settings

MODELS: tuple[str, ...] = tuple(MODEL_PARAMS)

# The modules behind the activations' names (`search.config.params.ACTIVATIONS`).
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    name: getattr(nn, module) for name, module in ACTIVATION_MODULES.items()}


def _check_input(in_channels: int, image_size: int, num_classes: int) -> None:
    """Data-set shape checks shared by all models."""
    for key, value, minimum in (
        ("in_channels", in_channels, 1),
        ("image_size", image_size, 1),
        ("num_classes", num_classes, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SearchError(f"{key} must be an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# cnn3: three conv blocks and an MLP head
# ---------------------------------------------------------------------------------------------


class Cnn3(nn.Module):
    """Three conv-BN-activation-maxpool blocks, then an MLP head with dropout.

    A small, fast baseline whose every width and kernel size is a search knob.

    Args:
        in_channels: Image channels (3 for CIFAR, 1 for Fashion-MNIST).
        image_size: Height = width of the input images.
        num_classes: Number of logits.
        kernel_sizes: One odd kernel size per conv block (three for cnn3).
        widths: Output channels of each conv block, as many as ``kernel_sizes``.
        hidden: Widths of the head's hidden layers (one or two).
        dropout: Probability applied before every Linear of the head.
        batch_norm: Whether the convs are followed by BatchNorm (else they get a bias).
        activation: Constructor of the activation module.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        kernel_sizes: tuple[int, ...],
        widths: tuple[int, ...],
        hidden: tuple[int, ...],
        dropout: float,
        batch_norm: bool,
        activation: Callable[[], nn.Module],
    ) -> None:
        super().__init__()
        # Each maxpool(2) floors the size; compute the flatten size here rather than with a
        # dummy forward pass, so building costs nothing and a too-small image fails clearly.
        sizes = [image_size]
        for _ in widths:
            sizes.append(sizes[-1] // 2)
        if sizes[-1] < 1:
            raise SearchError(
                f"cnn3 needs images of at least 8x8 (three 2x2 max-pools): image size "
                f"{image_size} shrinks as {' -> '.join(map(str, sizes))}"
            )
        blocks: list[nn.Module] = []
        channels = in_channels
        for kernel_size, width in zip(kernel_sizes, widths, strict=True):
            # A conv followed by BN needs no bias: BN's shift replaces it.
            padding = kernel_size // 2
            blocks.append(
                nn.Conv2d(channels, width, kernel_size, padding=padding, bias=not batch_norm)
            )
            if batch_norm:
                blocks.append(nn.BatchNorm2d(width))
            blocks += [activation(), nn.MaxPool2d(2)]
            channels = width
        self.conv = nn.Sequential(*blocks)

        head: list[nn.Module] = [nn.Flatten()]
        features = channels * sizes[-1] * sizes[-1]
        for width in hidden:
            head += [nn.Dropout(dropout), nn.Linear(features, width), activation()]
            features = width
        self.head = nn.Sequential(*head)
        self.num_features = features
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer's activations, (B, num_features)."""
        return self.head(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, (B, num_classes)."""
        return self.classifier(self.forward_features(x))


def _build_cnn3(
    params: Mapping[str, Any], in_channels: int, image_size: int, num_classes: int
) -> Cnn3:
    """Reads cnn3's keys from ``params``; defaults give a 32/64/128-wide net with a 256 head."""
    p = model_settings("cnn3", params)
    return Cnn3(
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        kernel_sizes=tuple(p[f"kernel_size_{i}"] for i in (1, 2, 3)),
        widths=tuple(p[f"width_{i}"] for i in (1, 2, 3)),
        # hidden_2 = 0: no second hidden layer
        hidden=(p["hidden_1"], p["hidden_2"]) if p["hidden_2"] > 0 else (p["hidden_1"],),
        dropout=float(p["dropout"]),
        batch_norm=p["batch_norm"],
        activation=ACTIVATIONS[p["activation"]],
    )


# ---------------------------------------------------------------------------------------------
# resnet20: the CIFAR ResNet of He et al. 2015, section 4.2
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al. 2015, figure 2).

    Shortcut: identity when the shape is kept; otherwise option B of the paper, a 1x1 conv
    with stride 2 plus BN. The paper's CIFAR nets use option A (subsample and zero-pad the
    channels, no parameters); option B is what torchvision and most reimplementations use,
    is simpler to write without slicing tricks, stays friendly to channels_last and compile,
    and costs only 2,752 extra parameters at width 1. Either is fine for a search.

    Args:
        in_channels: Channels entering the block.
        out_channels: Channels leaving it.
        stride: 2 for the first block of a downsampling stage, else 1.
        activation: Constructor of the activation module.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        activation: Callable[[], nn.Module],
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = activation()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = activation()
        # Decided at build time, so forward has no shape-dependent branch for compile to trace.
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output, activation(residual + shortcut)."""
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for small images: stem, 3 stages of 3 BasicBlocks, global pooling, Linear.

    Channels are 16/32/64 times ``width_multiplier``; stages 2 and 3 halve the resolution.
    At width 1 with 10 classes it has 272,474 parameters (269,722 with the paper's option A).

    Args:
        in_channels: Image channels.
        num_classes: Number of logits.
        width_multiplier: Scales every stage's channels (any positive float).
        stem_kernel_size: Kernel size of the first conv (3 in the paper).
        dropout: Probability applied to the pooled features before the Linear.
        activation: Constructor of the activation module.
    """

    blocks_per_stage = 3  # 6n + 2 layers with n = 3 gives 20

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        width_multiplier: float,
        stem_kernel_size: int,
        dropout: float,
        activation: Callable[[], nn.Module],
    ) -> None:
        super().__init__()
        widths = [max(1, round(base * width_multiplier)) for base in (16, 32, 64)]
        self.stem = nn.Sequential(
            nn.Conv2d(
                in_channels,
                widths[0],
                stem_kernel_size,
                padding=stem_kernel_size // 2,
                bias=False,
            ),
            nn.BatchNorm2d(widths[0]),
            activation(),
        )
        blocks: list[nn.Module] = []
        channels = widths[0]
        for stage, width in enumerate(widths):
            for index in range(self.blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride, activation))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.num_features = channels
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming init as in the paper (He et al. 2015 cite their own init, arXiv 1502.01852)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features of the last stage, (B, num_features)."""
        # mean over H, W works for any image size and any memory format.
        return self.blocks(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, (B, num_classes)."""
        return self.classifier(self.forward_features(x))


def _build_resnet20(
    params: Mapping[str, Any], in_channels: int, image_size: int, num_classes: int
) -> ResNet20:
    """Reads resnet20's keys from ``params``; defaults give the paper's network."""
    del image_size  # global pooling makes the network independent of the image size
    p = model_settings("resnet20", params)
    return ResNet20(
        in_channels=in_channels,
        num_classes=num_classes,
        width_multiplier=float(p["width_multiplier"]),
        stem_kernel_size=p["stem_kernel_size"],
        dropout=float(p["dropout"]),
        activation=ACTIVATIONS[p["activation"]],
    )


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[Mapping[str, Any], int, int, int], nn.Module]] = {
    "cnn3": _build_cnn3,
    "resnet20": _build_resnet20,
}


def build_model(
    name: str,
    params: Mapping[str, Any],
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
) -> nn.Module:
    """Builds the named model from a trial's parameters.

    Args:
        name: One of ``MODELS``.
        params: The trial's flat hyperparameters; keys the model does not use (lr,
            batch_size, optimizer, ...) are ignored, absent ones take their defaults.
        in_channels: Image channels of the data set.
        image_size: Height = width of the data set's images.
        num_classes: Number of classes of the data set.

    Returns:
        A module with ``forward_features(x) -> (B, F)`` and ``forward(x) -> (B, num_classes)``.

    Raises:
        SearchError: For an unknown model or activation, or a parameter out of range.

    Example:
        >>> model = build_model("resnet20", {}, in_channels=3, image_size=32, num_classes=10)
        >>> count_parameters(model)
        272474
    """
    model_settings(name, {})  # an unknown name fails here, listing the models
    _check_input(in_channels, image_size, num_classes)
    return _BUILDERS[name](params, in_channels, image_size, num_classes)


def model_size(name: str, params: Mapping[str, Any], spec: Any) -> int:
    """The trainable parameters of the model `params` describe, for a data set's `spec`
    (`search.training.images.DatasetSpec`), without training it."""
    return count_parameters(build_model(name, params, in_channels=spec.channels,
                                        image_size=spec.image_size, num_classes=spec.num_classes))


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters, the size reported per trial."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
