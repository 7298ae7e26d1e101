"""Which sampler finds good configurations sooner: random, TPE, TPE + Hyperband, GP, and TPE
without the per-optimizer learning-rate ranges or with the decoupled parametrisation, on a cheap
real proxy.

    python benchmarks/samplers.py [trials=10] [repeats=5] [epochs=2] [train_images=4000]
                                  [conditions=random,tpe,tpe_hyperband,gp,tpe_shared_lr,tpe_decoupled]
                                  [out=benchmarks/results/samplers.json]

The proxy is cnn3's search space (studies/cnn3.yaml, without its baseline, so every sampler
starts from nothing; its largest widths and kernels and smallest batches left out, `PROXY`) on real
Fashion-MNIST: a fixed subset of `train_images` images of the
search's training split (seed 0), validated on the search's own 5,000-image validation split,
for `epochs` epochs, on the CPU. Each condition runs `repeats` studies with seeds 0..repeats-1
through the very objective a study uses (`search.runner.objective.Objective`).

It prints, and writes as JSON and a PNG next to it: best validation accuracy so far against
trials and against training seconds (mean and standard deviation over repeats), each
condition's final best, and how many trials each needed, on average, to reach random search's
final best (the speed-up over random). A figure, not a test: nothing is asserted.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from search.config.command_line import command_overrides, main_guard
from search.config.errors import SearchError
from search.config.settings import load_config
from search.runner.objective import Objective, TrialFailed
from search.config.strategies import make_pruner, make_sampler
from search.training.images import ImageSet, SearchData, load_search_data

CONDITIONS: dict[str, list[str]] = {
    "random": ["sampler=random", "pruner=none"],
    "tpe": ["sampler=tpe", "pruner=none"],
    "tpe_hyperband": ["sampler=tpe", "pruner=hyperband"],
    "gp": ["sampler=gp", "pruner=none"],
    # Item 1's control: one lr range shared by every optimizer, as the studies had before.
    "tpe_shared_lr": ["sampler=tpe", "pruner=none", "space.lr.ranges=null",
                      "space.lr.low=1e-4", "space.lr.high=0.3"],
    # Item 1's other option: airbench94's lr and weight decay per 1024 examples. The lr ranges are
    # the studies' own at batch 128 (the proxy's middle batch), so x8; the decay per 1024
    # examples covers what lr x weight_decay x 8 spans in the plain space's useful corner.
    "tpe_decoupled": ["sampler=tpe", "pruner=none", "space.decoupled=true",
                      "space.lr.ranges.optimizer.sgd=[0.08,2.4]",
                      "space.lr.ranges.optimizer.adam=[8e-4,0.024]",
                      "space.lr.ranges.optimizer.adamw=[8e-4,0.024]",
                      "space.lr.ranges.optimizer.rmsprop=[8e-5,8e-3]",
                      "space.lr.ranges.optimizer.adagrad=[8e-3,0.8]",
                      "space.weight_decay.low=1e-8", "space.weight_decay.high=3e-3"],
}
# The proxy keeps cnn3's whole space but its largest widths and smallest batches, which would make
# a 2-core CPU run take hours without saying more about how samplers compare.
PROXY = ["space.width_1.choices=[16,32]", "space.width_2.choices=[32,64]",
         "space.width_3.choices=[64,128]", "space.hidden_1.choices=[128,256]",
         "space.batch_size.choices=[64,128,256]",
         *[f"space.kernel_size_{i}.choices=[3,5]" for i in (1, 2, 3)]]
SETTINGS = {"trials": 10, "repeats": 5, "epochs": 2, "train_images": 4_000,
            "conditions": ",".join(CONDITIONS), "n_startup_trials": 5, "replot": False,
            "out": "benchmarks/results/samplers.json"}


def proxy_data(train_images: int) -> SearchData:
    """A fixed subset of the search's training split, and its whole validation split."""
    full = load_search_data("fashion_mnist", "data", val_size=None, seed=0)
    keep = torch.randperm(len(full.train), generator=torch.Generator().manual_seed(0))[:train_images]
    keep = keep.sort().values
    subset = ImageSet(full.train.images[keep], full.train.labels[keep])
    return SearchData(spec=full.spec, train=subset, val=full.val)


def run_condition(name: str, repeat: int, data: SearchData, settings: dict[str, Any]) -> list[dict]:
    """One study: per trial its state, value (last epoch), best value and training seconds."""
    config = load_config(["study=cnn3", "dataset=fashion_mnist", "baselines=[]", "device=cpu",
                          "tracking_uri=none", f"epochs={settings['epochs']}",
                          f"sampler.n_startup_trials={settings['n_startup_trials']}",
                          f"seed={repeat}", *PROXY, *CONDITIONS[name]])
    study = optuna.create_study(direction="maximize", sampler=make_sampler(config.sampler, repeat),
                                pruner=make_pruner(config.pruner, config.epochs))
    study.optimize(Objective(config, data, torch.device("cpu")), n_trials=settings["trials"],
                   catch=(TrialFailed,))
    return [{"number": t.number, "state": t.state.name, "value": t.value,
             "seconds": t.user_attrs.get("train_seconds", 0.0),
             "epochs_run": t.user_attrs.get("epochs_run", 0),
             "params": t.params} for t in study.trials]


def best_so_far(trials: list[dict]) -> list[float]:
    """Best complete value after each trial (NaN before the first complete one)."""
    best, curve = float("nan"), []
    for trial in trials:
        if trial["state"] == TrialState.COMPLETE.name and trial["value"] is not None:
            best = trial["value"] if best != best else max(best, trial["value"])
        curve.append(best)
    return curve


