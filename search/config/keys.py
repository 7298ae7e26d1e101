"""How a key is declared: its one line of help, its default and the constraint its values meet.

Every key a study file, an override or a command takes is one `Key`, and validation, `--help`,
`--cfg` and the key tables of the docs are all generated from these declarations. A config
record declares its keys as its own fields, so each key is stated once, with its type:

    @dataclass(frozen=True)
    class SamplerConfig:
        name: str = declare("tpe | random | gp", "tpe", OneOf(("tpe", "random", "gp")))

A constraint is a small frozen dataclass: called with (key, value) it returns the value (or its
parsed form) or raises a `SearchError` naming the key, the bad value and what is allowed; its
`allowed` says the same in words, for the docs.

Example:
    >>> Whole(1, 1000)("seeds", 3)
    3
    >>> Whole(1, 1000).allowed
    'a whole number >= 1 and <= 1,000'
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from search.config.errors import SearchError, shown

Check = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Key:
    """A key of a study file, an override or a command.

    Attributes:
        help: One line for --help and the docs.
        default: The value when none is given (None: none, or what the help line says).
        check: The constraint a value must meet (None: a section checked as a whole).
        section: For `sampler` and `pruner`: the record whose fields are its keys.
    """

    help: str
    default: Any = None
    check: Check | None = None
    section: type | None = None

    def help_line(self) -> str:
        """The help, with the declared default when there is one to show."""
        default = shown_default(self.default)
        return self.help + (f" (default: {default})" if default else "")

    @property
    def allowed(self) -> str:
        return getattr(self.check, "allowed", "")


def declare(help: str, default: Any = None, check: Check | None = None,
        section: type | None = None) -> Any:
    """A field of a config record that is a key: `epochs: int = declare("...", 10, Whole(1))`."""
    return field(metadata={"key": Key(help, default, check, section)})


def declared(record: type) -> dict[str, Key]:
    """The keys a config record declares, in its order."""
    return {f.name: f.metadata["key"] for f in fields(record) if "key" in f.metadata}


def checked(keys: dict[str, Key], given: dict[str, Any]) -> dict[str, Any]:
    """The values given for some of `keys`, each checked as declared, in the order declared."""
    return {name: given[name] if k.check is None else k.check(name, given[name])
            for name, k in keys.items() if name in given}


def with_defaults(keys: dict[str, Key], given: dict[str, Any]) -> dict[str, Any]:
    """Every one of `keys`: its value where given, else its declared default (as its check reads
    it: `retrain`'s `none` is 0)."""
    return {name: given[name] if name in given
            else k.check(name, k.default) if k.check is not None and k.default is not None
            else k.default for name, k in keys.items()}


def shown_default(value: Any) -> str:
    """A default as a person writes it: `true`, `5`, `data`; empty for none, a list or a map."""
    if value is None or isinstance(value, (list, dict)):
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _fail(key: str, value: Any, allowed: str) -> SearchError:
    return SearchError(f"{key}={shown(value)}: expected {allowed}.")


# ---------------------------------------------------------------- constraints

@dataclass(frozen=True)
class Whole:
    """A whole number in [minimum, maximum] (never a bool, never 2.0)."""

    minimum: int
    maximum: int | None = None
    what: str = "a whole number"
    words: str | None = None  # the allowed values in other words than `what >= minimum ...`

    @property
    def allowed(self) -> str:
        return self.words or (f"{self.what} >= {self.minimum}"
                              + (f" and <= {self.maximum:,}" if self.maximum is not None else ""))

    def __call__(self, key: str, value: Any) -> int:
        if (isinstance(value, bool) or not isinstance(value, int) or value < self.minimum
                or (self.maximum is not None and value > self.maximum)):
            raise _fail(key, value, self.allowed)
        return value


@dataclass(frozen=True)
class Seconds:
    """A positive, finite number of seconds (a float)."""

    allowed = "a number of seconds > 0"

    def __call__(self, key: str, value: Any) -> float:
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                or value == float("inf")):
            raise _fail(key, value, "a number of seconds > 0, or null")
        return float(value)


