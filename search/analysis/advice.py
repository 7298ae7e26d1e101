"""What to do after a study, read from it: the checks of Google's *Deep Learning Tuning Playbook*
("Extracting insight from experimental results"), computed as data.

`next_steps(study, config)` returns a `NextSteps` (NamedTuples the tests compare): whether the
study is large enough to judge at all, numeric ranges whose best trials sit at an edge (in log
space for a log entry, per value of `ranges_by` for a range per optimizer), regions where trials
fail (diverged, out of memory) or models are over `max_params`, categorical choices to drop or
fix, parameters that do not matter, the training curves of the best few trials, and the epoch
budget and number of trials they suggest. Every finding carries its evidence (counts, values).
Nothing here draws (`figures.py`), writes files (`compose.py`) or formats the next study
(`next_study.py`); nothing here writes to the study.

Example:
    >>> steps = next_steps(study, config)  # doctest: +SKIP
    >>> [(b.param, b.side, b.proposed) for b in steps.boundaries]  # doctest: +SKIP
    [('lr', 'high', (0.0001, 0.01))]
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.analysis.tables import complete_trials, param_importances
from search.config.params import PARAMS, Param
from search.config.settings import StudyConfig
from search.config.space import ParamSpec
from search.storage.trials import TrialAttr, params_of

EDGE = 0.2                  # the outer fifth of a range (of its log for a log entry) is its edge
EDGE_SHARE = 0.6            # ... and the best trials cluster there when this share of them is in it,
TREND = 0.6                 # ... or when the best is there and accuracy rises towards it (Spearman)
MIN_COMPLETE = 8            # fewer complete trials than this: too small to judge
MIN_PER_DIMENSION = 1.0     # ... or fewer complete trials per searched parameter than this
SPARSE_PER_DIMENSION = 5.0  # below this per searched parameter, more trials would likely pay
MIN_GROUP = 6               # complete trials with one optimizer before its own range is judged
MIN_CHOICE_TRIALS = 3       # complete trials of a choice before "never among the best" means much
MIN_FAILED = 3              # failed trials that make a region, if they are ...
FAIL_SHARE = 0.75           # ... at least this share of the trials in it
IRRELEVANT = 0.05           # fANOVA importance below which a parameter is a candidate to fix
MAX_LOG_WIDENING = 10.0     # a log range widens by its own ratio, by at most a decade
TAIL = 0.25                 # "the last part of the study": its last quarter of finished trials
STILL_RISING = 0.005        # a best value that rose this much in the tail is still rising
CURVES = 3                  # the best few whose training curves are read
CURVE_RISE = 0.002          # val accuracy per epoch over the last epochs: still improving
NOISE = 0.008               # spread (sd) of the late epochs' val accuracy around their trend
OVERFIT_RISE = 0.05         # val loss this far above its minimum, while train loss fell

# fail_reason prefixes of trials whose parameters made them fail (an interrupted trial says
# nothing about its parameters).
PARAMETER_FAILURES = {"diverged": "diverged", "out of memory": "out of memory"}
OVER_BUDGET = "over max_params"


class Samples(NamedTuple):
    """Enough samples? Complete trials per searched parameter, and how the best value moved in
    the last part of the study."""

    complete: int
    finished: int                       # complete + pruned, trained
    dimensions: int                     # searched (not fixed) parameters
    tail_trials: int                    # the last quarter of the finished trials
    best_before_tail: float | None
    best: float | None
    too_small: str | None               # why the study is too small to judge, or None
    more_trials: bool                   # more trials would likely pay

    @property
    def per_dimension(self) -> float:
        return self.complete / max(1, self.dimensions)

    @property
    def tail_gain(self) -> float:
        if self.best is None or self.best_before_tail is None:
            return 0.0
        return self.best - self.best_before_tail


class InfeasibleRegion(NamedTuple):
    """One end of a parameter's values where trials fail or models are over budget."""

    param: str
    group: str | None                   # "optimizer=sgd" for a range per optimizer
    side: str                           # "high" or "low"
    start: float                        # from here on (to that side) trials failed
    last_feasible: float | None         # the value nearest `start` that trained
    failed: int                         # failed trials in the region
    total: int                          # trials in the region (failed or trained)
    reasons: tuple[tuple[str, int], ...]  # ("diverged", 5), ("over max_params", 2)

    @property
    def kind(self) -> str:
        size = {"out of memory", OVER_BUDGET}
        return "size" if all(reason in size for reason, _ in self.reasons) else "stability"


