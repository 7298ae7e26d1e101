"""`python -m search.dashboard study=NAME [storage=...] [port=8080] [host=127.0.0.1]`: start
optuna-dashboard on a study's storage with its artifact folder (`search.tracking.dashboard_artifacts`) wired in,
and print the study's link."""

from __future__ import annotations

from typing import Any

import optuna_dashboard

from search.config.command_keys import DASHBOARD, SERVER
from search.config.command_line import help_text, run_command
from search.config.errors import SearchError
from search.config.keys import checked, with_defaults
from search.config.settings import load_config, parse_overrides
from search.storage.backends import artifact_store
from search.storage.reading import load_stored_study

EXAMPLES = ["study=cnn3", "study=cnn3 storage=sqlite:///runs/optuna.db port=8081"]
SUMMARY = ("Starts optuna-dashboard on a study's storage with its artifact folder wired in, so "
           "each trial's learning curve and config show next to its values. All studies of the "
           "storage are browsable; the link printed goes straight to this one.")


def _server_options(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The server's keys (`port`, `host`), checked, and the study's words."""
    ours = [arg for arg in argv if arg.partition("=")[0] in SERVER]
    given = checked(SERVER, dict(parse_overrides(ours)))
    return with_defaults(SERVER, given), [arg for arg in argv if arg not in ours]


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text("search.dashboard", SUMMARY, DASHBOARD, EXAMPLES, options=()))
        return 0
    unknown = [a for a in argv if a.startswith("-")]
    if unknown:
        raise SearchError(f"unknown option {unknown[0]}; options: --help.")
    options, rest = _server_options(argv)
    config = load_config(rest)
    _, storage = load_stored_study(config.storage, config.study_name)
    study_id = storage.get_study_id_from_name(config.study_name)
    folder = config.storage.artifact_dir
    # A dashboard only reads: an artifact folder that is not there (no trial has finished with
    # artifacts, or a database server's study seen from another folder) is not created.
    artifacts = artifact_store(config.storage) if folder.is_dir() else None
    print(f"optuna-dashboard for study '{config.study_name}' in {config.storage} "
          f"({'artifacts' if artifacts is not None else 'no artifacts: no folder'}: {folder}):\n"
          f"  http://{options['host']}:{options['port']}/dashboard/studies/{study_id}\n"
          "Ctrl-C stops it.", flush=True)
    try:
        optuna_dashboard.run_server(storage, host=options["host"], port=options["port"],
                                    artifact_store=artifacts)
    except OSError as error:
        raise SearchError(f"port={options['port']}: cannot listen on {options['host']} ({error}); "
                          "try another port=.") from None
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    run_command(main)
