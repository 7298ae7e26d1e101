"""Device words and GPU placement: one owner (`search.config.devices`) says which `device=`
values exist and refuses, up front, a word that does not fit this machine, at every door (the
commands exit 2, the API raises SearchError); `gpus=` ids go through a CUDA_VISIBLE_DEVICES the
user set; a worker does not re-check the number of processes its parent accepted. The CUDA facts
(is there CUDA, how many devices) are mocked: no GPU is needed."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from helpers import TINY, overriding

import search
from search.config.command_line import main_guard
from search.config.devices import device_word, place
from search.config.errors import SearchError
from search.config.settings import load_config
from search.predict import main as predict_main
from search.report import main as report_main
from search.run import main as run_main
from search.runner import preflight
from search.runner.preflight import prepare
from search.runner.process import Session
from search.runner.workers import placement
from search.train import main as train_main
from search.training.loop import resolve_device

REFUSED = ["gpu", "GPU", "cuda0", "cuda:", "cuda:-1", "1", "mps", "", "cpu ", "cuda:1234"]


def fake_gpus(monkeypatch, count: int) -> None:
    """This process sees `count` CUDA devices (0: no CUDA at all)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("word", REFUSED)
def test_only_the_four_forms_are_device_words(word):
    with pytest.raises(SearchError, match=r"device=.*unknown device; allowed: auto, cpu, cuda, cuda:N"):
        device_word("device", word)


def test_a_word_is_placed_on_the_machine_or_refused():
    assert [place("device", w, 0) for w in ("auto", "cpu")] == ["cpu", "cpu"]
    assert [place("device", w, 2) for w in ("auto", "cpu", "cuda", "cuda:1")] == [
        "cuda", "cpu", "cuda", "cuda:1"]
    for word in ("cuda", "cuda:0"):
        with pytest.raises(SearchError, match=rf"device={word}: CUDA is not available.*auto, cpu"):
            place("device", word, 0)
    with pytest.raises(SearchError, match=r"device=cuda:2: this machine shows 2 CUDA device.*cuda:0\.\.cuda:1"):
        place("device", "cuda:2", 2)