class Boundary(NamedTuple):
    """A numeric range (one per `ranges_by` value) and what its best trials say about it."""

    param: str
    group: str | None                   # "optimizer=adam"; None for the entry's own range
    group_value: Any                    # that value (adam), or None; "other" for low/high
    log: bool
    low: float
    high: float
    points: tuple[tuple[float, float], ...]  # (value, validation accuracy) of complete trials
    failed: tuple[float, ...]           # values of failed or over-budget trials
    top: tuple[float, ...]              # values of its best trials, best first
    near_low: int                       # of those, in the low edge
    near_high: int                      # of those, in the high edge
    trend: float | None                 # Spearman correlation of value and accuracy
    side: str | None                    # "high", "low", "both" or None (not at an edge)
    proposed: tuple[float, float]       # the next study's range (== (low, high): unchanged)
    blocked: str | None                 # why the flagged side is not widened
    narrowed_by: InfeasibleRegion | None  # the region the range was cut back from

    @property
    def changed(self) -> bool:
        return self.proposed != (self.low, self.high)


class ChoiceFinding(NamedTuple):
    """A categorical value to drop, or a parameter to fix at one value."""

    param: str
    action: str                         # "drop", "fix" or "add"
    choice: Any                         # for "add": the new value
    why: str                            # "never among the best", "always among the best",
                                        # "fails", "does not matter", "at the edge of its choices"
    taken: int                          # complete trials that took it
    complete: int                       # complete trials with the parameter
    in_top: int                         # best trials that took it
    top: int                            # best trials
    best_value: float | None            # the best validation accuracy with it
    failed: int = 0                     # failed trials that took it
    importance: float | None = None     # fANOVA importance, for "does not matter"
    edge: Any = None                    # for "add": the outermost value the best took


class Curve(NamedTuple):
    """One of the best trials' training curves, classified."""

    number: int
    value: float
    epochs: tuple[int, ...]
    val_accuracy: tuple[float, ...]
    train_loss: tuple[float | None, ...]
    val_loss: tuple[float | None, ...]
    verdict: str                        # see `VERDICTS`
    evidence: str


VERDICTS = ("still improving", "overfitting", "saturated early", "noisy late", "settled",
            "too short to judge")


class EpochAdvice(NamedTuple):
    current: int
    proposed: int
    reason: str


class NextSteps(NamedTuple):
    study_name: str
    next_name: str
    samples: Samples
    boundaries: tuple[Boundary, ...]
    regions: tuple[InfeasibleRegion, ...]
    choices: tuple[ChoiceFinding, ...]
    curves: tuple[Curve, ...]
    epochs: EpochAdvice | None
    n_trials: int                       # the next study's
    skipped: tuple[str, ...]            # checks not made, and why ("too few adam trials")

    @property
    def too_small(self) -> str | None:
        return self.samples.too_small


# ---------------------------------------------------------------- helpers

def top_count(n: int) -> int:
    """How many of n complete trials are "the best": the top 10 %, at least 3 and, up to 20
    trials, a quarter of them (top 5 of 20, top 10 of 100)."""
    return min(n, max(3, min(5, math.ceil(n / 4)), math.ceil(0.1 * n)))


