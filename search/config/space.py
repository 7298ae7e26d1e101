"""The search space as data: YAML entries become `ParamSpec`s, and one walk (`walk`) turns them
into `trial.suggest_*` calls, so no space is ever written in Python.

An entry is a distribution (`float`, `int`, `categorical`) or a fixed value, optionally active only
when an earlier parameter has one of some values (`when: {optimizer: [sgd, rmsprop]}`), which is how
an optimizer's own parameters (SGD's momentum, Adam's betas) appear only where they mean something.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from search.config.errors import SearchError, shown
from search.config.params import ALIASES, DISTRIBUTIONS, PARAMS, Param, is_finite, known_params

_NUMBER_FIELDS = ("type", "low", "high", "log", "step", "when", "ranges")
# The fields an entry of each type may have; an override sets one as space.NAME.FIELD.
ENTRY_FIELDS = {"float": _NUMBER_FIELDS, "int": _NUMBER_FIELDS,
                "categorical": ("type", "choices", "when")}


@dataclass(frozen=True)
class ParamSpec:
    """One searchable (or fixed) hyperparameter.

    `kind` is one of `DISTRIBUTIONS` ("float", "int", "categorical") or "fixed"; `when` maps a parent parameter to the
    values for which this one is active. A number's range may depend on an earlier parameter
    (`ranges_by`): `ranges` holds (value of that parameter, low, high), and `low`/`high` are the
    range for the values not listed (None when every value is listed).
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    ranges_by: str | None = None
    ranges: tuple[tuple[Any, float, float], ...] = ()

    def bounds(self, params: Mapping[str, Any]) -> tuple[float, float]:
        """The range for the values the earlier parameters took (`ranges_by`)."""
        for value, low, high in self.ranges:
            if params.get(self.ranges_by) == value:
                return low, high
        if self.low is None:
            raise ValueError(f"{self.name}: no range for {self.ranges_by}="
                             f"{params.get(self.ranges_by)!r}")
        return self.low, self.high

    def all_bounds(self) -> list[tuple[float, float]]:
        """Every range the entry can sample from."""
        default = [] if self.low is None else [(self.low, self.high)]
        return default + [(low, high) for _, low, high in self.ranges]

    def is_active(self, params: Mapping[str, Any]) -> bool:
        """Whether the parents this entry depends on took one of the values it needs."""
        return all(params.get(parent) in values for parent, values in self.when)

    def contains(self, value: Any, params: Mapping[str, Any] = {}) -> bool:  # noqa: B006
        """Whether `value` is one this entry can produce, given the earlier `params` (used to
        check baselines and warm starts)."""
        if self.kind == "fixed":
            return value == self.value
        if self.kind == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and int(value) != value:
            return False
        try:
            low, high = self.bounds(params)
        except ValueError:
            return False
        return low <= value <= high

    def suggest(self, trial: optuna.Trial, params: Mapping[str, Any]) -> Any:
        """The entry's `trial.suggest_*` call (never a fixed one: `walk` sets those itself)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, *self.bounds(params), step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, *self.bounds(params), step=self.step, log=self.log)

    def describe(self) -> str:
        """A short human-readable form, for --help, the report and the dashboard note."""
        if self.kind == "fixed":
            text = f"= {self.value!r}"
        elif self.kind == "categorical":
            text = "one of " + ", ".join(str(c) for c in self.choices)
        else:
            per = [f"{value}: [{low:g}, {high:g}]" for value, low, high in self.ranges]
            if self.low is not None:
                per.append(f"[{self.low:g}, {self.high:g}]" if not per else
                           f"otherwise [{self.low:g}, {self.high:g}]")
            text = (f"{self.kind} in " + (f"{per[0]}" if not self.ranges else
                                          f"per {self.ranges_by}: {', '.join(per)}")
                    + (" log" if self.log else ""))
            if self.step:
                text += f" step {self.step:g}"
        if self.when:
            conditions = " and ".join(f"{p} in {list(v)}" for p, v in self.when)
            text += f" (when {conditions})"
        return text


def _fail(name: str, message: str) -> SearchError:
    return SearchError(f"space.{name}: {message}")


def _number(name: str, field: str, value: Any) -> float:
    """A finite bound or step (a whole number too large for a float is not finite here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, f"'{field}' must be a number, got {shown(value)}.")
    if not is_finite(value):
        raise _fail(name, f"'{field}' must be a finite number, got {shown(value)}.")
    return value


