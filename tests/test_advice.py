"""What the report says to do next (`search.analysis.advice`, `next_study`): studies built with
ask/tell on known functions (no training), so the right answer is known."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.analysis import ReportOptions, StudySource, write_report
from search.analysis.advice import classify_curve, epoch_advice, next_steps
from search.analysis.next_study import FILE, next_study_yaml
from search.config.settings import StudyConfig, load_config
from search.config.space import suggest
from search.storage.studies import open_study
from search.storage.trials import TrialAttr

FIXED = """
  weight_decay: 1.0e-6
  batch_size: 128
  schedule: none
  augment: false
  width_1: 8
  width_2: 8
  width_3: 16
  hidden_1: 32
  hidden_2: 0
  batch_norm: true
"""


def study_config(tmp_path: Path, space: str, n_trials: int = 24) -> StudyConfig:
    """A cnn3 study file with `space` (YAML lines under `space:`), loaded by the real check."""
    file = tmp_path / "known.yaml"
    searched = {line.split(":")[0].strip() for line in space.splitlines()}
    fixed = "".join(f"{line}\n" for line in FIXED.splitlines()
                    if line.strip() and line.split(":")[0].strip() not in searched)
    file.write_text(f"model: cnn3\ndataset: fake\nepochs: 4\nn_trials: {n_trials}\n"
                    f"sampler: {{name: random}}\npruner: {{name: none}}\nspace:\n{space}{fixed}"
                    "baselines: []\n")
    return load_config([f"study={file}", f"storage=sqlite:///{tmp_path / 'optuna.db'}",
                        "tracking_uri=none"])


def run_known(config: StudyConfig, objective, n: int, stored: bool = False,
              study: optuna.Study | None = None) -> optuna.Study:
    """`n` trials sampled from the config's space (random, seeded) and told objective(params):
    a number, or a fail_reason string for a trial that failed. In memory unless `stored` (then
    created in the config's storage as search.run creates it)."""
    sampler = optuna.samplers.RandomSampler(seed=0)
    if stored:
        study, _, _ = open_study(config)
        study.sampler = sampler
    elif study is None:
        study = optuna.create_study(study_name=config.study_name, direction="maximize",
                                    sampler=sampler)
    for _ in range(n):
        trial = study.ask()
        params = suggest(trial, config.space)
        value = objective(params)
        if isinstance(value, str):
            trial.set_user_attr(TrialAttr.FAIL_REASON, value)
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, value)
    return study


def lr_peak(lr: float, optimum: float, height: float = 0.9, sharpness: float = 0.05) -> float:
    return height - sharpness * (math.log10(lr) - math.log10(optimum)) ** 2


# ---------------------------------------------------------------- boundaries and fixing

LR_SHORT = """
  optimizer: adam
  lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
  dropout: {type: float, low: 0.0, high: 0.5}
"""


def test_a_range_short_of_the_optimum_is_widened_to_it_and_an_irrelevant_one_fixed(tmp_path):
    config = study_config(tmp_path, LR_SHORT)
    study = run_known(config, lambda p: lr_peak(p["lr"], optimum=5e-3), 24, stored=True)
    steps = next_steps(study, config)
    assert steps.too_small is None
    lr = next(b for b in steps.boundaries if b.param == "lr")
    assert lr.side == "high" and lr.near_high >= math.ceil(0.6 * len(lr.top))
    assert lr.proposed[1] >= 5e-3 > lr.high                      # covers the optimum
    assert lr.proposed[0] <= min(lr.top)                          # keeps the best trials
    dropout = next(b for b in steps.boundaries if b.param == "dropout")
    assert dropout.side is None and not dropout.changed
    [fix] = [c for c in steps.choices if c.param == "dropout"]
    assert (fix.action, fix.why) == ("fix", "does not matter") and fix.importance < 0.05

    # The next study, written, is checked by the real config loader and warm-starts from this one.
    file = tmp_path / FILE
    file.write_text(next_study_yaml(config, steps))
    text = file.read_text()
    assert "lr: {type: float, low:" in text and "# changed:" in text.split("lr:")[1].splitlines()[0]
    following = load_config([f"study={file}"])
    lr_next = next(s for s in following.space if s.name == "lr")
    assert lr_next.low <= 5e-3 <= lr_next.high and lr_next.log
    assert next(s for s in following.space if s.name == "dropout").kind == "fixed"
    assert following.study_name == "known-next" and following.warm_start == ("known",)
    assert following.storage == config.storage and following.model == config.model
    created, _, _ = open_study(following)
    queued = [t for t in created.get_trials() if t.state == TrialState.WAITING]
    assert [t.user_attrs[TrialAttr.WARM_START].split("#")[0] for t in queued] == ["known"] * 3
    best = max(study.trials, key=lambda t: t.value or -1)
    assert queued[0].system_attrs["fixed_params"]["lr"] == best.params["lr"]