def next_name(name: str) -> str:
    """cnn3 -> cnn3-next, cnn3-next -> cnn3-next2, cnn3-next2 -> cnn3-next3."""
    match = re.fullmatch(r"(.*)-next(\d*)", name)
    if not match:
        return f"{name}-next"
    return f"{match.group(1)}-next{int(match.group(2) or 1) + 1}"


def _failure(trial: FrozenTrial) -> str | None:
    """Why a trial's parameters made it fail, or None for a trial that trained (or failed for
    a reason that says nothing about its parameters: interrupted, its process killed)."""
    if TrialAttr.OVER_BUDGET in trial.user_attrs:
        return OVER_BUDGET
    if trial.state != TrialState.FAIL:
        return None
    reason = str(trial.user_attrs.get(TrialAttr.FAIL_REASON, ""))
    return next((name for prefix, name in PARAMETER_FAILURES.items() if reason.startswith(prefix)),
                None)


def _position(value: float, low: float, high: float, log: bool) -> float:
    """Where value lies in [low, high], 0 to 1 (in log space for a log entry)."""
    if high == low:
        return 0.5
    if log:
        return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
    return (value - low) / (high - low)


def _between(a: float, b: float, log: bool) -> float:
    return math.sqrt(a * b) if log else (a + b) / 2


def _round(value: float) -> float:
    """Three significant digits: what a person would write in a study file."""
    return float(f"{value:.3g}") if value else 0.0


def _follow(spec: ParamSpec, far: float, widened: float, current: float, top: Sequence[float],
            side: str) -> float:
    """Where the far bound of a range widened from `current` to `widened` moves: by half the
    widening, and at most halfway to the nearest of the best trials, so they stay well inside."""
    nearest = min(top) if side == "low" else max(top)
    if spec.log:
        moved = far * math.sqrt(widened / current)
        moved = min(moved, _between(far, nearest, True)) if side == "low" else max(
            moved, _between(far, nearest, True))
    else:
        moved = far + (widened - current) / 2
        moved = min(moved, _between(far, nearest, False)) if side == "low" else max(
            moved, _between(far, nearest, False))
    if spec.kind == "int":
        return math.floor(moved) if side == "low" else math.ceil(moved)
    rounded = _round(moved)
    return rounded if PARAMS[spec.name].problem(rounded) is None else moved


def _registry_limits(param: Param) -> tuple[float | None, float | None]:
    if param.kind == "categorical":
        numbers = [c for c in param.choices if isinstance(c, (int, float))]
        return (min(numbers), max(numbers)) if numbers else (None, None)
    return param.low, param.high


def _registry_clamp(param: Param, spec: ParamSpec, value: float, current: float) -> float:
    """`value`, moved back (towards `current`) until the registry allows it."""
    low, high = _registry_limits(param)
    if high is not None and (value > high or (param.high_open and value >= high)):
        value = (current + high) / 2 if param.high_open else high
    if low is not None and (value < low or (param.low_open and value <= low)):
        value = (current + low) / 2 if param.low_open or spec.log else low
    if spec.log and value <= 0:
        value = current / 2
    return value


def _spearman(pairs: Sequence[tuple[float, float]]) -> float | None:
    """Rank correlation of (value, accuracy) pairs; None below MIN_GROUP pairs or without spread."""
    if len(pairs) < MIN_GROUP or min(len({v for v, _ in pairs}), len({a for _, a in pairs})) < 2:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr([v for v, _ in pairs], [a for _, a in pairs]).statistic
    return None if rho != rho else float(rho)


class _Point(NamedTuple):
    value: float
    accuracy: float | None              # None: failed
    failure: str | None