def parse_param(name: str, entry: Any, earlier: Sequence[str]) -> ParamSpec:
    """Validates one YAML entry; `earlier` are the names defined before it (possible parents)."""
    if not isinstance(entry, Mapping):
        if isinstance(entry, (list, tuple)):
            raise _fail(name, "a list is not a value; write {type: categorical, choices: [...]}.")
        return ParamSpec(name=name, kind="fixed", value=entry)
    kind = entry.get("type")
    if kind not in DISTRIBUTIONS:
        raise _fail(name, f"'type' must be one of {', '.join(DISTRIBUTIONS)} (got {kind!r}); "
                          "a plain value instead of a mapping fixes the parameter.")
    unknown = sorted(set(entry).difference(ENTRY_FIELDS[kind]))
    if unknown:
        hint = difflib.get_close_matches(unknown[0], ENTRY_FIELDS[kind], n=1)
        raise _fail(name, f"unknown field '{unknown[0]}' for a {kind} parameter"
                          + (f" (did you mean '{hint[0]}'?)" if hint else "")
                          + f"; allowed: {', '.join(sorted(ENTRY_FIELDS[kind]))}.")
    when = _parse_when(name, entry.get("when"), earlier)
    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, Sequence) or isinstance(choices, str) or not choices:
            raise _fail(name, f"'choices' must be a non-empty list, got {choices!r}.")
        if len(set(map(repr, choices))) != len(choices):
            raise _fail(name, f"'choices' has duplicates: {list(choices)}.")
        return ParamSpec(name=name, kind=kind, choices=tuple(choices), when=when)
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise _fail(name, f"'log' must be true or false, got {shown(log)}.")
    step = entry.get("step")
    if step is not None:
        step = _number(name, "step", step)
        if step <= 0:
            raise _fail(name, f"'step' must be positive, got {step}.")
        if log:
            raise _fail(name, "'step' and 'log: true' cannot be combined.")
        if kind == "int" and int(step) != step:
            raise _fail(name, f"an int parameter needs whole numbers, 'step' is {step}.")
    ranges_by, ranges = _parse_ranges(name, kind, log, entry.get("ranges"), earlier)
    if ranges and "low" not in entry and "high" not in entry:
        low = high = None  # every value of ranges_by has its own range
    elif ranges and ("low" not in entry or "high" not in entry):
        raise _fail(name, f"give both low and high (the range for the values of {ranges_by} that "
                          f"'ranges' does not list), or set a value's own range: space.{name}."
                          f"ranges.{ranges_by}.{ranges[0][0]}=[low,high].")
    else:
        for field in ("low", "high"):
            if field not in entry:
                raise _fail(name, f"a {kind} parameter needs '{field}'.")
        low, high = _range(name, kind, log, entry["low"], entry["high"])
    return ParamSpec(name=name, kind=kind, low=low, high=high, log=log,
                     step=int(step) if kind == "int" and step is not None else step, when=when,
                     ranges_by=ranges_by, ranges=ranges)


def _range(name: str, kind: str, log: bool, low: Any, high: Any,
           where: str = "") -> tuple[float, float]:
    """A checked (low, high): numbers, low <= high, > 0 on a log scale, whole for an int."""
    low, high = _number(name, "low" + where, low), _number(name, "high" + where, high)
    if low > high:
        raise _fail(name, f"empty range{where}: low={low} is greater than high={high}.")
    if log and low <= 0:
        raise _fail(name, f"a log range needs low > 0, got low={low}{where}.")
    if kind == "int":
        for field, value in (("low", low), ("high", high)):
            if int(value) != value:
                raise _fail(name, f"an int parameter needs whole numbers, '{field}' is "
                                  f"{value}{where}.")
        low, high = int(low), int(high)
    return low, high


