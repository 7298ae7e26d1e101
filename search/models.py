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

from search.errors import SearchError

MODELS: tuple[str, ...] = ("cnn3", "resnet20")

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,  # the same function under its other common name
    "gelu": nn.GELU,
}

KERNEL_SIZES: tuple[int, ...] = (3, 5, 7)  # odd, so k // 2 padding keeps the size ("same")


# ---------------------------------------------------------------------------------------------
# Reading and checking parameters
# ---------------------------------------------------------------------------------------------


def _int_param(params: Mapping[str, Any], key: str, default: int, *, minimum: int) -> int:
    """An integer parameter, checked here so a bad space fails with a message, not a shape error."""
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise SearchError(f"model parameter {key!r} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise SearchError(f"model parameter {key!r} must be >= {minimum}, got {value!r}")
    return int(value)


def _kernel_param(params: Mapping[str, Any], key: str) -> int:
    """A conv kernel size; only odd sizes keep "same" padding exact."""
    value = _int_param(params, key, 3, minimum=1)
    if value not in KERNEL_SIZES:
        raise SearchError(
            f"model parameter {key!r} must be one of {list(KERNEL_SIZES)}, got {value!r}"
        )
    return value


def _dropout_param(params: Mapping[str, Any], default: float) -> float:
    """The dropout probability; 1.0 would zero every feature, so it is refused."""
    value = params.get("dropout", default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise SearchError(f"model parameter 'dropout' must be a number in [0, 1), got {value!r}")
    return float(value)


def _activation(params: Mapping[str, Any]) -> Callable[[], nn.Module]:
    """The activation's constructor, so each layer gets its own (stateless) module."""
    name = params.get("activation", "relu")
    if name not in ACTIVATIONS:
        raise SearchError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _bool_param(params: Mapping[str, Any], key: str, default: bool) -> bool:
    """A flag; strings like "false" are refused because ``bool("false")`` is True."""
    value = params.get(key, default)
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise SearchError(f"model parameter {key!r} must be true or false, got {value!r}")


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
    hidden_1 = _int_param(params, "hidden_1", 256, minimum=1)
    hidden_2 = _int_param(params, "hidden_2", 0, minimum=0)  # 0 = no second hidden layer
    return Cnn3(
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        kernel_sizes=tuple(_kernel_param(params, f"kernel_size_{i}") for i in (1, 2, 3)),
        widths=tuple(
            _int_param(params, f"width_{i}", default, minimum=1)
            for i, default in ((1, 32), (2, 64), (3, 128))
        ),
        hidden=(hidden_1, hidden_2) if hidden_2 > 0 else (hidden_1,),
        dropout=_dropout_param(params, 0.1),
        batch_norm=_bool_param(params, "batch_norm", True),
        activation=_activation(params),
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
    multiplier = params.get("width_multiplier", 1)
    if isinstance(multiplier, bool) or not isinstance(multiplier, int | float) or multiplier <= 0:
        raise SearchError(
            f"model parameter 'width_multiplier' must be a positive number, got {multiplier!r}"
        )
    return ResNet20(
        in_channels=in_channels,
        num_classes=num_classes,
        width_multiplier=float(multiplier),
        stem_kernel_size=_kernel_param(params, "stem_kernel_size"),
        dropout=_dropout_param(params, 0.0),
        activation=_activation(params),
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
    if name not in _BUILDERS:
        raise SearchError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    _check_input(in_channels, image_size, num_classes)
    return _BUILDERS[name](params, in_channels, image_size, num_classes)


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters, the size reported per trial."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