def _group_points(study: optuna.Study, config: StudyConfig, spec: ParamSpec
                  ) -> list[tuple[str | None, Any, float, float, list[_Point]]]:
    """(group, group value, low, high, points) for each range an entry samples from."""
    groups: list[tuple[str | None, Any, float, float]] = []
    if spec.ranges_by is None:
        groups.append((None, None, spec.low, spec.high))
    else:
        groups += [(f"{spec.ranges_by}={value}", value, low, high) for value, low, high in spec.ranges]
        if spec.low is not None:
            groups.append((f"{spec.ranges_by}=other", "other", spec.low, spec.high))
    listed = [value for value, _, _ in spec.ranges]
    members: dict[str | None, list[_Point]] = {group: [] for group, *_ in groups}
    for trial in study.get_trials(deepcopy=False):
        failure = _failure(trial)
        if spec.name not in trial.params or (trial.state != TrialState.COMPLETE and failure is None):
            continue
        value = trial.params[spec.name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        parent = params_of(trial, config.space).get(spec.ranges_by) if spec.ranges_by else None
        group = (None if spec.ranges_by is None else
                 f"{spec.ranges_by}={parent}" if parent in listed else f"{spec.ranges_by}=other")
        if group in members:
            members[group].append(_Point(float(value), trial.value if failure is None else None,
                                         failure))
    return [(group, value, low, high, members[group]) for group, value, low, high in groups]


# ---------------------------------------------------------------- infeasible regions

def _regions(name: str, group: str | None, points: Sequence[_Point]) -> list[InfeasibleRegion]:
    """The widest end (each side) where at least MIN_FAILED trials failed, FAIL_SHARE of all."""
    found = []
    for side in ("high", "low"):
        ordered = sorted(points, key=lambda p: p.value, reverse=side == "low")
        for index, point in enumerate(ordered):
            if point.failure is None:
                continue
            region = ordered[index:]
            failed = [p for p in region if p.failure is not None]
            if len(failed) >= MIN_FAILED and len(failed) >= FAIL_SHARE * len(region):
                if len(region) == len(ordered):  # every trial: not one end of the parameter
                    break
                feasible = [p.value for p in ordered[:index] if p.failure is None]
                reasons: dict[str, int] = {}
                for p in failed:
                    reasons[p.failure] = reasons.get(p.failure, 0) + 1
                found.append(InfeasibleRegion(name, group, side, point.value,
                                              feasible[-1] if feasible else None, len(failed),
                                              len(region), tuple(sorted(reasons.items()))))
                break
    return found


# ---------------------------------------------------------------- boundaries

def _boundary(spec: ParamSpec, group: str | None, group_value: Any, low: float, high: float,
              points: Sequence[_Point], regions: Sequence[InfeasibleRegion]) -> Boundary:
    trained = sorted(((p.value, p.accuracy) for p in points if p.accuracy is not None),
                     key=lambda p: -p[1])
    top = tuple(value for value, _ in trained[:top_count(len(trained))])
    positions = [_position(v, low, high, spec.log) for v in top]
    near_low = sum(u <= EDGE for u in positions)
    near_high = sum(u >= 1 - EDGE for u in positions)
    needed = math.ceil(EDGE_SHARE * len(top))
    trend = _spearman(trained)
    rising = {"low": trend is not None and trend <= -TREND, "high": trend is not None and trend >= TREND}
    flags = [side for side, near, best in (("low", near_low, positions[0] <= EDGE if top else False),
                                           ("high", near_high, positions[0] >= 1 - EDGE if top else False))
             if top and best and (near >= needed or rising[side])]
    side = None if not flags else flags[0] if len(flags) == 1 else "both"
    new = {"low": low, "high": high}
    blocked, narrowed_by = [], None
    param = PARAMS[spec.name]
    for region in regions:  # never keep sampling where trials fail: cut the range back
        edge = high if region.side == "high" else low
        inside = low < region.start < high
        if inside or region.start == edge:
            cut = (region.start if region.last_feasible is None
                   else _between(region.last_feasible, region.start, spec.log))
            new[region.side] = cut
            narrowed_by = region
    for flagged in flags:
        region = next((r for r in regions if r.side == flagged), None)
        current = high if flagged == "high" else low
        if region is not None:
            blocked.append(f"trials {'above' if flagged == 'high' else 'below'} "
                           f"{region.start:.3g} failed ({region.failed} of {region.total}: "
                           f"{', '.join(f'{n} {r}' for r, n in region.reasons)})")
            continue
        ratio = min(high / low, MAX_LOG_WIDENING) if spec.log and low > 0 else None
        target = ((current * ratio if flagged == "high" else current / ratio) if ratio is not None
                  else current + (high - low) * (1 if flagged == "high" else -1))
        widened = _registry_clamp(param, spec, target, current)
        if spec.kind == "int":
            widened = math.ceil(widened) if flagged == "high" else math.floor(widened)
            widened = _registry_clamp(param, spec, widened, current)
            widened = int(widened) if param.problem(int(widened)) is None else current
        else:
            rounded = _round(widened)
            widened = rounded if param.problem(rounded) is None else widened
        if widened == current:
            blocked.append(f"{spec.name} {param.valid()} in the registry (search/config/params.py)")
            continue
        new[flagged] = widened
        if side != "both":  # the far side follows, half as far, keeping the best trials inside
            far = "low" if flagged == "high" else "high"
            if new[far] == (low if far == "low" else high):
                new[far] = _follow(spec, new[far], widened, current, top, far)
    if spec.kind == "int":
        new = {k: int(v) for k, v in new.items()}
    return Boundary(spec.name, group, group_value, spec.log, low, high,
                    tuple((p.value, p.accuracy) for p in points if p.accuracy is not None),
                    tuple(p.value for p in points if p.failure is not None), top, near_low,
                    near_high, trend, side, (new["low"], new["high"]), "; ".join(blocked) or None,
                    narrowed_by)


# ---------------------------------------------------------------- categorical choices

def _beyond(spec: ParamSpec, edge: Any, side: str) -> Any | None:
    """The next value past a numeric choice list's `edge` on `side` (the same ratio as between
    its two outermost values, or the same step), if the registry allows it."""
    ordered = sorted(spec.choices)
    a, b = (ordered[-2], ordered[-1]) if side == "high" else (ordered[1], ordered[0])
    if a > 0 and b > 0:
        value = b * (b / a)
    else:
        value = b + (b - a)
    value = int(round(value)) if all(isinstance(c, int) for c in spec.choices) else _round(value)
    return value if value != edge and PARAMS[spec.name].problem(value) is None else None


def _numeric_edge(spec: ParamSpec, complete: Sequence[FrozenTrial], top: Sequence[FrozenTrial]
                  ) -> ChoiceFinding | None:
    """A numeric choice list (batch sizes, widths) whose best trials sit on its largest or
    smallest value, as a range's would at its edge: add the next value past it."""
    numbers = [c for c in spec.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
    if len(numbers) != len(spec.choices) or len(numbers) < 3 or len(top) < 3:
        return None
    for side, edge in (("high", max(numbers)), ("low", min(numbers))):
        in_top = sum(t.params[spec.name] == edge for t in top)
        if top[0].params[spec.name] == edge and in_top >= math.ceil(EDGE_SHARE * len(top)):
            new = _beyond(spec, edge, side)
            if new is not None:
                taken = sum(t.params[spec.name] == edge for t in complete)
                return ChoiceFinding(spec.name, "add", new, "at the edge of its choices",
                                     taken=taken, complete=len(complete), in_top=in_top,
                                     top=len(top), best_value=top[0].value, edge=edge)
    return None


def _choice_findings(study: optuna.Study, spec: ParamSpec) -> list[ChoiceFinding]:
    complete = sorted((t for t in complete_trials(study) if spec.name in t.params),
                      key=lambda t: (-t.value, t.number))
    tried = [t for t in study.get_trials(deepcopy=False) if spec.name in t.params]
    top = complete[:top_count(len(complete))]
    edge = _numeric_edge(spec, complete, top)
    if edge is not None:
        return [edge]
    findings = []
    cut = top[-1].value if top else None
    for choice in spec.choices:
        same = lambda t: t.params[spec.name] == choice and type(t.params[spec.name]) is type(choice)  # noqa: E731
        taken = [t for t in complete if same(t)]
        failed = [t for t in tried if same(t) and _failure(t) is not None]
        in_top = sum(map(same, top))
        best = max((t.value for t in taken), default=None)
        evidence = dict(taken=len(taken), complete=len(complete), in_top=in_top, top=len(top),
                        best_value=best, failed=len(failed))
        ran = len(taken) + len(failed)
        if len(failed) >= MIN_FAILED and len(failed) >= FAIL_SHARE * ran:
            findings.append(ChoiceFinding(spec.name, "drop", choice, "fails", **evidence))
        elif (len(top) >= 3 and in_top == 0 and len(taken) >= MIN_CHOICE_TRIALS
              and best is not None and best < cut):
            findings.append(ChoiceFinding(spec.name, "drop", choice, "never among the best",
                                          **evidence))
        elif len(top) >= 3 and in_top == len(top):
            others = [c for c in spec.choices if c != choice]
            tried_others = [sum(1 for t in complete if t.params[spec.name] == c) for c in others]
            if all(n >= MIN_CHOICE_TRIALS - 1 for n in tried_others):
                findings.append(ChoiceFinding(spec.name, "fix", choice, "always among the best",
                                              **evidence))
    if any(f.action == "fix" for f in findings):
        return [f for f in findings if f.action == "fix"]
    dropped = [f for f in findings if f.action == "drop"]
    if len(dropped) >= len(spec.choices) - 1:  # drop all but one: fix the best remaining one
        left = [c for c in spec.choices if c not in {f.choice for f in dropped}]
        if not left or not top:
            return []
        keep = left[0] if len(left) == 1 else top[0].params[spec.name]
        return [f for f in dropped if f.choice != keep]
    return dropped


def _irrelevant(study: optuna.Study, config: StudyConfig, taken: set[str]) -> list[ChoiceFinding]:
    """Parameters whose fANOVA importance is below IRRELEVANT: fix them at the best trial's
    value (unconditional parameters with one range only, so one value serves every trial)."""
    importances = param_importances(study, seed=config.seed).values
    complete = sorted(complete_trials(study), key=lambda t: (-t.value, t.number))
    if not importances or not complete:
        return []
    best = complete[0]
    found = []
    for spec in config.space:
        importance = importances.get(spec.name)
        if (importance is None or importance >= IRRELEVANT or spec.name in taken or spec.when
                or spec.ranges_by is not None or spec.name not in best.params):
            continue
        value = best.params[spec.name]
        if isinstance(value, float) and spec.contains(_round(value)):
            value = _round(value)  # 0.358, not 0.35759468318620974
        found.append(ChoiceFinding(spec.name, "fix", value, "does not matter",
                                   taken=len(complete), complete=len(complete), in_top=0, top=0,
                                   best_value=best.value, importance=importance))
    return found


# ---------------------------------------------------------------- training curves

def _series(trial: FrozenTrial, key: str) -> tuple[float | None, ...]:
    return tuple(epoch.get(key) for epoch in trial.user_attrs.get(TrialAttr.EPOCHS, ()))


def classify_curve(trial: FrozenTrial, budget: int) -> Curve:
    """Reads one complete trial's curve: still improving at the last epoch, overfitting
    (validation loss rising while training loss falls), saturated early, noisy late, settled."""
    recorded = trial.user_attrs.get(TrialAttr.EPOCHS)
    if recorded:
        epochs = tuple(int(e["epoch"]) for e in recorded)
        accuracy = tuple(float(e.get("val_accuracy", math.nan)) for e in recorded)
    else:  # an old trial: Optuna's intermediate values are its validation accuracy
        epochs = tuple(sorted(trial.intermediate_values))
        accuracy = tuple(trial.intermediate_values[e] for e in epochs)
    train_loss, val_loss = _series(trial, "train_loss"), _series(trial, "val_loss")
    make = lambda verdict, evidence: Curve(trial.number, trial.value, epochs, accuracy,  # noqa: E731
                                          train_loss, val_loss, verdict, evidence)
    n = len(accuracy)
    if n < 3 or any(math.isnan(a) for a in accuracy):
        return make("too short to judge", f"{n} epoch(s) recorded; 3 are needed")
    best_index = max(range(n), key=lambda i: accuracy[i])
    last = max(2, n // 3)  # the late epochs: the last third, at least 2 steps
    tail = accuracy[-last - 1:]
    slope = (tail[-1] - tail[0]) / last
    late = accuracy[n // 2:]
    xs = range(len(late))
    mean_x, mean_y = (len(late) - 1) / 2, sum(late) / len(late)
    var_x = sum((x - mean_x) ** 2 for x in xs) or 1
    trend = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, late)) / var_x
    residual = [y - (mean_y + trend * (x - mean_x)) for x, y in zip(xs, late)]
    spread = math.sqrt(sum(r * r for r in residual) / max(1, len(late) - 2))
    losses = [(t, v) for t, v in zip(train_loss, val_loss) if t is not None and v is not None]
    if len(losses) == n:
        best_val_loss = min(range(n), key=lambda i: losses[i][1])
        rise = losses[-1][1] / losses[best_val_loss][1] - 1 if losses[best_val_loss][1] > 0 else 0
        if best_val_loss <= n - 3 and rise >= OVERFIT_RISE and losses[-1][0] < losses[best_val_loss][0]:
            return make("overfitting", f"validation loss lowest at epoch {epochs[best_val_loss]} "
                        f"({losses[best_val_loss][1]:.3f}), {rise:+.0%} by epoch {epochs[-1]} "
                        f"({losses[-1][1]:.3f}) while training loss fell "
                        f"{losses[best_val_loss][0]:.3f} -> {losses[-1][0]:.3f}")
    if len(late) >= 4 and spread >= NOISE:
        return make("noisy late", f"validation accuracy of epochs {epochs[n // 2]}-{epochs[-1]} "
                    f"scatters {spread:.3f} (sd) around its trend")
    if best_index == n - 1 and slope >= CURVE_RISE:
        return make("still improving", f"best at the last epoch ({accuracy[-1]:.4f}), rising "
                    f"{slope:+.4f} per epoch over the last {last} epochs")
    reached = next(i for i in range(n) if accuracy[i] >= accuracy[best_index] - STILL_RISING)
    if reached + 1 <= n / 2 and n >= 4:
        return make("saturated early", f"within {STILL_RISING:g} of its best "
                    f"({accuracy[best_index]:.4f}) from epoch {epochs[reached]} of {n}; "
                    f"{slope:+.4f} per epoch over the last {last} epochs")
    return make("settled", f"best {accuracy[best_index]:.4f} at epoch {epochs[best_index]} of "
                f"{n}; {slope:+.4f} per epoch over the last {last} epochs")


def epoch_advice(curves: Sequence[Curve], budget: int) -> EpochAdvice | None:
    """The epoch budget the best few's curves ask for: longer when most still improve, shorter
    when all saturated early (at the latest saturation, plus a quarter)."""
    judged = [c for c in curves if c.verdict != "too short to judge"]
    if not judged:
        return None
    count = lambda verdict: sum(c.verdict == verdict for c in judged)  # noqa: E731
    if count("still improving") * 2 > len(judged):
        return EpochAdvice(budget, budget * 2, f"{count('still improving')} of the best "
                           f"{len(judged)} trials were still improving at their last epoch")
    if count("saturated early") == len(judged):
        latest = max(next(e for e, a in zip(c.epochs, c.val_accuracy)
                          if a >= max(c.val_accuracy) - STILL_RISING) for c in judged)
        proposed = max(1, min(budget, math.ceil(latest * 1.25) + 1))
        if proposed < budget:
            return EpochAdvice(budget, proposed, f"all {len(judged)} of the best trials were "
                               f"within {STILL_RISING:g} of their best by epoch {latest}")
    return None


# ---------------------------------------------------------------- samples

def samples(study: optuna.Study, config: StudyConfig) -> Samples:
    trials = study.get_trials(deepcopy=False)
    finished = sorted((t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                       and TrialAttr.OVER_BUDGET not in t.user_attrs),
                      key=lambda t: (t.datetime_complete or t.datetime_start, t.number))
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    dimensions = sum(1 for spec in config.space
                     if spec.kind != "fixed" and not (spec.kind == "categorical"
                                                      and len(spec.choices) < 2))
    tail = max(1, math.ceil(TAIL * len(finished))) if finished else 0
    before = [t.value for t in finished[:len(finished) - tail] if t.state == TrialState.COMPLETE]
    best = max((t.value for t in complete), default=None)
    best_before = max(before, default=None)
    too_small = None
    if len(complete) < MIN_COMPLETE or len(complete) < MIN_PER_DIMENSION * dimensions:
        too_small = (f"{len(complete)} complete trial(s) for {dimensions} searched parameter(s); "
                     f"judging ranges needs at least {max(MIN_COMPLETE, math.ceil(MIN_PER_DIMENSION * dimensions))}")
    rising = best is not None and (best_before is None or best - best_before >= STILL_RISING)
    more = too_small is None and (rising or len(complete) < SPARSE_PER_DIMENSION * dimensions)
    return Samples(len(complete), len(finished), dimensions, tail, best_before, best, too_small, more)


# ---------------------------------------------------------------- all of it

def next_steps(study: optuna.Study, config: StudyConfig) -> NextSteps:
    """Every check, as data. A study too small to judge gets only its sample counts."""
    counted = samples(study, config)
    name = study.study_name
    more = max(config.n_trials, math.ceil(SPARSE_PER_DIMENSION * counted.dimensions))
    if counted.too_small:
        return NextSteps(name, next_name(name), counted, (), (), (), (), None,
                         max(more, config.n_trials * 2), ())
    boundaries, regions, choices, skipped = [], [], [], []
    for spec in config.space:
        if spec.kind in ("float", "int"):
            for group, value, low, high, points in _group_points(study, config, spec):
                trained = sum(p.accuracy is not None for p in points)
                if (spec.ranges_by is not None or spec.when) and trained < MIN_GROUP:
                    if points:  # a range per optimizer, or a parameter of some optimizers only
                        skipped.append(f"{spec.name}" + (f" with {group}" if group else "")
                                       + f": {trained} complete trial(s), {MIN_GROUP} are "
                                       "needed to judge its range")
                    continue
                found = _regions(spec.name, group, points)
                regions += found
                boundaries.append(_boundary(spec, group, value, low, high, points, found))
        elif spec.kind == "categorical" and len(spec.choices) >= 2:
            choices += _choice_findings(study, spec)
    flagged = {b.param for b in boundaries if b.side or b.changed} | {c.param for c in choices}
    choices += _irrelevant(study, config, flagged)
    top = sorted(complete_trials(study), key=lambda t: (-t.value, t.number))[:CURVES]
    curves = tuple(classify_curve(t, config.epochs) for t in top)
    n_trials = (max(config.n_trials, math.ceil(config.n_trials * 1.5), more) if counted.more_trials
                else config.n_trials)
    return NextSteps(name, next_name(name), counted, tuple(boundaries), tuple(regions),
                     tuple(choices), curves, epoch_advice(curves, config.epochs), n_trials,
                     tuple(skipped))
