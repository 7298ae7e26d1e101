"""Accuracy check: the study's baseline configuration trained on real Fashion-MNIST.

    python benchmarks/accuracy_fashion_mnist.py [model=cnn3|resnet20] [epochs=10] [device=auto]
                                                [out=benchmarks/results/accuracy_MODEL.json]

Speed must not be bought with worse models: this trains the first `baselines:` entry of
`studies/MODEL.yaml` with the trainer exactly as a trial does (same fast paths, same seed rule,
the search's own 55k/5k train/validation split of the Fashion-MNIST training set; the test set is
not touched) and prints validation accuracy and time per epoch. The idx files come from Debian's
`dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist) or `data_dir`.
Targets (issue "Fast trials"): cnn3 >= 91% and resnet20 >= 92% validation accuracy within 10 epochs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from search.config.command_line import main_guard
from search.config.errors import SearchError
from search.config.settings import load_config
from search.training.images import load_search_data
from search.training.loop import Speed, resolve_device, train
from search.training.results import EpochMetrics, trial_seed

TARGETS = {"cnn3": 0.91, "resnet20": 0.92}


def main(argv: list[str]) -> int:
    settings = {"model": "cnn3", "epochs": 10, "device": "auto", "data_dir": "data", "out": None}
    for word in argv:
        key, sep, value = word.partition("=")
        if not sep or key not in settings:
            raise SearchError(f"'{word}': expected key=value with key in {', '.join(settings)}.")
        settings[key] = value
    model = settings["model"]
    epochs = int(settings["epochs"])
    # The study's own config on Fashion-MNIST: same split, same seed rule, baseline parameters.
    config = load_config([f"study={model}", "dataset=fashion_mnist", f"epochs={epochs}",
                          f"data_dir={settings['data_dir']}", f"device={settings['device']}"])
    params = dict(config.baselines[0])
    device = resolve_device(config.device)
    data = load_search_data(config.dataset, config.data_dir, val_size=config.val_size,
                            seed=config.seed)
    out = Path(settings["out"] or f"benchmarks/results/accuracy_{model}.json")
    print(f"{model} baseline on fashion_mnist ({len(data.train)} train / {len(data.val)} val), "
          f"{epochs} epochs on {device}, {Speed.for_device(device)}", flush=True)
    print(f"params: {params}", flush=True)
    started = time.perf_counter()
    history: list[dict] = []

    def on_epoch(metrics: EpochMetrics) -> bool:
        history.append({"epoch": metrics.epoch, "val_accuracy": metrics.val_accuracy,
                        "train_loss": metrics.train_loss, "epoch_seconds": metrics.epoch_seconds,
                        "images_per_second": metrics.images_per_second,
                        "elapsed_seconds": time.perf_counter() - started})
        print(f"epoch {metrics.epoch:>2}: val_accuracy {metrics.val_accuracy:.4f}  train_loss "
              f"{metrics.train_loss:.4f}  {metrics.epoch_seconds:.0f} s  "
              f"{metrics.images_per_second:,.0f} train images/s", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": model, "dataset": "fashion_mnist", "device": str(device),
                                   "params": params, "epochs_planned": epochs, "history": history,
                                   "target": TARGETS[model]}, indent=2) + "\n")
        return False

    result = train(model, params, train_data=data.train, val_data=data.val, spec=data.spec,
                   epochs=epochs, seed=trial_seed(config.seed, 0), device=device, on_epoch=on_epoch)
    best = result.best_val_accuracy or 0.0
    first = next((m.epoch for m in result.history if (m.val_accuracy or 0) >= TARGETS[model]), None)
    print(f"best val_accuracy {best:.4f} (epoch {result.best_epoch}); target {TARGETS[model]:.0%} "
          + (f"reached at epoch {first}" if first else "not reached")
          + f"; {time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
