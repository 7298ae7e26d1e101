"""How a study searches: the sampler that proposes a trial's parameters and the pruner that stops
a trial early (pruning is the early stopping: every pruner works on epochs as its resource).

Each sampler and each pruner is declared once, as its name and the function that builds it;
the names `sampler=` and `pruner=` accept are the keys of `SAMPLERS` and `PRUNERS`, and the
keys of the `sampler:` and `pruner:` sections are the fields of `SamplerConfig` and
`PrunerConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import optuna

from search.config.keys import OneOf, Whole, declare


class HyperbandPruner(optuna.pruners.HyperbandPruner):
    """Optuna's Hyperband pruner, minus one storage read per sampled parameter.

    Optuna hands the sampler a fresh per-bracket study for every parameter it samples, and each
    fresh study re-reads every trial from the storage (about 100 ms per trial of cnn3's space
    on SQLite). The bracket study shares the real study's trial cache instead, which Optuna
    refreshes once per trial; the pruning decisions themselves still read the storage.
    """

    def _create_bracket_study(self, study: optuna.Study, bracket_id: int) -> optuna.Study:
        bracket_study = super()._create_bracket_study(study, bracket_id)
        bracket_study._thread_local = study._thread_local
        return bracket_study


class Strategy(NamedTuple):
    """A sampler or a pruner: how it is built from its section and a number (the seed of a
    sampler, the epoch budget of a pruner), and the settings it reads, shown in the report."""

    build: Callable[[Any, int], Any]
    reads: tuple[str, ...] = ()


SAMPLERS: dict[str, Strategy] = {
    # constant_liar keeps parallel workers from proposing the same point.
    "tpe": Strategy(lambda s, seed: optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=s.n_startup_trials, constant_liar=True),
        ("n_startup_trials",)),
    "random": Strategy(lambda s, seed: optuna.samplers.RandomSampler(seed=seed)),
    "gp": Strategy(lambda s, seed: optuna.samplers.GPSampler(
        seed=seed, n_startup_trials=s.n_startup_trials), ("n_startup_trials",)),
}
# Each pruner from its settings and the epoch budget (its max resource).
PRUNERS: dict[str, Strategy] = {
    "hyperband": Strategy(lambda p, epochs: HyperbandPruner(
        min_resource=p.min_resource, max_resource=epochs, reduction_factor=p.reduction_factor),
        ("min_resource", "max_resource", "reduction_factor")),
    "median": Strategy(lambda p, epochs: optuna.pruners.MedianPruner(
        n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps),
        ("n_startup_trials", "n_warmup_steps")),
    "successive_halving": Strategy(lambda p, epochs: optuna.pruners.SuccessiveHalvingPruner(
        min_resource=p.min_resource, reduction_factor=p.reduction_factor),
        ("min_resource", "reduction_factor")),
    # The hand-tuned reports' rule: stop once validation accuracy has not improved for
    # `patience` epochs.
    "patient": Strategy(lambda p, epochs: optuna.pruners.PatientPruner(None, patience=p.patience),
                        ("patience",)),
    "none": Strategy(lambda p, epochs: optuna.pruners.NopPruner()),
}


@dataclass(frozen=True)
class SamplerConfig:
    name: str = declare("proposes each trial's parameters; sampler=NAME sets sampler.name",
                        "tpe", OneOf(tuple(SAMPLERS)))
    n_startup_trials: int = declare("random trials before tpe or gp model the results", 10,
                                    Whole(1))


@dataclass(frozen=True)
class PrunerConfig:
    name: str = declare("stops unpromising trials early, on epochs; patient: no improvement "
                        "for pruner.patience epochs; pruner=NAME sets pruner.name", "hyperband",
                        OneOf(tuple(PRUNERS)))
    min_resource: int = declare("epochs every trial trains before hyperband or "
                                "successive_halving may stop it", 1, Whole(1))
    reduction_factor: int = declare("1/reduction_factor of the trials go on at each rung "
                                    "(hyperband, successive_halving; >= 2)", 3, Whole(1))
    n_startup_trials: int = declare("trials that finish before median prunes any", 5, Whole(1))
    n_warmup_steps: int = declare("epochs before median may stop a trial", 2, Whole(0))
    patience: int = declare("epochs without improvement before patient stops a trial", 5,
                            Whole(1))


def make_sampler(sampler: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    return SAMPLERS[sampler.name].build(sampler, seed)


def make_pruner(pruner: PrunerConfig, epochs: int) -> optuna.pruners.BasePruner:
    return PRUNERS[pruner.name].build(pruner, epochs)


def describe_sampler(sampler: SamplerConfig, seed: int) -> str:
    """`tpe (seed 0, n_startup_trials 10)`: the sampler and the settings it reads."""
    reads = SAMPLERS[sampler.name].reads
    return _described(sampler.name, {"seed": seed} | {n: getattr(sampler, n) for n in reads})


def describe_pruner(pruner: PrunerConfig, epochs: int) -> str:
    """`hyperband (min_resource 1, max_resource 10, reduction_factor 3)`: the pruner and the
    settings it reads (its max resource is the epoch budget)."""
    values = {**asdict(pruner), "max_resource": epochs}
    return _described(pruner.name, {n: values[n] for n in PRUNERS[pruner.name].reads})


def _described(name: str, settings: dict[str, Any]) -> str:
    shown = ", ".join(f"{key} {value}" for key, value in settings.items())
    return f"{name} ({shown})" if shown else name