def test_few_trials_rising_towards_an_edge_are_flagged_by_their_trend(tmp_path):
    """8 trials (the real Fashion-MNIST study's lr values): only the best is in the high edge,
    but accuracy rises with lr all the way to it."""
    config = study_config(tmp_path, LR_SHORT.replace("1.0e-3", "1.0e-4"))
    values = iter([1.2e-5, 2.6e-5, 2.7e-5, 3.5e-5, 3.7e-5, 4.0e-5, 6.2e-5, 9.2e-5])
    study = optuna.create_study(direction="maximize")
    for lr in values:
        study.enqueue_trial({"lr": lr, "dropout": 0.25})
    study = run_known(config, lambda p: lr_peak(p["lr"], optimum=1e-3), 8, study=study)
    lr = next(b for b in next_steps(study, config).boundaries if b.param == "lr")
    assert (lr.near_high, len(lr.top)) == (1, 3) and lr.trend > 0.9
    assert lr.side == "high" and lr.proposed[1] == pytest.approx(1e-3)


PER_OPTIMIZER = """
  optimizer: {type: categorical, choices: [sgd, adam, rmsprop]}
  lr: {type: float, log: true, ranges: {optimizer: {sgd: [1.0e-2, 0.3], adam: [1.0e-4, 1.0e-3],
       rmsprop: [1.0e-5, 1.0e-3]}}}
  momentum: {type: float, low: 0.5, high: 0.99, when: {optimizer: [sgd, rmsprop]}}
  alpha: {type: float, low: 0.9, high: 0.999, when: {optimizer: rmsprop}}
"""


def per_optimizer(params):
    if params["optimizer"] == "rmsprop":
        return 0.5
    if params["optimizer"] == "sgd":
        return lr_peak(params["lr"], 5e-2, height=0.93, sharpness=0.3)
    return lr_peak(params["lr"], 4e-3, height=0.95)


def test_a_range_per_optimizer_is_judged_per_optimizer_and_a_losing_choice_dropped(tmp_path):
    config = study_config(tmp_path, PER_OPTIMIZER, n_trials=45)
    study = run_known(config, per_optimizer, 45)
    steps = next_steps(study, config)
    by_group = {b.group: b for b in steps.boundaries if b.param == "lr"}
    assert by_group["optimizer=adam"].side == "high"              # adam's optimum is above 1e-3
    assert by_group["optimizer=adam"].proposed[1] >= 4e-3
    assert by_group["optimizer=sgd"].side is None                 # sgd's is inside its range
    assert not by_group["optimizer=sgd"].changed
    [drop] = [c for c in steps.choices if c.param == "optimizer"]
    assert (drop.action, drop.choice, drop.in_top) == ("drop", "rmsprop", 0)
    assert drop.taken >= 3
    file = tmp_path / FILE
    file.write_text(next_study_yaml(config, steps))
    following = load_config([f"study={file}"])
    optimizer, lr = (next(s for s in following.space if s.name == n) for n in ("optimizer", "lr"))
    assert optimizer.choices == ("sgd", "adam")
    assert {v for v, _, _ in lr.ranges} == {"sgd", "adam"}       # rmsprop's range went with it
    assert "alpha" not in {s.name for s in following.space}       # only rmsprop used it
    assert dict((v, (lo, hi)) for v, lo, hi in lr.ranges)["adam"][1] >= 4e-3


