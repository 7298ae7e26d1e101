"""The fast paths change speed, not results; the speed benchmark (`benchmarks/speed.py`) writes the
figures the README promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL_PARAMS

from benchmarks import speed as bench
from search.config.errors import SearchError
from search.training.augment import BatchLoader, _epoch_seed, random_crop, random_flip
from search.training.images import ImageSet
from search.training.loop import Speed, evaluate, make_loader, predict, train
from search.training.models import build_model

SMALL_AUGMENTED = {**SMALL_PARAMS, "augment": True}
PLAIN = Speed(channels_last=False, autocast=False)


# ----------------------------------------------------------------------------------------------
# channels_last / autocast against the plain path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["cnn3", "resnet20"])
def test_fast_paths_predict_like_the_plain_path(fake_data, model_name):
    val_set, spec = fake_data.val, fake_data.spec
    torch.manual_seed(0)
    model = build_model(model_name, {"width_multiplier": 0.25, **SMALL_AUGMENTED}, in_channels=3,
                        image_size=32, num_classes=10)
    # A few BN statistics updates, so eval mode is not the trivial initial state.
    model.train()
    with torch.no_grad():
        for images, _ in make_loader(val_set, spec, torch.device("cpu"), batch_size=64, train=False):
            model(images)
    cpu = torch.device("cpu")
    outputs = {}
    for name, channels_last, autocast in (("plain", False, False), ("channels_last", True, False),
                                          ("bf16", True, True)):
        model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        loader = make_loader(val_set, spec, cpu, batch_size=100, train=False, channels_last=channels_last)
        features, _ = predict(model, loader, cpu, features=True, autocast=autocast)
        labels, _ = predict(model, loader, cpu, autocast=autocast)
        outputs[name] = (features, labels, evaluate(model, loader, cpu, autocast=autocast))
    plain_features, plain_labels, (plain_loss, _) = outputs["plain"]
    # fp32 in another memory layout: the same numbers up to summation order.
    torch.testing.assert_close(outputs["channels_last"][0], plain_features, rtol=1e-4, atol=1e-4)
    assert torch.equal(outputs["channels_last"][1], plain_labels)
    # bf16 keeps 8 bits of mantissa: close features, nearly all the same predicted labels.
    torch.testing.assert_close(outputs["bf16"][0], plain_features, rtol=0.1, atol=0.1)
    assert (outputs["bf16"][1] == plain_labels).float().mean() >= 0.95
    assert outputs["bf16"][2][0] == pytest.approx(plain_loss, rel=0.05)


def test_fast_training_tracks_the_plain_path(fake_data):
    train_set, val_set, spec = fake_data.train, fake_data.val, fake_data.spec
    train_set = ImageSet(train_set.images[:384], train_set.labels[:384])
    runs = {name: train("cnn3", SMALL_AUGMENTED, train_data=train_set, val_data=val_set, spec=spec,
                        epochs=2, seed=3, device="cpu", speed=speed).history
            for name, speed in (("plain", PLAIN), ("channels_last", Speed(channels_last=True)),
                                ("bf16", Speed(channels_last=True, autocast=True)))}
    plain = runs["plain"]
    for epoch, metrics in enumerate(runs["channels_last"]):
        assert metrics.train_loss == pytest.approx(plain[epoch].train_loss, rel=1e-3)
    for epoch, metrics in enumerate(runs["bf16"]):
        assert metrics.train_loss == pytest.approx(plain[epoch].train_loss, rel=0.1)
        assert abs(metrics.val_accuracy - plain[epoch].val_accuracy) < 0.15


def test_speed_switches(monkeypatch):
    monkeypatch.setenv("SEARCH_AUTOCAST", "off")
    monkeypatch.setenv("SEARCH_CHANNELS_LAST", "on")
    monkeypatch.setenv("SEARCH_COMPILE", "reduce-overhead")
    speed = Speed.for_device("cuda")
    assert (speed.autocast, speed.channels_last, speed.compile) == (False, True, "reduce-overhead")
    monkeypatch.setenv("SEARCH_AUTOCAST", "maybe")
    with pytest.raises(SearchError, match="SEARCH_AUTOCAST"):
        Speed.for_device("cpu")
    monkeypatch.setenv("SEARCH_AUTOCAST", "auto")
    monkeypatch.setenv("SEARCH_COMPILE", "fastest")
    with pytest.raises(SearchError, match="SEARCH_COMPILE"):
        Speed.for_device("cpu")
    monkeypatch.delenv("SEARCH_COMPILE")
    assert Speed.for_device("cpu").compile == "off"  # never on by default


# ----------------------------------------------------------------------------------------------
# The loader's one-gather crop and flip is exactly random_flip(random_crop(...))
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("padding", [0, 2, 4])
def test_loader_batches_equal_the_reference_augmentations(channels_last, padding):
    generator = torch.Generator().manual_seed(1)
    data = ImageSet(torch.randint(0, 256, (37, 3, 9, 7), dtype=torch.uint8, generator=generator),
                    torch.arange(37))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    loader = BatchLoader(data, batch_size=10, device="cpu", mean=mean, std=std, augment=True,
                         shuffle=True, seed=11, channels_last=channels_last, crop_padding=padding)
    for epoch in range(2):
        reference = torch.Generator().manual_seed(_epoch_seed(11, epoch))
        order = torch.randperm(37, generator=reference)
        batches = list(loader)
        for start, (images, labels) in zip(range(0, 37, 10), batches, strict=True):
            index = order[start:start + 10]
            expected = random_flip(random_crop(data.images[index], padding, reference), reference)
            expected = (expected.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) \
                / torch.tensor(std).view(1, 3, 1, 1)
            assert torch.equal(labels, index)
            torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)
            layout = torch.channels_last if channels_last else torch.contiguous_format
            assert images.is_contiguous(memory_format=layout)


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------


def test_settings_are_checked():
    assert bench.parse_settings(["model=resnet20", "epochs=2"])["model"] == "resnet20"
    with pytest.raises(SearchError, match="did you mean 'epochs'"):
        bench.parse_settings(["epoch=2"])
    with pytest.raises(SearchError, match="model="):
        bench.parse_settings(["model=vgg"])
    with pytest.raises(SearchError, match="batch_size"):
        bench.parse_settings(["batch_size=0"])


def test_benchmark_writes_the_promised_json(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the study's artifacts and anything else stay in here
    out = tmp_path / "bench.json"
    tiny = ["study.space.width_1.choices=[8]", "study.space.width_2.choices=[8]",
            "study.space.width_3.choices=[16]", "study.space.hidden_1.choices=[32]",
            "study.space.hidden_2.choices=[0]", "study.space.batch_size.choices=[128]"]
    code = bench.main(["model=cnn3", "device=cpu", "batch_size=32", "epochs=2", "train_images=96",
                       "val_images=40", "workers=0", "study_trials=2", "study_epochs=1",
                       "study_tracking=off", f"out={out}", *tiny])
    assert code == 0
    report = json.loads(out.read_text())
    for pipeline in ("baseline", "ours"):
        assert report[pipeline]["train_images_per_second"] > 0
        assert report[pipeline]["val_images_per_second"] > 0
        assert len(report[pipeline]["epochs"]) == 2
    assert report["ratio"]["train"] == pytest.approx(
        report["ours"]["train_images_per_second"] / report["baseline"]["train_images_per_second"])
    assert report["baseline"]["workers"] == 0 and report["baseline"]["transforms"] == "torchvision"
    assert set(report["speed"]) == {"channels_last", "autocast", "compile", "eval_batch_size"}
    study = report["study"]
    assert study["trials"] == 2 and study["tracking"] is False
    for key in ("wall_seconds", "in_epoch_seconds", "data_prep_seconds", "overhead_seconds_per_trial"):
        assert study[key] >= 0
    for key in ("overhead_share", "overhead_share_of_trials", "projected_overhead_share_cifar10"):
        assert 0 <= study[key] <= 1
    assert report["targets"]["train_ratio"] == 1.5 and report["targets"]["overhead_share"] == 0.02
    assert report["machine"]["cpu_count"] and report["total_seconds"] > 0
    printed = capsys.readouterr().out
    assert "train images/s" in printed and "ratio" in printed and str(out) in printed