def _parse_ranges(name: str, kind: str, log: bool, ranges: Any,
                  earlier: Sequence[str]) -> tuple[str | None, tuple]:
    """`ranges: {optimizer: {sgd: [0.01, 0.3], adam: [1e-4, 3e-3]}}`: a range per value of one
    earlier parameter."""
    if ranges is None:
        return None, ()
    if not isinstance(ranges, Mapping) or len(ranges) != 1:
        raise _fail(name, "'ranges' maps one earlier parameter to a range per value, e.g. "
                          "{optimizer: {sgd: [0.01, 0.3], adam: [0.0001, 0.003]}}.")
    (parent, per_value), = ranges.items()
    if parent not in earlier:
        raise _fail(name, f"'ranges' depends on '{parent}', which must be a parameter defined "
                          f"before '{name}' (defined before it: {', '.join(earlier) or 'none'}).")
    if not isinstance(per_value, Mapping) or not per_value:
        raise _fail(name, f"'ranges: {{{parent}: ...}}' must map values of {parent} to [low, high].")
    parsed = []
    for value, bounds in per_value.items():
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            raise _fail(name, f"the range for {parent}={value} must be [low, high], got "
                              f"{shown(bounds)}.")
        parsed.append((value, *_range(name, kind, log, *bounds, where=f" for {parent}={value}")))
    return str(parent), tuple(parsed)


def _parse_when(name: str, when: Any, earlier: Sequence[str]) -> tuple[tuple[str, tuple], ...]:
    if when is None:
        return ()
    if not isinstance(when, Mapping) or not when:
        raise _fail(name, f"'when' must map a parameter to its value(s), got {when!r}.")
    parsed = []
    for parent, values in when.items():
        if parent not in earlier:
            raise _fail(name, f"'when' refers to '{parent}', which must be a parameter defined "
                              f"before '{name}' (defined before it: {', '.join(earlier) or 'none'}).")
        values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
        if not values:
            raise _fail(name, f"'when: {{{parent}: []}}' names no value, so '{name}' would never "
                              "be active; list the values, or remove the parameter.")
        parsed.append((str(parent), values))
    return tuple(parsed)


def parse_space(raw: Mapping[str, Any], model: str) -> tuple[ParamSpec, ...]:
    """Validates a whole space against the parameters `model` and the trainer understand
    (`search.config.params`): names, ranges inside each parameter's valid values, conditions."""
    if not isinstance(raw, Mapping) or not raw:
        raise SearchError("space: the study needs a non-empty 'space' mapping of parameters.")
    allowed = known_params(model)
    specs: list[ParamSpec] = []
    for name, entry in raw.items():
        if name not in allowed:
            hint = ([ALIASES[name]] if name in ALIASES
                    else difflib.get_close_matches(str(name), allowed, n=1))
            raise SearchError(
                f"space.{name}: unknown parameter"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f". The {model} model and the trainer understand: {', '.join(sorted(allowed))}.")
        spec = parse_param(str(name), entry, [s.name for s in specs])
        _check_values(spec, PARAMS[spec.name])
        if spec.ranges_by is not None:
            _check_ranges(spec, next(s for s in specs if s.name == spec.ranges_by))
        for parent, values in spec.when:
            for value in values:
                if PARAMS[parent].problem(value):
                    raise _fail(spec.name, f"'when' needs {parent} to be {shown(value)}, which it "
                                           f"never is: {parent} is {PARAMS[parent].valid()}.")
        specs.append(spec)
    return tuple(specs)


def _check_ranges(spec: ParamSpec, parent: ParamSpec) -> None:
    """Each value a range is given for is one the parent can take; each value the parent can
    take has a range (its own, or the entry's low/high)."""
    for value, _, _ in spec.ranges:
        if PARAMS[parent.name].problem(value):
            raise _fail(spec.name, f"'ranges' gives a range for {parent.name}={shown(value)}, "
                                   f"which it never is: {PARAMS[parent.name].problem(value)}.")
    possible = (parent.choices if parent.kind == "categorical" else
                (parent.value,) if parent.kind == "fixed" else ())
    listed = [value for value, _, _ in spec.ranges]
    missing = [v for v in possible if v not in listed]
    if missing and spec.low is None:
        raise _fail(spec.name, f"no range for {parent.name}={missing[0]!r}: add it to 'ranges', "
                               "or give low and high for the values not listed.")
    if possible and not missing and spec.low is not None:  # low/high would silently do nothing
        raise _fail(spec.name, f"low and high are not used: every value of {parent.name} has its "
                               f"own range; set one with space.{spec.name}.ranges.{parent.name}."
                               f"{possible[0]}=[low,high], or drop them all with "
                               f"space.{spec.name}.ranges=null.")


