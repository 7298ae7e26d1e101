"""Every hyperparameter a trial can have, known in one place: its type and valid values, its
meaning, its default, how it is shown, and which part of the code reads it.

Config validation (a space entry must stay inside the valid values), the dry run (which
parameters make a model bigger), progress lines (which parameters a person scans first, and
their format), the model and optimizer builders (defaults, checks) and the report all ask this
module. Adding a parameter means one `Param` here, its default in the table of whoever reads it
(`TRAINER`, `OPTIMIZERS` or `MODELS`), and the code that uses it. Torch-free, so the config and
the command line can check a study without importing PyTorch.

Example:
    >>> PARAMS["dropout"].problem(1.5)
    'must be a number in [0, 1)'
    >>> model_settings("cnn3", {"width_1": 16, "lr": 0.1})["width_1"]
    16
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from search.config.errors import SearchError, shown

# The kinds of value, one vocabulary for the registry and the space: a space entry's `type:` is
# one of the distributions Optuna samples (its words); a parameter is one of those or a bool
# (which a space searches as {type: categorical, choices: [true, false]}).
DISTRIBUTIONS = ("float", "int", "categorical")
KINDS = (*DISTRIBUTIONS, "bool")


def is_finite(value: int | float) -> bool:
    """math.isfinite, but False for a whole number too large for a float (too large for any
    parameter or bound here), where math.isfinite raises."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass(frozen=True)
class Param:
    """What one hyperparameter may be.

    Attributes:
        name: The name in study files, overrides, Optuna, the dashboard and MLflow.
        kind: One of `KINDS`: "float", "int" (a whole number), "categorical" (one of
            `choices`) or "bool".
        help: What it means, for --help, the report and the dashboard note.
        low, high: Bounds of a number (None: unbounded on that side).
        low_open, high_open: Whether the bound itself is excluded (dropout < 1, lr > 0).
        choices: The values a "categorical" parameter may take.
        grows_model: Larger values make a bigger model (the dry run builds the extremes).
        headline: Shown first in a trial's one-line summary, in registry order.
    """

    name: str
    kind: str
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] = ()
    grows_model: bool = False
    headline: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}")

    def valid(self) -> str:
        """The valid values in words: '[0, 1)', 'an integer >= 1', 'one of relu, silu'."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "categorical":
            return "one of [" + ", ".join(str(c) for c in self.choices) + "]"
        noun = "an integer" if self.kind == "int" else "a number"
        if self.low == 0 and self.low_open and self.high is None:
            return f"a positive {noun.split()[1]}"
        if self.low is not None and self.high is not None:
            return (f"{noun} in {'(' if self.low_open else '['}{self.low:g}, "
                    f"{self.high:g}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        return noun

    def problem(self, value: Any) -> str | None:
        """Why `value` is not valid for this parameter, or None when it is."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"must be {self.valid()}"
        if self.kind == "categorical":
            ok = any(value == c and type(value) is type(c) for c in self.choices)
            return None if ok else f"must be {self.valid()}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {self.valid()}"
        if not is_finite(value) or (self.kind == "int" and value != int(value)):
            return f"must be {self.valid()}"
        if self._below(value) or self._above(value):
            return f"must be {self.valid()}"
        return None

    def _below(self, value: float) -> bool:
        return self.low is not None and (value <= self.low if self.low_open else value < self.low)

    def _above(self, value: float) -> bool:
        return self.high is not None and (value >= self.high if self.high_open else value > self.high)

    def check(self, value: Any, key: str | None = None) -> Any:
        """Returns `value`, or raises SearchError naming `key` (default: the name) and what is valid."""
        problem = self.problem(value)
        if problem:
            raise SearchError(f"{key or self.name}={shown(value)}: {self.name} {problem}.")
        return int(value) if self.kind == "int" else value

    def format(self, value: Any) -> str:
        """The short form of a value in progress lines: 4 significant digits for floats."""
        return f"{value:.4g}" if isinstance(value, float) else str(value)


def _unit(name: str, help: str, **kw: Any) -> Param:
    """A probability-like parameter: a number in [0, 1)."""
    return Param(name, "float", help, low=0.0, high=1.0, high_open=True, **kw)


KERNEL_SIZES = (3, 5, 7)  # odd, so k // 2 padding keeps the size ("same")
# Each activation's name and the `torch.nn` module that computes it (named, not imported: this
# layer stays torch-free; `search.training.models` looks them up).
ACTIVATIONS = {"relu": "ReLU", "leaky_relu": "LeakyReLU", "silu": "SiLU",
               "swish": "SiLU",  # the same function under its other common name
               "gelu": "GELU"}