@dataclass(frozen=True)
class Text:
    """A string that is not blank."""

    allowed: str

    def __call__(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _fail(key, value, self.allowed)
        return value


@dataclass(frozen=True)
class Flag:
    allowed = "true or false"

    def __call__(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _fail(key, value, self.allowed)
        return value


@dataclass(frozen=True)
class OneOf:
    """One of a few names, with the closest one suggested."""

    names: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return ", ".join(self.names)

    def __call__(self, key: str, value: Any) -> str:
        if value not in self.names or not isinstance(value, str):
            hint = difflib.get_close_matches(str(value), self.names, n=1)
            raise SearchError(f"{key}={shown(value)}: unknown value"
                              + (f" (did you mean '{hint[0]}'?)" if hint else "")
                              + f"; allowed: {self.allowed}.")
        return value


@dataclass(frozen=True)
class Optional:
    """`null`, or a value `inner` accepts."""

    inner: Check

    @property
    def allowed(self) -> str:
        return f"{getattr(self.inner, 'allowed', 'a value')}, or null"

    def __call__(self, key: str, value: Any) -> Any:
        return None if value is None else self.inner(key, value)


@dataclass(frozen=True)
class Function:
    """A check written as a function of its own (`device_word`), with its allowed values."""

    function: Check
    allowed: str

    def __call__(self, key: str, value: Any) -> Any:
        return self.function(key, value)


@dataclass(frozen=True)
class StudyNames:
    """`name` or `[a, b]` (or `a,b`) -> names of studies."""

    allowed = "a study name or a list of them, e.g. [cnn3-fast, cnn3-wide]"

    def __call__(self, key: str, value: Any) -> tuple[str, ...]:
        names = (value.split(",") if isinstance(value, str)
                 else value if isinstance(value, list) else None)
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise _fail(key, value, self.allowed)
        return tuple(n.strip() for n in names)


@dataclass(frozen=True)
class GpuList:
    """`[0,1]` or `0,1` (or one id) -> (0, 1): distinct GPU ids."""

    allowed = "distinct GPU ids >= 0, e.g. gpus=[0,1] or gpus=0,1"

    def __call__(self, key: str, value: Any) -> tuple[int, ...]:
        items = (value.split(",") if isinstance(value, str)
                 else value if isinstance(value, list) else [value])
        try:
            ids = tuple(int(str(item).strip()) for item in items if not isinstance(item, bool))
        except ValueError:
            ids = ()
        if not ids or len(ids) != len(items) or min(ids) < 0 or len(set(ids)) != len(ids):
            raise _fail(key, value, self.allowed)
        return ids


@dataclass(frozen=True)
class TopN:
    """`none` or `topN` -> N (0 for none)."""

    allowed = "none or topN with N >= 1 (e.g. retrain=top3)"

    def __call__(self, key: str, value: Any) -> int:
        word = str(value).strip().lower()
        match = re.fullmatch(r"top(\d+)", word)
        if word != "none" and not (match and int(match.group(1)) >= 1):
            raise _fail(key, value, self.allowed)
        return int(match.group(1)) if match else 0


# ---------------------------------------------------------------- the docs' tables

def markdown_table(keys: Iterable[tuple[str, Key]]) -> str:
    """The docs' table of some keys, as generated from their declarations."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("<", "\\<")  # neither a column nor a tag

    lines = ["| key | meaning | allowed | default |", "| --- | --- | --- | --- |"]
    for name, declared_key in keys:
        default = shown_default(declared_key.default)
        lines.append(f"| `{name}` | {cell(declared_key.help)} | {cell(declared_key.allowed)} | "
                     + (f"`{default}`" if default else "") + " |")
    return "\n".join(lines)
