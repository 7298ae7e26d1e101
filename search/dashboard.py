"""`python -m search.dashboard study=NAME [storage=...] [port=8080] [host=127.0.0.1]`: start
optuna-dashboard on a study's storage with its artifact folder (`search.tracking.dashboard_artifacts`) wired in,
and print the study's link."""

from __future__ import annotations

from typing import Any

import optuna_dashboard

from search.config.command_line import help_text, run_command
from search.config.errors import SearchError
from search.config.settings import load_config
from search.storage.backends import artifact_store
from search.storage.reading import load_stored_study

SERVER_KEYS = {"port": 8080, "host": "127.0.0.1"}
KEY_HELP = {
    "study": "the study file (its name is the default study_name)",
    "storage": "Optuna storage URL (default: sqlite:///mlruns/optuna.db)",
    "study_name": "the study in that storage (default: the study file's name)",
    "port": "port to listen on (default: 8080)",
    "host": "address to bind (default: 127.0.0.1; 0.0.0.0 to reach it from other machines)",
}
EXAMPLES = ["study=cnn3", "study=cnn3 storage=sqlite:///runs/optuna.db port=8081"]
SUMMARY = ("Starts optuna-dashboard on a study's storage with its artifact folder wired in, so "
           "each trial's learning curve and config show next to its values. All studies of the "
           "storage are browsable; the link printed goes straight to this one.")


def _server_options(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    options, rest = dict(SERVER_KEYS), []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in SERVER_KEYS:
            rest.append(arg)
        elif key == "port":
            if not (value.isdigit() and 1 <= int(value) <= 65535):
                raise SearchError(f"port={value}: expected a port number from 1 to 65535.")
            options["port"] = int(value)
        elif not value:
            raise SearchError("host=: expected an address such as 127.0.0.1 or 0.0.0.0.")
        else:
            options["host"] = value
    return options, rest


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text("search.dashboard", SUMMARY, KEY_HELP, EXAMPLES, options=()))
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
