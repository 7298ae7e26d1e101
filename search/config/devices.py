"""Device words: the one owner of what `device=` may say, for every command and API function
(`search.run`, `search.train`, `search.report`, `search.predict`, `search.load_model`,
`search.retrain`, `search.open_study`, the workers and the benchmark).

The allowed forms are `auto`, `cpu`, `cuda` and `cuda:N`. Whether a form fits *this* machine
(CUDA present, `N` below the number of CUDA devices) is a fact about the machine, which this
layer does not ask PyTorch for (the config layer imports no torch): the caller that knows it
passes `cuda_count`, as `search.training.loop.resolve_device` does. Every refusal is a
`SearchError` naming the key, the value and what is allowed, so a command exits 2 and an API
function raises `SearchError` before anything is written or loaded.

Example:
    >>> place("device", "auto", cuda_count=0)
    'cpu'
    >>> place("device", "cuda:1", cuda_count=2)
    'cuda:1'
"""

from __future__ import annotations

import re
from typing import Any

from search.config.errors import SearchError, shown

ALLOWED = "auto, cpu, cuda, cuda:N"
_FORM = re.compile(r"auto|cpu|cuda(:\d{1,3})?")


def device_word(key: str, value: Any) -> str:
    """The word's form alone (what a study file or an override may say, on any machine).

    Raises:
        SearchError: not one of `auto`, `cpu`, `cuda`, `cuda:N` (`gpu`, `cuda0`, `1`, ...).
    """
    if not (isinstance(value, str) and _FORM.fullmatch(value)):
        raise SearchError(f"{key}={shown(value)}: unknown device; allowed: {ALLOWED}.")
    return value


def place(key: str, value: Any, cuda_count: int) -> str:
    """Where a device word puts the work on a machine with `cuda_count` CUDA devices: `cpu`,
    `cuda` (the current CUDA device) or `cuda:N`.

    Raises:
        SearchError: a malformed word, a CUDA word on a machine without CUDA, or `cuda:N` with
            `N` beyond the devices this process sees (which every trial would fail on).
    """
    word = device_word(key, value)
    if word == "auto":
        return "cuda" if cuda_count > 0 else "cpu"
    if word == "cpu":
        return word
    if cuda_count <= 0:
        raise SearchError(f"{key}={word}: CUDA is not available on this machine; allowed here: "
                          "auto, cpu.")
    index = int(word.partition(":")[2] or 0)
    if index >= cuda_count:
        raise SearchError(f"{key}={word}: this machine shows {cuda_count} CUDA device(s) "
                          f"(cuda:0..cuda:{cuda_count - 1}); allowed: auto, cpu, cuda, "
                          f"cuda:0..cuda:{cuda_count - 1}.")
    return word