# ---------------------------------------------------------------- infeasible regions

LR_UNSTABLE = """
  optimizer: sgd
  lr: {type: float, low: 1.0e-3, high: 0.3, log: true}
"""


def test_a_region_that_always_diverges_is_not_widened_into(tmp_path):
    config = study_config(tmp_path, LR_UNSTABLE)

    def unstable(params):  # better and better up to 0.2, where training diverges
        return "diverged: loss nan at epoch 1" if params["lr"] >= 0.2 else lr_peak(params["lr"], 1.0)

    study = run_known(config, unstable, 30)
    steps = next_steps(study, config)
    [region] = steps.regions
    assert (region.param, region.side, region.kind) == ("lr", "high", "stability")
    assert region.start >= 0.2 and region.failed >= 3 and region.failed == region.total
    assert region.reasons == (("diverged", region.failed),)
    [lr] = steps.boundaries
    assert lr.side == "high"                                      # the best sit at the edge ...
    assert "failed" in lr.blocked                                 # ... but it is not widened
    assert lr.narrowed_by == region
    assert region.last_feasible < lr.proposed[1] < region.start   # cut back before the region
    file = tmp_path / FILE
    file.write_text(next_study_yaml(config, steps))
    assert load_config([f"study={file}"]).space[1].high < region.start  # no trial there trained


def test_models_over_the_size_budget_are_a_size_limit(tmp_path):
    config = study_config(tmp_path, "  optimizer: adam\n  lr: 1.0e-3\n"
                                    "  hidden_1: {type: int, low: 16, high: 1024, log: true}\n")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    for _ in range(24):
        trial = study.ask()
        hidden = suggest(trial, config.space)["hidden_1"]
        if hidden > 500:  # as the objective records a model over max_params: pruned, untrained
            trial.set_user_attr(TrialAttr.OVER_BUDGET, hidden * 1000)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, 0.8 + hidden / 10_000)
    steps = next_steps(study, config)
    [region] = steps.regions
    assert (region.side, region.kind, region.reasons[0][0]) == ("high", "size", "over max_params")
    [hidden] = steps.boundaries
    assert hidden.proposed[1] < region.start and isinstance(hidden.proposed[1], int)


def test_numeric_choices_whose_best_take_the_largest_get_the_next_value(tmp_path):
    """Batch sizes and widths are categorical in the shipped studies: numeric all the same."""
    config = study_config(tmp_path, "  optimizer: adam\n  lr: 1.0e-3\n"
                                    "  width_3: {type: categorical, choices: [16, 32, 64]}\n"
                                    "  kernel_size_1: {type: categorical, choices: [3, 5, 7]}\n")
    study = run_known(config, lambda p: 0.5 + p["width_3"] / 100 + p["kernel_size_1"] / 100, 16)
    findings = next_steps(study, config).choices
    [width] = [c for c in findings if c.param == "width_3"]
    assert width[:3] == ("width_3", "add", 128) and width.edge == 64
    kernel = [c for c in findings if c.param == "kernel_size_1"]
    assert kernel and "add" not in {c.action for c in kernel}  # 9 is no kernel size the code knows
    file = tmp_path / FILE
    file.write_text(next_study_yaml(config, next_steps(study, config)))
    widths = next(s for s in load_config([f"study={file}"]).space if s.name == "width_3")
    assert widths.choices == (16, 32, 64, 128)


def test_a_password_in_the_storage_url_stays_out_of_the_next_study(tmp_path):
    config = study_config(tmp_path, LR_SHORT)
    study = run_known(config, lambda p: lr_peak(p["lr"], optimum=5e-3), 12)
    secret = load_config([f"study={tmp_path / 'known.yaml'}", "tracking_uri=none",
                          "storage=postgresql://search:s3cret@127.0.0.1:5432/optuna"])
    text = next_study_yaml(secret, next_steps(study, secret))
    assert "s3cret" not in text and "# storage: give storage= on the command line" in text


