"""The fast paths change speed, not results; the speed benchmark (`benchmarks/speed.py`) writes the
figures docs/speed.md promises."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import SMALL_PARAMS

from benchmarks import speed as bench
from search.config.errors import SearchError
from search.training.augment import BatchLoader, _epoch_seed, random_crop, random_flip
from search.training.images import ImageSet
from search.training.loop import Speed, evaluate, make_loader, predict, train
from search.training.models import build_model

SMALL_AUGMENTED = {**SMALL_PARAMS, "augment": True}
PLAIN = Speed(channels_last=False, precision="fp32")


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
                                ("bf16", Speed(channels_last=True, precision="bf16")))}
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
# Precision per device: bf16 from compute capability 8.0, fp16 with loss scaling on 7.x
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("capability", "precision"), [
    ((9, 0), "bf16"), ((8, 0), "bf16"), ((8, 6), "bf16"),    # H100, A100, RTX 30xx
    ((7, 5), "fp16"), ((7, 0), "fp16"),                      # T4, V100: no bf16 convolutions
    ((6, 1), "fp32"), ((3, 7), "fp32")])                     # Pascal, Kepler: no tensor cores
def test_precision_follows_the_compute_capability(monkeypatch, capability, precision):
    """A T4 (7.5) must not get bf16, which cuDNN runs there as a slow generic convolution."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: asked.append(device) or capability)
    monkeypatch.delenv("SEARCH_AUTOCAST", raising=False)
    speed = Speed.for_device("cuda:1")
    assert speed.precision == precision and speed.autocast == (precision != "fp32")
    assert asked == [torch.device("cuda:1")]  # the trial's own card, not card 0
    monkeypatch.setenv("SEARCH_AUTOCAST", "on")  # forced low precision: never bf16 below 8.0
    assert Speed.for_device("cuda").precision == ("bf16" if capability >= (8, 0) else "fp16")
    monkeypatch.setenv("SEARCH_AUTOCAST", "fp32")
    assert Speed.for_device("cuda").precision == "fp32"


def test_fp16_trains_with_a_grad_scaler_and_resumes_it(monkeypatch, fake_data):
    """fp16 autocast goes with loss scaling (GradScaler), whose scale is part of a checkpoint;
    bf16 and fp32 use none. Run on the CPU, whose autocast and GradScaler take fp16 too."""
    scalers, loaded = [], []

    class Recording(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scalers.append(self)

        def load_state_dict(self, state):
            loaded.append(state)
            super().load_state_dict(state)

    monkeypatch.setattr(torch.amp, "GradScaler", Recording)
    train_set = ImageSet(fake_data.train.images[:256], fake_data.train.labels[:256])
    kwargs = dict(train_data=train_set, val_data=fake_data.val, spec=fake_data.spec, epochs=2,
                  seed=0, device="cpu")
    saved = []
    result = train("cnn3", SMALL_PARAMS, **kwargs, speed=Speed(precision="fp16"),
                   checkpoint=lambda state: saved.append(state()))
    assert scalers[-1].is_enabled() and scalers[-1].get_scale() > 0
    assert all(math.isfinite(m.train_loss) for m in result.history)
    assert saved[0]["scaler"]["scale"] > 0  # the loss scale travels with the checkpoint
    resumed = train("cnn3", SMALL_PARAMS, **kwargs, speed=Speed(precision="fp16"),
                    resume_from=saved[0])
    assert loaded == [saved[0]["scaler"]] and len(resumed.history) == 2
    train("cnn3", SMALL_PARAMS, **kwargs, speed=Speed(precision="bf16"))
    assert not scalers[-1].is_enabled()


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
        epochs = report[pipeline]["epochs"]
        assert len(epochs) == 2
        for key in ("train_images_per_second", "val_images_per_second"):
            # The figure is the measured epoch's (the first is warm-up), and a real rate.
            assert report[pipeline][key] == epochs[1][key] > 0
    assert report["ratio"]["train"] == pytest.approx(
        report["ours"]["train_images_per_second"] / report["baseline"]["train_images_per_second"])
    assert report["baseline"]["workers"] == 0 and report["baseline"]["transforms"] == "torchvision"
    assert set(report["speed"]) == {"channels_last", "precision", "compile", "eval_batch_size"}
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


def test_search_compile_still_compiles_the_fifth_trial(monkeypatch, fake_data):
    """SEARCH_COMPILE: each trial's new model used to add graphs to dynamo's cache until its
    recompile limit (8), after which trial 4 (the fifth) and every later one ran eager without a
    word. The trainer resets dynamo per trial. Dynamo runs here on the CPU with a counting
    "eager" backend instead of inductor, whose C++ compilation would cost tens of seconds per
    trial: what is tested is dynamo's cache, which is the same for every backend."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: real_compile(model, backend=counter))
    train_set = ImageSet(fake_data.train.images[:128], fake_data.train.labels[:128])
    val_set = ImageSet(fake_data.val.images[:128], fake_data.val.labels[:128])
    compiled = []
    for number in range(5):  # trials 0..4, each with its own model, as a study's are
        before = counter.frame_count
        train("cnn3", {**SMALL_PARAMS, "width_1": 8 + 4 * number}, train_data=train_set,
              val_data=val_set, spec=fake_data.spec, epochs=1, seed=number, device="cpu",
              speed=Speed(compile="default"))
        compiled.append(counter.frame_count - before)
    assert all(frames > 0 for frames in compiled), compiled  # trial 4 too
