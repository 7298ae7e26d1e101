"""What only a real GPU can show, run by `benchmarks/gpu_check.sh` (`pytest -m cuda`) and skipped
elsewhere. The same paths are tested on the CPU with the CUDA facts mocked (test_speed,
test_trainer, test_study, test_devices, test_predict); these check that the mocks told the
truth: the chosen precision trains, a checkpoint resumes on the GPU, out-of-memory frees the
card, and the exported model runs there.

None of these has run yet: no GPU was available to the work that wrote them (see docs/gpus.md
for what has and has not run on real hardware)."""

from __future__ import annotations

import gc
import io
import math
import weakref

import pytest
import torch
from helpers import SMALL_PARAMS, TINY, overriding

from search.config.errors import SearchError
from search.config.settings import load_config
from search.runner.objective import Objective, TrialFailed
from search.storage.studies import open_study
from search.training import loop as loop_module
from search.training.classifier import class_scores, classifier_from_state
from search.training.loop import (
    Speed,
    best_precision,
    cuda_rng_state,
    resolve_device,
    restore_cuda_rng,
    train,
)
from search.training.models import build_model
from search.training.results import ModelCard

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda:0")


def test_the_devices_precision_trains(fake_data):
    major, _ = torch.cuda.get_device_capability(CUDA)
    assert best_precision(CUDA) == ("bf16" if major >= 8 else "fp16" if major >= 7 else "fp32")
    for precision in sorted({best_precision(CUDA), "fp16", "fp32"}):
        result = train("cnn3", SMALL_PARAMS, train_data=fake_data.train, val_data=fake_data.val,
                       spec=fake_data.spec, epochs=3, seed=0, device=CUDA,
                       speed=Speed(channels_last=True, precision=precision))
        assert all(math.isfinite(m.train_loss) for m in result.history), precision
        assert result.history[-1].val_accuracy > 0.3, precision  # chance is 0.1


def test_a_checkpoint_resumes_on_the_gpu_with_its_own_generator_state(fake_data):
    kwargs = dict(train_data=fake_data.train, val_data=fake_data.val, spec=fake_data.spec,
                  epochs=3, seed=5, device=CUDA)
    saved = io.BytesIO()

    def after(state):
        snapshot = state()
        if snapshot["epoch"] == 1:
            assert isinstance(snapshot["cuda_rng"], torch.Tensor)  # one device's state
            torch.save(snapshot, saved)

    train("cnn3", SMALL_PARAMS, **kwargs, checkpoint=after, on_epoch=lambda m: m.epoch == 2)
    saved.seek(0)
    resumed = train("cnn3", SMALL_PARAMS, **kwargs,
                    resume_from=torch.load(saved, weights_only=True, map_location="cpu"))
    assert [m.epoch for m in resumed.history] == [1, 2, 3]
    state = cuda_rng_state(CUDA)
    torch.rand(3, device=CUDA)
    restore_cuda_rng(state, CUDA)
    assert torch.equal(cuda_rng_state(CUDA), state)


def test_out_of_memory_hands_the_memory_back(storage, monkeypatch, fake_data):
    """A real CUDA OOM in a trial's first forward pass: the trial fails alone, its model is gone
    and the allocator's cache is handed back before the next trial starts."""
    models, at_start = [], []
    real_build = loop_module.build_model

    def exhaust(module, inputs):
        torch.empty(1 << 50, dtype=torch.uint8, device=CUDA)  # 1 PiB: a real OutOfMemoryError

    def build_model(*args, **kwargs):
        at_start.append(([ref() is not None for ref in models], torch.cuda.memory_reserved(CUDA)))
        model = real_build(*args, **kwargs)
        if not models:
            model.register_forward_pre_hook(exhaust)
        models.append(weakref.ref(model))
        return model

    monkeypatch.setattr(loop_module, "build_model", build_model)
    torch.cuda.empty_cache()
    reserved_before = torch.cuda.memory_reserved(CUDA)
    config = load_config(overriding([f"storage={storage}", "epochs=1", *TINY], "device=cuda"))
    study, _, _ = open_study(config)
    study.optimize(Objective(config, fake_data, CUDA), n_trials=2, catch=(TrialFailed,))
    assert study.trials[0].user_attrs["fail_reason"].startswith("out of memory")
    assert study.trials[1].state.name == "COMPLETE"
    alive, reserved = at_start[1]
    assert alive == [False] and reserved <= reserved_before + (64 << 20)
    gc.collect()


def test_the_exported_model_runs_on_the_gpu(fake_data):
    spec = fake_data.spec
    card = ModelCard("cnn3", SMALL_PARAMS, spec.name, spec.channels, spec.image_size, spec.mean,
                     spec.std, spec.classes, "cnn3", 0, "rank 1", 0, 1, 1, 0.5, 0.5, 1.0)
    network = build_model("cnn3", SMALL_PARAMS, in_channels=3, image_size=32, num_classes=10)
    model = classifier_from_state(card, network.state_dict())
    exported = torch.export.export(model, (torch.zeros(2, 3, 32, 32, dtype=torch.uint8),),
                                   dynamic_shapes=[{0: torch.export.Dim.AUTO}]).module()
    images = fake_data.val.images[:64]
    on_gpu = exported.to("cuda")(images.to("cuda"))
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), class_scores(model, images), atol=1e-3)
    assert torch.allclose(class_scores(model.to("cuda"), images), class_scores(model.cpu(), images),
                          atol=1e-3)


def test_device_words_on_this_machine():
    count = torch.cuda.device_count()
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(f"cuda:{count - 1}") == torch.device(f"cuda:{count - 1}")
    with pytest.raises(SearchError, match=f"cuda:{count}"):
        resolve_device(f"cuda:{count}")