def test_the_bounds_never_leave_the_registry(tmp_path):
    config = study_config(tmp_path, "  optimizer: adam\n  lr: 1.0e-3\n"
                                    "  dropout: {type: float, low: 0.0, high: 0.9}\n")
    study = run_known(config, lambda p: 0.5 + 0.4 * p["dropout"], 16)
    [dropout] = next_steps(study, config).boundaries
    assert dropout.side == "high" and 0.9 < dropout.proposed[1] < 1.0   # dropout is in [0, 1)


# ---------------------------------------------------------------- too small to judge

def test_a_study_too_small_to_judge_says_so_and_advises_nothing(tmp_path):
    config = study_config(tmp_path, LR_SHORT)
    study = run_known(config, lambda p: lr_peak(p["lr"], optimum=5e-3), 5)
    steps = next_steps(study, config)
    assert steps.too_small.startswith("5 complete trial(s) for 2 searched parameter(s)")
    assert steps.boundaries == () and steps.choices == () and steps.curves == ()
    assert steps.n_trials > config.n_trials


# ---------------------------------------------------------------- training curves

def curve_trial(val_accuracy, val_loss=None, train_loss=None):
    epochs = [{"epoch": i + 1, "val_accuracy": a,
               **({"val_loss": val_loss[i], "train_loss": train_loss[i]} if val_loss else {})}
              for i, a in enumerate(val_accuracy)]
    return optuna.trial.create_trial(value=val_accuracy[-1], user_attrs={TrialAttr.EPOCHS: epochs})


@pytest.mark.parametrize("accuracy, val_loss, train_loss, verdict", [
    ([0.60, 0.70, 0.76, 0.80, 0.83, 0.86], None, None, "still improving"),
    ([0.70, 0.78, 0.80, 0.80, 0.79, 0.79], [0.8, 0.6, 0.55, 0.62, 0.70, 0.80],
     [0.9, 0.6, 0.45, 0.35, 0.25, 0.18], "overfitting"),
    ([0.80, 0.85, 0.851, 0.852, 0.851, 0.852, 0.851, 0.852], None, None, "saturated early"),
    ([0.70, 0.80, 0.82, 0.85, 0.81, 0.86, 0.80, 0.85], None, None, "noisy late"),
    ([0.80, 0.85], None, None, "too short to judge"),
])
def test_training_curves_are_read_as_the_playbook_reads_them(accuracy, val_loss, train_loss,
                                                             verdict):
    curve = classify_curve(curve_trial(accuracy, val_loss, train_loss), budget=len(accuracy))
    assert curve.verdict == verdict, curve.evidence
    assert curve.evidence


def test_the_epoch_budget_follows_the_best_curves():
    rising = [classify_curve(curve_trial([0.6, 0.7, 0.76, 0.8 + d]), 4) for d in (0, .01, .02)]
    assert epoch_advice(rising, 4)[:2] == (4, 8)
    flat = [classify_curve(curve_trial([0.80, 0.85, 0.851, 0.852, 0.851, 0.852, 0.851, 0.852]), 8)]
    assert epoch_advice(flat, 8)[:2] == (8, 4)


# ---------------------------------------------------------------- the report

def test_the_report_opens_with_what_to_do_next_and_writes_the_next_study(tmp_path):
    config = study_config(tmp_path, LR_SHORT)
    study = run_known(config, lambda p: lr_peak(p["lr"], optimum=5e-3), 24, stored=True)
    report = write_report(StudySource(config, study), ReportOptions(out=tmp_path / "reports"),
                          log=lambda line: None)
    markdown = report.markdown.read_text()
    assert markdown.index("## What to do next") < markdown.index("## Summary")
    section = markdown[markdown.index("## What to do next"):markdown.index("## Summary")]
    assert "lr: best trials at the high edge" in section and "dropout: does not matter" in section
    assert "next_ranges.png" in section and (report.folder / "next_ranges.png").is_file()
    assert report.next_study == report.folder / FILE
    assert load_config([f"study={report.next_study}"]).warm_start == ("known",)
    assert "What to do next" in report.html.read_text()