def test_resolve_device_asks_the_owner_with_this_machines_count(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(SearchError, match="cuda:0..cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(SearchError, match="unknown device"):
        resolve_device("gpu")  # was torch's RuntimeError
    fake_gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")


# ---------------------------------------------------------------- every door


def in_process(body, *args: str) -> int:
    sigterm = signal.getsignal(signal.SIGTERM)  # search.run turns SIGTERM into Ctrl-C
    try:
        return main_guard(body, list(args))
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def test_cuda_beyond_the_device_count_is_refused_before_anything_is_written(monkeypatch, tmp_path,
                                                                             capsys):
    """`device=cuda:N` past the devices used to pass every check and then fail every trial."""
    fake_gpus(monkeypatch, 2)
    storage = tmp_path / "o.db"
    code = in_process(run_main, *overriding(TINY, "device=cuda:2"), f"storage=sqlite:///{storage}")
    err = capsys.readouterr().err
    assert code == 2 and "device=cuda:2: this machine shows 2 CUDA device(s)" in err, err
    assert not storage.exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize(("words", "message"), [
    (["device=gpu"], "device='?gpu'?: unknown device; allowed: auto, cpu, cuda, cuda:N"),
    (["device=cuda"], "device=cuda: CUDA is not available on this machine"),
])
def test_commands_refuse_bad_device_words_with_exit_2(monkeypatch, tmp_path, capsys, words, message):
    fake_gpus(monkeypatch, 0)
    model = tmp_path / "m.pt"
    model.write_bytes(b"")  # never read: the device is refused first
    for body, args in ((predict_main, [f"model={model}", f"images={tmp_path}"]),
                       (run_main, [*TINY, f"storage=sqlite:///{tmp_path / 'o.db'}"]),
                       (train_main, ["study=cnn3", f"storage=sqlite:///{tmp_path / 'o.db'}",
                                     "trial=0"]),
                       (report_main, ["study=cnn3", f"storage=sqlite:///{tmp_path / 'o.db'}",
                                      "retrain=top1"])):
        code = in_process(body, *overriding(args, *words))
        captured = capsys.readouterr()
        assert code == 2 and captured.err.startswith("error: "), (body, captured)
        assert __import__("re").search(message, captured.err), (body, captured.err)
    assert not (tmp_path / "o.db").exists()


def test_api_functions_refuse_bad_device_words_with_search_error(monkeypatch, tmp_path):
    fake_gpus(monkeypatch, 1)
    with pytest.raises(SearchError, match="device='?gpu'?: unknown device"):
        search.load_model(tmp_path / "m.pt", device="gpu")  # was a plain RuntimeError
    with pytest.raises(SearchError, match="device=cuda:1: this machine shows 1 CUDA device"):
        search.load_model(tmp_path / "m.pt", device="cuda:1")
    with pytest.raises(SearchError, match="device='?gpu'?: unknown device"):
        search.open_study("cnn3", storage=f"sqlite:///{tmp_path / 'o.db'}", device="gpu")
    fake_gpus(monkeypatch, 0)
    with pytest.raises(SearchError, match="device=cuda: CUDA is not available"):
        search.load_model(tmp_path / "m.pt", device="cuda")
    assert not (tmp_path / "o.db").exists()


# ---------------------------------------------------------------- gpus= and workers


def test_gpu_ids_go_through_the_users_cuda_visible_devices(monkeypatch):
    """`CUDA_VISIBLE_DEVICES=2,3 gpus=0,1`: the process sees GPUs 2 and 3 as ids 0 and 1, so its
    workers get 2 and 3; before, worker 1 got GPU 1, someone else's."""
    config = load_config(["study=cnn3", "gpus=0,1", "workers_per_gpu=2", "n_trials=8"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in placement(config)] == ["2", "3", "2", "3"]
    uuids = "GPU-aaaa, GPU-bbbb"
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in placement(config, uuids)][:2] == [
        "GPU-aaaa", "GPU-bbbb"]
    with pytest.raises(SearchError, match="CUDA_VISIBLE_DEVICES=5 shows 1 GPU"):
        placement(config, "5")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in placement(config)] == ["0", "1", "0", "1"]


def test_gpus_beyond_the_visible_ones_are_refused(monkeypatch):
    fake_gpus(monkeypatch, 2)
    with pytest.raises(SearchError, match=r"gpus=\[1, 2\]: this process sees 2 GPU\(s\).*no GPU 2"):
        prepare(load_config([*TINY, "gpus=1,2", "n_trials=4"]))


def test_a_worker_does_not_recheck_the_number_its_parent_accepted(monkeypatch, tmp_path):
    """The parent sees 2 GPUs and accepts 16 processes (8 per GPU); each worker sees one GPU and
    would refuse 16 (its own limit is 8 on a 1-core machine). Checked once, in the parent."""
    fake_gpus(monkeypatch, 2)
    monkeypatch.setattr(preflight, "usable_cpus", lambda: 1)
    words = overriding([*TINY, f"storage=sqlite:///{tmp_path / 'o.db'}", "n_trials=16"],
                       "gpus=0,1", "workers_per_gpu=8")
    assert prepare(load_config(words))[0] == torch.device("cuda:0")  # the parent: accepted
    fake_gpus(monkeypatch, 1)  # a worker, with CUDA_VISIBLE_DEVICES set to its GPU
    worker = load_config(overriding(words, *placement(load_config(words))[1][1]))
    assert worker.workers == 16 and worker.device == "cuda:0"
    session = Session.join(worker)
    session.close()
    assert session.device == torch.device("cuda:0")
    with pytest.raises(SearchError, match="workers=16"):  # what a worker used to run into
        prepare(worker)


def test_gpus_need_cuda(monkeypatch, tmp_path):
    fake_gpus(monkeypatch, 0)
    with pytest.raises(SearchError, match="gpus=0: CUDA is not available"):
        prepare(load_config([*TINY, "gpus=0", "n_trials=2"]))
    assert not Path(tmp_path / "o.db").exists()


def test_too_many_workers_are_refused_by_the_cpus_this_process_may_use(monkeypatch, tmp_path):
    """A scheduler's CPU binding (SLURM, taskset) counts, not the machine's cores."""
    monkeypatch.setattr(preflight, "usable_cpus", lambda: 2)
    storage = f"storage=sqlite:///{tmp_path / 'o.db'}"
    limit = preflight.PROCESSES_PER_CORE * 2
    with pytest.raises(SearchError, match=rf"workers={limit + 1}: this process may use 2 CPU "
                                          rf"core\(s\).*at most {limit}"):
        prepare(load_config([*TINY, storage, f"workers={limit + 1}", "n_trials=99"]))
    assert not (tmp_path / "o.db").exists()
