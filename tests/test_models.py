"""Tests for search.training.models: shapes on every data set, parameter knobs, counts, memory formats."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from search.config.errors import SearchError
from search.training.models import ACTIVATIONS, MODELS, build_model, count_parameters

# (in_channels, image_size, num_classes) of the data sets the searches run on.
DATASETS = {
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "fashion_mnist": (1, 28, 10),
}
BATCH = 2  # two images: enough for BatchNorm in train mode, and fast


def _build(name: str, params: dict[str, Any], dataset: str = "cifar10") -> nn.Module:
    in_channels, image_size, num_classes = DATASETS[dataset]
    return build_model(
        name, params, in_channels=in_channels, image_size=image_size, num_classes=num_classes
    )


def _images(dataset: str = "cifar10") -> torch.Tensor:
    in_channels, image_size, _ = DATASETS[dataset]
    generator = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, in_channels, image_size, image_size, generator=generator)


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("widths", [(8, 16, 24), (32, 64, 128)])
def test_cnn3_output_shape(dataset: str, kernel_size: int, widths: tuple[int, int, int]) -> None:
    params = {f"kernel_size_{i}": kernel_size for i in (1, 2, 3)}
    params |= {f"width_{i}": width for i, width in zip((1, 2, 3), widths)}
    params |= {"hidden_1": 32}
    model = _build("cnn3", params, dataset)
    logits = model(_images(dataset))
    assert logits.shape == (BATCH, DATASETS[dataset][2])
    assert model.forward_features(_images(dataset)).shape == (BATCH, 32)


def test_cnn3_mixed_kernel_sizes() -> None:
    params = {"kernel_size_1": 7, "kernel_size_2": 5, "kernel_size_3": 3}
    model = _build("cnn3", params, "fashion_mnist")
    assert model(_images("fashion_mnist")).shape == (BATCH, 10)


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("stem_kernel_size", [3, 5, 7])
@pytest.mark.parametrize("width_multiplier", [0.25, 0.5, 1])
def test_resnet20_output_shape(
    dataset: str, stem_kernel_size: int, width_multiplier: float
) -> None:
    params = {"stem_kernel_size": stem_kernel_size, "width_multiplier": width_multiplier}
    model = _build("resnet20", params, dataset)
    images = _images(dataset)
    assert model(images).shape == (BATCH, DATASETS[dataset][2])
    features = model.forward_features(images)
    assert features.shape == (BATCH, max(1, round(64 * width_multiplier)))


@pytest.mark.parametrize("name", MODELS)
def test_forward_is_classifier_of_features(name: str) -> None:
    model = _build(name, {}).eval()
    images = _images()
    with torch.no_grad():
        expected = model.classifier(model.forward_features(images))
        torch.testing.assert_close(model(images), expected)


def test_cnn3_too_small_image_is_refused() -> None:
    with pytest.raises(SearchError, match=r"image size 4 shrinks as 4 -> 2 -> 1 -> 0"):
        build_model("cnn3", {}, in_channels=3, image_size=4, num_classes=10)


# ---------------------------------------------------------------------------------------------
# Parameter knobs
# ---------------------------------------------------------------------------------------------


def _count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(module, kind) for module in model.modules())


def test_cnn3_batch_norm_off_removes_bn_and_adds_conv_bias() -> None:
    with_bn = _build("cnn3", {})
    without_bn = _build("cnn3", {"batch_norm": False})
    assert _count(with_bn, nn.BatchNorm2d) == 3
    assert _count(without_bn, nn.BatchNorm2d) == 0
    convs = [m for m in without_bn.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(conv.bias is not None for conv in convs)
    assert all(m.bias is None for m in with_bn.modules() if isinstance(m, nn.Conv2d))
    assert without_bn(_images()).shape == (BATCH, 10)


def test_cnn3_hidden_2_adds_a_layer() -> None:
    one_hidden = _build("cnn3", {"hidden_1": 64})
    two_hidden = _build("cnn3", {"hidden_1": 64, "hidden_2": 32})
    assert _count(one_hidden, nn.Linear) == 2
    assert _count(two_hidden, nn.Linear) == 3
    assert two_hidden.forward_features(_images()).shape == (BATCH, 32)
    assert two_hidden(_images()).shape == (BATCH, 10)


def test_cnn3_default_flatten_size() -> None:
    # 32 -> 16 -> 8 -> 4 for CIFAR and 28 -> 14 -> 7 -> 3 for Fashion-MNIST, 128 channels.
    cifar_first = next(m for m in _build("cnn3", {}).modules() if isinstance(m, nn.Linear))
    fashion = _build("cnn3", {}, "fashion_mnist")
    fashion_first = next(m for m in fashion.modules() if isinstance(m, nn.Linear))
    assert cifar_first.in_features == 128 * 4 * 4
    assert fashion_first.in_features == 128 * 3 * 3


@pytest.mark.parametrize("name", MODELS)
def test_dropout_value_is_used(name: str) -> None:
    model = _build(name, {"dropout": 0.37})
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == pytest.approx(0.37) for m in dropouts)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_activation_is_used(name: str, activation: str) -> None:
    model = _build(name, {"activation": activation, "width_multiplier": 0.25})
    assert _count(model, type(ACTIVATIONS[activation]())) > 0
    if activation != "relu":
        assert _count(model, nn.ReLU) == 0
    assert model(_images()).shape == (BATCH, 10)


@pytest.mark.parametrize("name", MODELS)
def test_unrelated_keys_are_ignored(name: str) -> None:
    extra = {"lr": 0.1, "batch_size": 512, "optimizer": "sgd", "weight_decay": 5e-4}
    plain, with_extra = _build(name, {}), _build(name, extra)
    assert count_parameters(plain) == count_parameters(with_extra)
    assert str(plain) == str(with_extra)


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------


def _conv_bn(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + 2 * c_out  # conv without bias, BN weight + bias


def test_resnet20_parameter_count() -> None:
    # Counted by hand from He et al. 2015 section 4.2 (width 1, 10 classes).
    stem = _conv_bn(3, 16, 3)
    stage_1 = 3 * 2 * _conv_bn(16, 16, 3)
    stage_2 = _conv_bn(16, 32, 3) + _conv_bn(32, 32, 3) + 2 * 2 * _conv_bn(32, 32, 3)
    stage_3 = _conv_bn(32, 64, 3) + _conv_bn(64, 64, 3) + 2 * 2 * _conv_bn(64, 64, 3)
    head = 64 * 10 + 10
    option_a = stem + stage_1 + stage_2 + stage_3 + head
    shortcuts_b = _conv_bn(16, 32, 1) + _conv_bn(32, 64, 1)  # the 1x1 projection shortcuts
    assert option_a == 269_722
    assert option_a + shortcuts_b == 272_474
    assert count_parameters(_build("resnet20", {})) == 272_474


def test_resnet20_width_2_has_about_4x_parameters() -> None:
    width_1 = count_parameters(_build("resnet20", {}))
    width_2 = count_parameters(_build("resnet20", {"width_multiplier": 2}))
    assert 3.8 < width_2 / width_1 < 4.1


def test_cnn3_default_parameter_count() -> None:
    convs = _conv_bn(3, 32, 3) + _conv_bn(32, 64, 3) + _conv_bn(64, 128, 3)
    head = (128 * 4 * 4 + 1) * 256 + (256 + 1) * 10
    assert count_parameters(_build("cnn3", {})) == convs + head


def test_count_parameters_skips_frozen() -> None:
    model = _build("resnet20", {})
    model.classifier.requires_grad_(False)
    assert count_parameters(model) == 272_474 - 650


# ---------------------------------------------------------------------------------------------
# Memory format, autocast, compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_matches_contiguous(name: str) -> None:
    model = _build(name, {"dropout": 0.3}).eval()
    images = _images()
    with torch.no_grad():
        expected = model(images)
        model = model.to(memory_format=torch.channels_last)
        actual = model(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_runs(name: str) -> None:
    model = _build(name, {}).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(_images())
    assert logits.shape == (BATCH, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", MODELS)
def test_traces_without_graph_breaks(name: str) -> None:
    # fullgraph=True fails on any graph break; the eager backend skips code generation.
    model = _build(name, {"width_multiplier": 0.25}).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(_images()), model(_images()))


# ---------------------------------------------------------------------------------------------
# User errors
# ---------------------------------------------------------------------------------------------


def test_unknown_model_lists_models() -> None:
    with pytest.raises(SearchError, match="vgg") as error:
        _build("vgg", {})
    assert all(name in str(error.value) for name in MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_unknown_activation_lists_allowed(name: str) -> None:
    with pytest.raises(SearchError, match="tanh") as error:
        _build(name, {"activation": "tanh"})
    assert all(activation in str(error.value) for activation in ACTIVATIONS)


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("cnn3", {"kernel_size_2": 4}, r"\[3, 5, 7\]"),
        ("resnet20", {"stem_kernel_size": 9}, r"\[3, 5, 7\]"),
        ("cnn3", {"width_1": 0}, r"\[1, 4096\]"),
        ("cnn3", {"hidden_2": -1}, r"\[0, 16384\]"),
        ("cnn3", {"dropout": 1.0}, r"\[0, 1\)"),
        ("cnn3", {"batch_norm": "false"}, "true or false"),
        ("resnet20", {"width_multiplier": 0}, r"\(0, 16\]"),
    ],
)
def test_bad_parameter_values_are_refused(name: str, params: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SearchError, match=fragment):
        _build(name, params)