def summarise(results: dict[str, list[list[dict]]]) -> dict[str, Any]:
    """Per condition: the final best (mean and std over repeats), and when its mean best-so-far
    curve first reaches random search's mean final best, in trials and in training seconds;
    the speed-ups over random are random's trials (seconds) over those."""
    curves = {name: np.array([best_so_far(study) for study in studies])
              for name, studies in results.items() if studies}
    target = float(np.nanmean(curves["random"][:, -1])) if "random" in curves else None
    summary = {}
    for name, curve in curves.items():
        mean = np.nanmean(curve, axis=0)
        seconds = np.mean([np.cumsum([t["seconds"] for t in study]) for study in results[name]],
                          axis=0)
        hits = np.nonzero(mean >= target)[0] if target is not None else []
        reached = int(hits[0]) + 1 if len(hits) else None
        summary[name] = {
            "final_best_mean": float(np.nanmean(curve[:, -1])),
            "final_best_std": float(np.nanstd(curve[:, -1])),
            "best_so_far_mean": mean.tolist(),
            "best_so_far_std": np.nanstd(curve, axis=0).tolist(),
            "training_seconds_mean": float(seconds[-1]),
            "epochs_trained_mean": statistics.fmean(
                sum(t["epochs_run"] for t in study) for study in results[name]),
            "trials_to_reach_random_best": reached,
            "seconds_to_reach_random_best": float(seconds[reached - 1]) if reached else None,
        }
    base = summary.get("random", {})
    for row in summary.values():
        for unit in ("trials", "seconds"):
            mine, theirs = row[f"{unit}_to_reach_random_best"], base.get(f"{unit}_to_reach_random_best")
            row[f"speedup_{unit}"] = theirs / mine if mine and theirs else None
    return {"random_final_best_mean": target, "conditions": summary}


def plot(results: dict[str, list[list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_trial, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, studies in results.items():
        curves = np.array([best_so_far(study) for study in studies])
        mean, std = np.nanmean(curves, axis=0), np.nanstd(curves, axis=0)
        x = np.arange(1, curves.shape[1] + 1)
        by_trial.plot(x, mean, label=name)
        by_trial.fill_between(x, mean - std, mean + std, alpha=0.15)
        seconds = np.mean([np.cumsum([t["seconds"] for t in study]) for study in studies], axis=0)
        by_time.plot(seconds, mean, label=name)
        by_time.fill_between(seconds, mean - std, mean + std, alpha=0.15)
    by_trial.set(xlabel="trials", ylabel="best validation accuracy so far (mean ± std)")
    by_time.set(xlabel="training seconds (mean over repeats)")
    for axes in (by_trial, by_time):
        axes.grid(alpha=0.3)
    by_trial.legend(loc="lower right")
    figure.suptitle("Samplers on Fashion-MNIST (cnn3, proxy: fixed training subset)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def measure(names: list[str], settings: dict[str, Any], out: Path) -> dict[str, list[list[dict]]]:
    """Runs every condition `repeats` times; the JSON is rewritten after every study."""
    data = proxy_data(settings["train_images"])
    results: dict[str, list[list[dict]]] = {name: [] for name in names}
    started = time.perf_counter()
    for repeat in range(settings["repeats"]):  # repeats outermost: a cut-short run is balanced
        for name in names:
            trials = run_condition(name, repeat, data, settings)
            results[name].append(trials)
            best = max((t["value"] for t in trials if t["value"] is not None), default=float("nan"))
            print(f"repeat {repeat} {name:<14} best {best:.4f}  "
                  f"({time.perf_counter() - started:.0f} s so far)", flush=True)
            report = {"settings": settings, "machine": {"cpu_threads": torch.get_num_threads()},
                      "elapsed_seconds": time.perf_counter() - started,
                      "summary": summarise(results), "results": results}
            out.write_text(json.dumps(report, indent=1, default=str))
    return results


def main(argv: list[str]) -> int:
    settings = {**SETTINGS, **command_overrides(argv, "benchmarks/samplers.py", SETTINGS)}
    names = [n for n in str(settings["conditions"]).split(",") if n]
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise SearchError(f"conditions: unknown {unknown[0]}; allowed: {', '.join(CONDITIONS)}.")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    out = Path(settings["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    if settings["replot"]:  # only summarise and draw a finished run again
        results = json.loads(out.read_text())["results"]
        settings["repeats"] = len(next(iter(results.values())))
    else:
        results = measure(names, settings, out)
    summary = summarise(results)
    saved = json.loads(out.read_text())
    out.write_text(json.dumps({**saved, "summary": summary}, indent=1, default=str))
    plot(results, out.with_suffix(".png"))
    print(f"random search's final best (mean over {settings['repeats']} repeats): "
          f"{summary['random_final_best_mean']:.4f}")
    for name, row in summary["conditions"].items():
        reached = row["trials_to_reach_random_best"]
        print(f"  {name:<14} final best {row['final_best_mean']:.4f} ± {row['final_best_std']:.4f}"
              + (f"  reaches random's final best after {reached} trials "
                 f"({row['seconds_to_reach_random_best']:.0f} s): {row['speedup_trials']:.1f}x "
                 f"fewer trials, {row['speedup_seconds']:.1f}x less training time"
                 if reached else "  never reaches random's final best")
              + f"  ({row['training_seconds_mean']:.0f} s of training, "
                f"{row['epochs_trained_mean']:.0f} epochs per study)")
    print(f"written to {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
