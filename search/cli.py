"""What every `python -m search.*` command shares: `--help` text built from the config's own keys,
`--cfg`, and turning a `SearchError` into a clean one-paragraph exit (no traceback)."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable

from typing import Any

from search.config import available_studies, parse_overrides
from search.errors import SearchError

# Shown by --help for every key a study file or an override may set.
KEY_HELP = {
    "study": "study file under studies/ (or a path to a .yaml file)",
    "model": "cnn3 | resnet20",
    "dataset": "cifar10 | cifar100 | fashion_mnist | fake",
    "data_dir": "where datasets live / are downloaded to (default: data)",
    "val_size": "validation images carved from the training set (default: 5000; fake: 256)",
    "epochs": "most epochs a trial trains: the pruner's max resource",
    "n_trials": "finished (complete + pruned) trials the study should have",
    "timeout": "seconds after which no new trial starts (default: none)",
    "seed": "seeds the sampler, the validation split and every trial",
    "device": "auto | cpu | cuda | cuda:N (auto: CUDA when present)",
    "workers": "trial processes run at once against the same storage",
    "storage": "Optuna storage URL (default: sqlite:///mlruns/optuna.db)",
    "study_name": "name in the storage (default: the study file's name)",
    "tracking_uri": "MLflow tracking URI (default: sqlite:///mlruns/mlflow.db); none = off",
    "dry_run": "true: build the smallest and largest model, push one batch, stop",
    "sampler": "tpe | random | gp   (sampler.n_startup_trials=N)",
    "pruner": "hyperband | successive_halving | median | patient | none   (pruner.min_resource, "
              "pruner.reduction_factor, pruner.n_startup_trials, pruner.n_warmup_steps, pruner.patience)",
    "space.NAME.FIELD": "edit a search-space entry: low, high, log, step, choices",
    "space.NAME": "fix a parameter to one value, e.g. space.optimizer=sgd",
}


def help_text(command: str, summary: str, keys: dict[str, str], examples: list[str],
              options: tuple[str, ...] = ("--cfg",)) -> str:
    width = max(len(k) for k in keys) + 2
    flags = "".join(f" [{o}]" for o in (*options, "--help"))
    lines = [f"usage: python -m {command} study=NAME [key=value ...]{flags}", "",
             textwrap.fill(summary, 96), "", "keys:"]
    for key, text in keys.items():
        lines.append(f"  {key:<{width}}{text}")
    studies = available_studies()
    lines += ["", "studies: " + (", ".join(studies) if studies else "none found under ./studies"),
              "", "Values are YAML: lists as [sgd,adam], numbers as 1e-3, booleans as true/false.",
              "", "examples:"]
    lines += [f"  python -m {command} {example}" for example in examples]
    return "\n".join(lines)


def main_guard(body: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Runs a command body; user errors become one paragraph on stderr and exit status 2."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        return body(sys.argv[1:] if argv is None else argv)
    except SearchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def command_overrides(argv: list[str], command: str, keys: dict[str, str]) -> dict[str, Any]:
    """`key=value` words of a command with its own small set of keys (report, train), checked."""
    options = [a for a in argv if a.startswith("-")]
    if options:
        raise SearchError(f"unknown option {options[0]}; options: --help.")
    overrides = dict(parse_overrides(argv))
    unknown = [k for k in overrides if k not in keys]
    if unknown:
        raise SearchError(f"unknown key '{unknown[0]}' for {command}; keys: {', '.join(keys)}.")
    return overrides
