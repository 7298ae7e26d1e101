"""What every `python -m search.*` command shares: `--help` text built from the config's own keys,
`--cfg`, turning a `SearchError` into a clean one-paragraph exit (no traceback), and a quick exit."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import textwrap
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from search.config.errors import SearchError
from search.config.params import PARAMS
from search.config.keys import Key
from search.config.settings import available_studies, parse_overrides, study_keys
from search.config.urls import masked

# Every key a study file or an override may set, as declared (baselines are written in a file).
STUDY_KEYS = {name: k for name, k in study_keys().items() if name != "baselines"}


def help_text(command: str, summary: str, keys: dict[str, Key], examples: list[str],
              options: tuple[str, ...] = ("--cfg",), with_params: bool = False) -> str:
    """The --help page: keys as declared, (for search.run) every searchable parameter, studies,
    examples."""
    width = max(len(k) for k in keys) + 2
    flags = "".join(f" [{o}]" for o in (*options, "--help"))
    lines = [f"usage: python -m {command} study=NAME [key=value ...]{flags}", "",
             textwrap.fill(summary, 96), "", "keys:"]
    for name, declared_key in keys.items():
        lines += textwrap.wrap(declared_key.help_line(), 100, initial_indent=f"  {name:<{width}}",
                               subsequent_indent=" " * (width + 2))
    if with_params:
        lines += ["", "parameters (space.NAME; which ones a study may use depends on its model):"]
        lines += [f"  {p.name:<18}{p.valid():<42} {p.help}" for p in PARAMS.values()]
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
        # Masked here whatever raised it: a message quoting a URL never shows its password.
        print(f"error: {masked(str(error))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `--help | head` closed the pipe: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the final flush is quiet
        return 141  # as a shell reports a command ended by SIGPIPE


# Every database connection a command opened (SQLite, PostgreSQL; Optuna's and MLflow's), so that
# `run_command` can close them itself.
_CONNECTIONS: list[Any] = []


def run_command(body: Callable[[list[str]], int]) -> NoReturn:
    """`python -m search.NAME`: runs `main_guard(body)` and exits without Python's teardown.

    With PyTorch, MLflow, scikit-learn and pandas loaded, the interpreter's own teardown (freeing
    every module) takes 1.5-2 s after the last line is printed, on every command. Instead, once
    the command is done: the exit handlers run as usual (logging, MLflow's queues, tqdm), every
    database connection is closed (the last close of a SQLite file checkpoints its write-ahead
    log into the file and removes `-wal`/`-shm`, as a normal exit does), the output is flushed,
    and the process ends. An uncaught exception still takes the normal path, with its traceback.
    """
    import sqlalchemy

    sqlalchemy.event.listen(sqlalchemy.pool.Pool, "connect",
                            lambda connection, _record: _CONNECTIONS.append(connection))
    status = main_guard(body)
    atexit._run_exitfuncs()
    for connection in reversed(_CONNECTIONS):
        with contextlib.suppress(Exception):  # already closed, or its driver refuses: fine
            connection.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def command_overrides(argv: list[str], command: str, keys: Mapping[str, Any]) -> dict[str, Any]:
    """`key=value` words of a command with its own small set of keys (report, train; the
    benchmarks), each key one of `keys`; the values as given (`search.config.keys.checked`
    checks them against their declarations)."""
    options = [a for a in argv if a.startswith("-")]
    if options:
        raise SearchError(f"unknown option {options[0]}; options: --help.")
    overrides = dict(parse_overrides(argv))
    unknown = [k for k in overrides if k not in keys]
    if unknown:
        raise SearchError(f"unknown key '{unknown[0]}' for {command}; keys: {', '.join(keys)}.")
    return overrides
