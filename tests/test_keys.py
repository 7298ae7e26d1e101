"""Keys declared once (`search.config.keys`, `search.config.command_keys`): the docs' key tables
and every command's --help are generated from the declarations, and the checks keep their
messages."""

from __future__ import annotations

import importlib

import optuna
import pytest
from helpers import ROOT

from search.config import command_keys
from search.config.command_line import STUDY_KEYS, help_text, main_guard
from search.config.errors import SearchError
from search.config.keys import checked, with_defaults
from search.config.settings import load_config
from search.config.strategies import (
    PRUNERS,
    SAMPLERS,
    describe_pruner,
    describe_sampler,
    make_pruner,
    make_sampler,
)


@pytest.mark.parametrize("page", sorted({page for page, _ in command_keys.TABLES}))
def test_the_docs_key_tables_are_the_declarations(page):
    """Run `python -m search.config.command_keys` to rewrite them after changing a key."""
    text = (ROOT / "docs" / page).read_text()
    assert sorted(command_keys.tables_in(text)) == sorted(
        name for table_page, name in command_keys.TABLES if table_page == page)
    assert command_keys.rendered(page, text) == text


def test_a_table_that_differs_from_the_declarations_would_be_found():
    text = (ROOT / "docs" / "studies.md").read_text()
    edited = text.replace("| `epochs` |", "| `epochs` | (edited by hand)", 1)
    assert edited != text and command_keys.rendered("studies.md", edited) == text


@pytest.mark.parametrize("command, keys", [
    ("report", command_keys.REPORT), ("train", command_keys.TRAIN),
    ("predict", command_keys.PREDICT), ("sync", command_keys.SYNC),
    ("dashboard", command_keys.DASHBOARD)])
def test_every_declared_key_is_in_its_commands_help(command, keys, capsys):
    module = importlib.import_module(f"search.{command}")
    assert main_guard(module.main, ["--help"]) == 0
    out = capsys.readouterr().out
    for name, key in keys.items():
        assert f"  {name} " in out and key.help.split()[0] in out, name


def test_every_study_key_and_its_default_is_in_the_help_of_search_run():
    text = help_text("search.run", "", STUDY_KEYS, [])
    for name in ("epochs", "sampler", "sampler.n_startup_trials", "pruner.patience", "space"):
        assert f"  {name} " in text, name
    flat = " ".join(text.split())
    assert "pruner.name (default: hyperband)" in flat and "(default: 10)" in flat


@pytest.mark.parametrize("keys, given, message", [
    (command_keys.SERVER, {"port": 0}, "port=0: expected a port number from 1 to 65535."),
    (command_keys.SERVER, {"host": ""}, "host='': expected an address such as 127.0.0.1"),
    (command_keys.REPORT, {"retrain": "best"}, "retrain='best': expected none or topN with N >= 1"),
    (command_keys.REPORT, {"top_k": 0}, "top_k=0: expected a whole number >= 1."),
    (command_keys.TRAIN, {"full": "maybe"}, "full='maybe': expected true or false."),
    (command_keys.TRAIN, {"device": "gpu"}, "device='gpu': unknown device; allowed: auto, cpu"),
])
def test_a_command_key_is_checked_as_declared(keys, given, message):
    with pytest.raises(SearchError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        checked(keys, given)


def test_defaults_come_from_the_declarations_as_their_checks_read_them():
    assert with_defaults(command_keys.REPORT, {})["retrain"] == 0
    assert with_defaults(command_keys.REPORT, checked(command_keys.REPORT,
                                                      {"retrain": "Top3"}))["retrain"] == 3
    assert with_defaults(command_keys.TRAIN, {})["seeds"] == 1
    assert with_defaults(command_keys.PREDICT, {})["device"] == "cpu"


def test_every_sampler_and_pruner_named_is_built():
    for name in SAMPLERS:
        config = load_config(["study=cnn3", f"sampler={name}"])
        assert isinstance(make_sampler(config.sampler, 0), optuna.samplers.BaseSampler)
    for name in PRUNERS:
        config = load_config(["study=cnn3", f"pruner={name}"])
        assert isinstance(make_pruner(config.pruner, config.epochs), optuna.pruners.BasePruner)


def test_the_report_describes_each_strategy_by_the_settings_it_reads():
    """A setting a strategy does not read is not shown (median has no reduction_factor); one it
    reads is shown with its value, so a study run with pruner.patience=7 says so."""
    config = load_config(["study=cnn3", "pruner=patient", "pruner.patience=7", "epochs=4"])
    assert describe_pruner(config.pruner, config.epochs) == "patient (patience 7)"
    config = load_config(["study=cnn3", "pruner=hyperband", "pruner.reduction_factor=4", "epochs=9"])
    assert describe_pruner(config.pruner, 9) == ("hyperband (min_resource 1, max_resource 9, "
                                                 "reduction_factor 4)")
    median = load_config(["study=cnn3", "pruner=median"]).pruner
    assert "reduction_factor" not in describe_pruner(median, 9)
    assert describe_pruner(load_config(["study=cnn3", "pruner=none"]).pruner, 9) == "none"
    assert describe_sampler(load_config(["study=cnn3", "sampler=random"]).sampler, 3) == \
        "random (seed 3)"
    tpe = load_config(["study=cnn3", "sampler=tpe", "sampler.n_startup_trials=4"]).sampler
    assert describe_sampler(tpe, 0) == "tpe (seed 0, n_startup_trials 4)"
