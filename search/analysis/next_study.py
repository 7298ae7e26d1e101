"""The next study, written: a complete study file made from a study's config and the `NextSteps`
read from it (`advice.py`), runnable as `python -m search.run study=reports/<study>/next-study.yaml`.

It is the study as it ran (model, data set, sampler, pruner, space, baselines), with each
widened, narrowed, dropped or fixed entry, the epoch budget and the number of trials changed as
the findings say, a new study name, and `warm_start` from the study in the same storage, so its
best configurations run first. Every changed line carries a comment saying why, with the
evidence. The phrases are shared with the report's "What to do next" section.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from search.analysis.advice import (
    EDGE,
    TREND,
    Boundary,
    ChoiceFinding,
    InfeasibleRegion,
    NextSteps,
)
from search.config.settings import SETTINGS, StudyConfig

FILE = "next-study.yaml"


# ---------------------------------------------------------------- phrases

def range_text(low: float, high: float) -> str:
    return f"[{low:.3g}, {high:.3g}]"


def where(b: Boundary | InfeasibleRegion) -> str:
    return b.param + (f" ({b.group})" if b.group else "")


def region_text(region: InfeasibleRegion) -> str:
    limit = "stability limit" if region.kind == "stability" else "size limit"
    side = "at or above" if region.side == "high" else "at or below"
    reasons = ", ".join(f"{n} {reason}" for reason, n in region.reasons)
    trained = (f"; the nearest value that trained: {region.last_feasible:.3g}"
               if region.last_feasible is not None else "")
    return (f"{where(region)}: a {limit}: {region.failed} of the {region.total} trials "
            f"{side} {region.start:.3g} failed ({reasons}){trained}")


def boundary_text(b: Boundary) -> str:
    """Why a range changed (or why it could not be widened), with the evidence."""
    parts = []
    if b.side:
        sides = ("low", "high") if b.side == "both" else (b.side,)
        near = " and ".join(f"{b.near_low if s == 'low' else b.near_high} of the best {len(b.top)} "
                            f"in its {s} edge" for s in sides)
        parts.append(f"{near} (outer {int(EDGE * 100)}%{' of its log' if b.log else ''}; best at "
                     f"{b.top[0]:.3g})")
        if b.trend is not None and abs(b.trend) >= TREND:
            parts.append(f"accuracy {'rises' if b.trend > 0 else 'falls'} with {b.param} "
                         f"(Spearman {b.trend:+.2f} over {len(b.points)} trials)")
    if b.narrowed_by is not None:
        region = b.narrowed_by
        parts.append(f"{region.failed} of {region.total} trials "
                     f"{'at or above' if region.side == 'high' else 'at or below'} "
                     f"{region.start:.3g} failed")
    if b.blocked:
        parts.append(f"not widened: {b.blocked}")
    change = (f"{range_text(b.low, b.high)} -> {range_text(*b.proposed)}" if b.changed
              else f"kept {range_text(b.low, b.high)}")
    return f"{change}: " + "; ".join(parts)


def choice_text(c: ChoiceFinding) -> str:
    if c.action == "add":
        return (f"add {c.choice}: {c.in_top} of the best {c.top} took {c.edge}, the "
                f"{'largest' if c.choice > c.edge else 'smallest'} choice ({c.taken} of "
                f"{c.complete} complete trials did)")
    if c.why == "fails":
        return f"drop {c.choice}: {c.failed} of its {c.failed + c.taken} trials failed"
    if c.why == "does not matter":
        return (f"fix at {c.choice!r} (the best trial's value): importance {c.importance:.3f} "
                f"(fANOVA over {c.complete} complete trials)")
    if c.action == "drop":
        return (f"drop {c.choice}: none of the best {c.top} took it in {c.taken} complete trials "
                f"(its best {c.best_value:.4f})")
    return (f"fix at {c.choice!r}: all of the best {c.top} took it ({c.taken} of {c.complete} "
            "complete trials did)")


def epochs_text(steps: NextSteps) -> str:
    advice = steps.epochs
    return f"{advice.current} -> {advice.proposed}: {advice.reason}"


def trials_text(steps: NextSteps, current: int) -> str:
    s = steps.samples
    rise = (f"the best rose {s.tail_gain:+.4f} over the last {s.tail_trials} trials"
            if s.best_before_tail is not None else "no complete trial before the last part")
    return (f"{current} -> {steps.n_trials}: {s.complete} complete trials for {s.dimensions} "
            f"searched parameters ({s.per_dimension:.1f} each); {rise}")


# ---------------------------------------------------------------- the space

def _possible(entry: Any) -> list[Any] | None:
    """The values a parent entry can take (None: a number, any value)."""
    if not isinstance(entry, dict):
        return [entry]
    return list(entry["choices"]) if entry.get("type") == "categorical" else None


def _reconcile(space: dict[str, Any], notes: dict[str, str]) -> None:
    """After choices were dropped or fixed, keeps the children valid: ranges only for values the
    parent can still take, and entries only used by dropped values removed."""
    for name in list(space):
        entry = space[name]
        if not isinstance(entry, dict):
            continue
        for parent, values in dict(entry.get("when") or {}).items():
            possible = _possible(space.get(parent))
            wanted = values if isinstance(values, list) else [values]
            if possible is not None and not any(v in possible for v in wanted):
                del space[name]
                notes[name] = (f"removed: used only when {parent} is {', '.join(map(str, wanted))}, "
                               "which the next study no longer tries")
                break
        if name not in space or not isinstance(entry.get("ranges"), dict):
            continue
        (parent, per_value), = entry["ranges"].items()
        possible = _possible(space.get(parent))
        if possible is None:
            continue
        kept = {v: r for v, r in per_value.items() if v in possible}
        if not kept:
            del entry["ranges"]
        elif len(possible) == 1:  # the parent is fixed: its one range is the entry's range
            entry.pop("ranges")
            entry["low"], entry["high"] = kept[possible[0]]
        else:
            entry["ranges"] = {parent: kept}
            if all(v in kept for v in possible):
                entry.pop("low", None)
                entry.pop("high", None)


def _apply_boundary(entry: dict[str, Any], b: Boundary) -> None:
    low, high = b.proposed
    if b.group is None or b.group_value == "other":
        entry["low"], entry["high"] = low, high
    else:
        (parent, per_value), = entry["ranges"].items()
        per_value[b.group_value] = [low, high]


def _apply_choice(space: dict[str, Any], c: ChoiceFinding) -> None:
    if c.action == "fix":
        space[c.param] = c.choice
    elif c.action == "add" and isinstance(space.get(c.param), dict):
        space[c.param]["choices"] = sorted([*space[c.param]["choices"], c.choice])
    elif isinstance(space.get(c.param), dict):
        space[c.param]["choices"] = [x for x in space[c.param]["choices"]
                                     if not (x == c.choice and type(x) is type(c.choice))]


# ---------------------------------------------------------------- the file

def _flow(value: Any) -> str:
    """One value as one line of YAML (flow style)."""
    text = yaml.safe_dump([value], default_flow_style=True, width=1_000_000, sort_keys=False)
    return text.strip()[1:-1]


def _line(key: str, value: Any, why: str | None = None, indent: str = "") -> str:
    return f"{indent}{key}: {_flow(value)}" + (f"    # changed: {why}" if why else "")


def next_study_yaml(config: StudyConfig, steps: NextSteps, path: str | None = None) -> str:
    """The next study file's text: the study's config with the findings applied, commented."""
    tree = copy.deepcopy(config.raw)
    space: dict[str, Any] = tree["space"]
    why: dict[str, str] = {}
    notes: dict[str, str] = {}
    for b in steps.boundaries:
        if b.changed and isinstance(space.get(b.param), dict):
            _apply_boundary(space[b.param], b)
            text = (f"{b.group}: " if b.group else "") + boundary_text(b)
            why[b.param] = f"{why[b.param]}; {text}" if b.param in why else text
    for c in steps.choices:
        if c.param in space:
            _apply_choice(space, c)
            text = choice_text(c)
            why[c.param] = f"{why[c.param]}; {text}" if c.param in why else text
    _reconcile(space, notes)
    top: dict[str, str] = {}
    if steps.epochs is not None:
        tree["epochs"] = steps.epochs.proposed
        top["epochs"] = epochs_text(steps)
        if tree["pruner"].get("min_resource", 1) > tree["epochs"]:
            tree["pruner"]["min_resource"] = tree["epochs"]
            top["pruner"] = "min_resource may not exceed the new epoch budget"
    if steps.n_trials != config.n_trials:
        tree["n_trials"] = steps.n_trials
        top["n_trials"] = trials_text(steps, config.n_trials)
    tree["study_name"] = steps.next_name
    top["study_name"] = f"a new study; this one is {steps.study_name}"
    tree["warm_start"] = [steps.study_name]
    top["warm_start"] = (f"the best {tree.get('warm_start_top_k', 3)} configurations of "
                         f"{steps.study_name} run first (after the baselines)")

    lines = [f"# The next study after '{steps.study_name}' ({config.model} on {config.dataset}), "
             "written by python -m search.report",
             f"# from {steps.samples.complete} complete trials. Lines marked 'changed:' say why; "
             "the rest is the study as it ran.",
             "# Run it from the folder the study ran in: python -m search.run "
             f"study={path or f'reports/{steps.study_name}/{FILE}'}"]
    for key in ("model", "dataset", "data_dir", "val_size", "epochs", "n_trials", "timeout",
                "seed", "study_name"):
        if key in ("model", "dataset", "epochs", "n_trials", "seed", "study_name") \
                or tree.get(key) != SETTINGS[key].default:
            lines.append(_line(key, tree[key], top.get(key)))
    for key, url in (("storage", config.storage), ("tracking_uri", config.tracking_uri)):
        if str(url) != url.raw:  # a password: never into a file
            lines.append(f"# {key}: give {key}= on the command line (its URL holds a password, "
                         "kept out of this file)")
        elif not url.is_default:
            lines.append(_line(key, url.raw) + ("    # the same storage, where warm_start finds "
                                                f"{steps.study_name}" if key == "storage" else ""))
    lines.append(_line("warm_start", tree["warm_start"], top["warm_start"]))
    for key in ("warm_start_top_k", "max_params", "checkpoint_every"):
        if tree.get(key) != SETTINGS[key].default:
            lines.append(_line(key, tree[key]))
    lines.append(_line("sampler", tree["sampler"]))
    lines.append(_line("pruner", tree["pruner"], top.get("pruner")))
    lines.append("space:")
    for name, entry in space.items():
        lines.append(_line(name, entry, why.get(name), indent="  "))
    for name, note in notes.items():
        lines.append(f"  # {name}: {note}")
    lines.append("baselines:" + ("" if tree["baselines"] else " []"))
    lines += [f"  - {_flow(baseline)}" for baseline in tree["baselines"]]
    return "\n".join(lines) + "\n"
