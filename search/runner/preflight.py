"""Everything a run checks before it writes anything: the device and the number of trial
processes, the data, the storage (reachable, writable, an existing study's config unchanged,
warm-start studies present), a size budget that the space can meet, and the tracking store.
A command refused here leaves no storage file, study or MLflow experiment behind."""

from __future__ import annotations

import os
import sys

import torch

from search.config.errors import SearchError
from search.config.params import format_params
from search.config.settings import StudyConfig
from search.storage.checks import check_storage
from search.training.dry_run import extreme_params
from search.training.images import SearchData, load_search_data
from search.training.loop import resolve_device
from search.training.models import model_size


def prepare(config: StudyConfig, *, worker: bool = False) -> tuple[torch.device, SearchData]:
    """Everything that can be checked before anything is written: the device, the data, the
    storage (reachable, writable, and a stored study's config unchanged) and the tracking store.
    A command refused here leaves no storage file, study or MLflow experiment behind.

    A worker (`worker=True`) skips the count of trial processes: its parent checked it once,
    seeing every GPU, while the worker sees only its own (`CUDA_VISIBLE_DEVICES`) and would
    refuse a count its parent accepted.
    """
    device = trial_device(config)
    if not worker:
        check_workers(config, device)
    data = load_search_data(config.dataset, config.data_dir, val_size=config.val_size,
                            seed=config.seed)
    check_storage(config)  # the URL, and an existing study's config and warm starts
    if config.max_params is not None:
        smallest = extreme_params(config.space, largest=False)
        size = model_size(config.model, smallest, data.spec)
        if size > config.max_params:
            raise SearchError(
                f"max_params={config.max_params:,}: the smallest model of this space has "
                f"{size:,} parameters ({format_params(smallest, limit=99)}); raise max_params "
                "or allow smaller models in the space.")
    if config.tracking_enabled:
        from search.tracking.stores import check_tracking  # mlflow imports take ~2 s

        check_tracking(config.tracking_uri, config.study_name)
    return device, data


def trial_device(config: StudyConfig) -> torch.device:
    """The device this process trains on: `device=` placed on this machine (refused up front
    when it names CUDA where there is none, or `cuda:N` beyond the devices this process sees),
    or with `gpus=` the first GPU listed (the main process's slot), each id checked."""
    if config.gpus is None:
        return resolve_device(config.device)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise SearchError(f"gpus={','.join(map(str, config.gpus))}: CUDA is not available on this "
                          "machine; leave gpus out (on a CPU, workers=N splits the cores).")
    missing = [g for g in config.gpus if g >= count]
    if missing:
        raise SearchError(f"gpus={list(config.gpus)}: this process sees {count} GPU(s) "
                          f"(ids 0..{count - 1}); there is no GPU {missing[0]}.")
    return torch.device(f"cuda:{config.gpus[0]}")


PROCESSES_PER_CORE = 4   # beyond this, trial processes only take turns on the CPU
PROCESSES_PER_GPU = 8    # small models: a few processes fill a GPU's idle gaps, more only queue


def usable_cpus() -> int:
    """The CPUs this process may run on: a scheduler's binding (SLURM's task/affinity, a cgroup's
    cpuset, `taskset`) leaves fewer than the machine has, which `os.cpu_count()` counts."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_workers(config: StudyConfig, device: torch.device) -> None:
    """Refuses a number of trial processes that cannot help (a typo such as workers=100000
    would start that many PyTorch processes), before any is started."""
    cores = usable_cpus()
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    limit = max(PROCESSES_PER_CORE * cores, PROCESSES_PER_GPU * gpus)
    if config.workers > config.n_trials:
        raise SearchError(f"workers={config.workers}: more trial processes than trials "
                          f"(n_trials={config.n_trials}); use at most workers={config.n_trials}.")
    if config.workers > limit:
        raise SearchError(
            f"workers={config.workers}: this process may use {cores} CPU core(s)"
            + (f" and {gpus} GPU(s)" if gpus else "") + f", which can hold at most {limit} trial "
            f"processes; more would only take turns. Use workers={min(limit, config.n_trials)} "
            "or fewer.")
    if device.type == "cpu" and config.workers > cores:
        print(f"note: workers={config.workers} on {cores} CPU core(s): the processes share the "
              "cores; on a CPU, workers=1 is usually as fast.", file=sys.stderr)