def _check_values(spec: ParamSpec, param: Param) -> None:
    """Every value the entry can produce must be one the parameter accepts."""
    if spec.kind == "fixed":
        values = [spec.value]
    elif spec.kind == "categorical":
        values = list(spec.choices)
    elif param.kind in ("bool",) or (param.kind == "categorical" and spec.kind == "float"):
        raise _fail(spec.name, f"a {spec.kind} range cannot give {param.valid()}; write "
                               "{type: categorical, choices: [...]}.")
    elif param.kind == "int" and spec.kind == "float":
        raise _fail(spec.name, f"{spec.name} is {param.valid()}: use type: int or categorical.")
    elif param.kind == "categorical":  # an int range over allowed sizes, e.g. 3..7 step 2
        spans = [range(low, high + 1, spec.step or 1) for low, high in spec.all_bounds()]
        if sum(map(len, spans)) > len(param.choices) * len(spans):  # before listing a huge one
            raise _fail(spec.name, f"the range gives values that are not {param.valid()}; list "
                                   "them: {type: categorical, choices: [...]}.")
        values = [value for span in spans for value in span]
    else:
        values = [bound for pair in spec.all_bounds() for bound in pair]
    for value in values:
        problem = param.problem(value)
        if problem:
            raise _fail(spec.name, f"{shown(value)} is out of range: {spec.name} {problem} "
                                   f"({param.help}).")


LEFT_OUT: Any = object()  # what `choose` returns for a parameter a sampler will pick later


def walk(space: Sequence[ParamSpec], choose: Callable[[ParamSpec, dict], Any]) -> dict[str, Any]:
    """The active parameters in space order: fixed ones at their value, the others at
    `choose(spec, params_so_far)` unless that is `LEFT_OUT` (left for a sampler to pick later).

    The one walk over the conditional space: sampling, baseline checks, warm starts and the dry
    run differ only in `choose`, so they cannot disagree about which parameters are active."""
    params: dict[str, Any] = {}
    for spec in space:
        if spec.is_active(params):
            value = spec.value if spec.kind == "fixed" else choose(spec, params)
            if value is not LEFT_OUT:
                params[spec.name] = value
    return params


def suggest(trial: optuna.Trial, space: Sequence[ParamSpec]) -> dict[str, Any]:
    """Samples a trial's parameters in space order; inactive conditionals are left out."""
    return walk(space, lambda spec, params: spec.suggest(trial, params))


def check_baseline(index: int, baseline: Mapping[str, Any], space: Sequence[ParamSpec]) -> str | None:
    """Returns why a baseline does not fit the space (after overrides), or None when it fits.

    Params a baseline leaves out are sampled; params it sets must be active and in range.
    """
    unknown = [k for k in baseline if k not in {spec.name for spec in space}]
    if unknown:
        return f"baseline {index} sets '{unknown[0]}', which is not in the space"
    # The walk takes the baseline's values as they are; up to its first misfit (the one
    # reported) they are the values the trial would have, so activity is decided as in a trial.
    params = walk(space, lambda spec, _: baseline.get(spec.name, LEFT_OUT))
    for spec in (s for s in space if s.name in baseline):
        value = baseline[spec.name]
        if spec.name not in params:
            return f"baseline {index} sets '{spec.name}', which is inactive for it"
        if spec.kind == "fixed" and value != spec.value:
            return f"baseline {index} has {spec.name}={value!r}, but it is fixed to {spec.value!r}"
        if not spec.contains(value, params):
            return f"baseline {index} has {spec.name}={value!r}, outside {spec.describe()}"
    return None


def searched_params(baseline: Mapping[str, Any], space: Sequence[ParamSpec]) -> dict[str, Any]:
    """The part of a baseline that Optuna must be told (fixed values are not Optuna params)."""
    fixed = {spec.name for spec in space if spec.kind == "fixed"}
    return {k: v for k, v in baseline.items() if k not in fixed}