# In the order a person scans a trial: the headline parameters first.
_ALL = (
    Param("optimizer", "categorical", "the optimizer; each has its own parameters below",
          choices=("sgd", "adam", "adamw", "rmsprop", "adagrad"), headline=True),
    Param("lr", "float", "learning rate (peak, before the schedule)", low=0.0, low_open=True,
          headline=True),
    Param("batch_size", "int", "training images per step", low=1, high=65536, grows_model=True,
          headline=True),
    Param("weight_decay", "float", "L2 penalty on conv/linear weights (not on BN or biases)",
          low=0.0, headline=True),
    _unit("momentum", "momentum of SGD and RMSprop"),
    Param("nesterov", "bool", "Nesterov momentum (SGD)"),
    _unit("beta1", "Adam/AdamW first-moment decay"),
    _unit("beta2", "Adam/AdamW second-moment decay"),
    _unit("alpha", "RMSprop smoothing constant"),
    Param("schedule", "categorical", "learning-rate schedule over the epoch budget, per step",
          choices=("none", "cosine", "step")),
    Param("step_size", "int", "epochs between decays of the step schedule", low=1, high=100_000),
    Param("gamma", "float", "decay factor of the step schedule", low=0.0, low_open=True, high=1.0),
    Param("decoupled", "bool", "airbench94's parametrisation: lr and weight_decay are per 1024 "
          "examples, so lr is scaled by batch_size/1024 and the decay per step does not depend "
          "on lr; the knobs then barely interact"),
    Param("augment", "bool", "random 4-pixel crops and horizontal flips"),
    _unit("label_smoothing", "label smoothing of the cross-entropy loss"),
    *(Param(f"kernel_size_{i}", "categorical", f"kernel size of cnn3's conv block {i}",
            choices=KERNEL_SIZES, grows_model=True) for i in (1, 2, 3)),
    *(Param(f"width_{i}", "int", f"output channels of cnn3's conv block {i}", low=1, high=4096,
            grows_model=True) for i in (1, 2, 3)),
    Param("hidden_1", "int", "width of cnn3's first hidden layer", low=1, high=16384,
          grows_model=True),
    Param("hidden_2", "int", "width of cnn3's second hidden layer (0: none)", low=0, high=16384,
          grows_model=True),
    _unit("dropout", "dropout before each linear layer of the head"),
    Param("batch_norm", "bool", "batch norm after each conv of cnn3 (else conv biases)"),
    Param("activation", "categorical", "activation function", choices=tuple(ACTIVATIONS)),
    Param("width_multiplier", "float", "scales resnet20's 16/32/64 channels", low=0.0,
          low_open=True, high=16.0, grows_model=True),
    Param("stem_kernel_size", "categorical", "kernel size of resnet20's first conv",
          choices=KERNEL_SIZES, grows_model=True),
)
PARAMS: dict[str, Param] = {p.name: p for p in _ALL}
HEADLINE = tuple(p.name for p in _ALL if p.headline)

# Names people write for these parameters, so an error can point to the right one.
ALIASES = {"learning_rate": "lr", "wd": "weight_decay", "bs": "batch_size", "opt": "optimizer",
           "kernel_size": "kernel_size_1", "width": "width_1", "drop": "dropout"}

# Who reads which parameter, with the default it takes when a space leaves it out.
TRAINER: dict[str, Any] = {
    "optimizer": "sgd", "lr": 0.01, "weight_decay": 0.0, "batch_size": 128, "schedule": "none",
    "step_size": None, "gamma": 0.1, "augment": False, "label_smoothing": 0.0,
    "decoupled": False,
}
# Each optimizer's own parameters (torch's defaults, but SGD with momentum 0.9).
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.9, "nesterov": False},
    "adam": {"beta1": 0.9, "beta2": 0.999},
    "adamw": {"beta1": 0.9, "beta2": 0.999},
    "rmsprop": {"alpha": 0.99, "momentum": 0.0},
    "adagrad": {},
}
MODELS: dict[str, dict[str, Any]] = {
    "cnn3": {"kernel_size_1": 3, "kernel_size_2": 3, "kernel_size_3": 3, "width_1": 32,
             "width_2": 64, "width_3": 128, "hidden_1": 256, "hidden_2": 0, "dropout": 0.1,
             "batch_norm": True, "activation": "relu"},
    "resnet20": {"width_multiplier": 1.0, "stem_kernel_size": 3, "dropout": 0.0,
                 "activation": "relu"},
}


def known_params(model: str) -> tuple[str, ...]:
    """The parameters a study of `model` may search or fix, in registry order."""
    used = set(TRAINER) | {n for args in OPTIMIZERS.values() for n in args} | set(MODELS[model])
    return tuple(name for name in PARAMS if name in used)


def users(name: str) -> tuple[str, ...]:
    """The optimizers that read an optimizer parameter (empty for every other parameter)."""
    return tuple(opt for opt, args in OPTIMIZERS.items() if name in args)


def _settings(names: Iterable[str], params: Mapping[str, Any],
              defaults: Mapping[str, Any]) -> dict[str, Any]:
    settings = {}
    for name in names:
        value = params.get(name, defaults[name])
        settings[name] = value if value is None else PARAMS[name].check(value)
    return settings


def trainer_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer's own settings of a trial, defaults filled in, each checked."""
    return _settings(TRAINER, params, TRAINER)


def optimizer_settings(params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The trial's optimizer and that optimizer's own parameters, defaults filled in."""
    name = PARAMS["optimizer"].check(params.get("optimizer", TRAINER["optimizer"]))
    return name, _settings(OPTIMIZERS[name], params, OPTIMIZERS[name])


def model_settings(model: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The named model's parameters of a trial, defaults filled in, each checked; the keys
    other parts read (lr, batch_size, ...) are ignored."""
    if model not in MODELS:
        raise SearchError(f"unknown model {model!r}; allowed: {', '.join(MODELS)}")
    return _settings(MODELS[model], params, MODELS[model])


def format_params(params: Mapping[str, Any], limit: int = 6) -> str:
    """The headline parameters (optimizer, lr, batch size) first, then the rest, briefly."""
    ordered = [k for k in HEADLINE if k in params] + [k for k in params if k not in HEADLINE]
    shown = [f"{k}={PARAMS[k].format(params[k]) if k in PARAMS else params[k]}"
             for k in ordered[:limit]]
    return " ".join(shown) + (" ..." if len(ordered) > limit else "")
