"""The one storage-URL value: parsed once, masked when shown, one answer to where its SQLite
file, artifacts and locks are; and the lock itself, on real files."""

from __future__ import annotations

import fcntl
import os
import threading

import pytest

from search.config.errors import SearchError
from search.config.settings import load_config
from search.config.urls import LOCK_DIR, StoreUrl
from search.storage.backends import DatabaseLock


def test_a_url_is_shown_masked_and_read_in_full_only_by_the_driver():
    url = StoreUrl("postgresql+psycopg://search:s3cret@db:5432/optuna")
    assert str(url) == f"{url}" == "postgresql+psycopg://search:***@db:5432/optuna"
    assert "s3cret" not in repr(url) and url.raw.endswith("s3cret@db:5432/optuna")
    assert (url.backend, url.sqlite_file, url.is_http) == ("postgresql", None, False)
    assert url.lock_key("trials:a") == StoreUrl("postgresql://other@db/x").lock_key("trials:a")
    assert url.lock_key("trials:a") != url.lock_key("trials:b")


def test_every_spelling_of_a_sqlite_url_names_the_same_file(tmp_path):
    plain, with_driver = StoreUrl(f"sqlite:///{tmp_path}/o.db"), StoreUrl(f"sqlite+pysqlite:///{tmp_path}/o.db")
    assert plain.sqlite_file == with_driver.sqlite_file == tmp_path / "o.db"
    assert plain.artifact_dir == with_driver.artifact_dir == tmp_path / "optuna-artifacts"
    assert plain.lock_file("x") == with_driver.lock_file("x")
    assert plain.lock_file("x").parent == LOCK_DIR != tmp_path


def test_a_url_that_names_no_file_or_is_not_a_url_is_refused_naming_its_key():
    with pytest.raises(SearchError, match=r"^tracking_uri=sqlite://: names no database file"):
        _ = StoreUrl("sqlite://", "tracking_uri").sqlite_file
    with pytest.raises(SearchError, match=r"^storage=sqlite:///:memory:: names no database file"):
        _ = StoreUrl("sqlite:///:memory:").sqlite_file
    with pytest.raises(SearchError, match=r"^storage=nonsense: not a database URL"):
        _ = StoreUrl("nonsense").parsed


def test_the_config_holds_url_values_that_print_masked(monkeypatch):
    monkeypatch.setenv("SEARCH_STORAGE", "postgresql://search:pw@db/optuna")
    config = load_config(["study=cnn3", "tracking_uri=http://u:pw@mlflow:5000"])
    assert str(config.storage) == "postgresql://search:***@db/optuna"
    assert config.tracking_uri.is_http and str(config.tracking_uri) == "http://u:***@mlflow:5000"
    assert config.raw["storage"] is None  # the tree keeps what was given (nothing here)


def test_a_held_lock_excludes_others_and_leaves_no_file_behind(tmp_path):
    url = StoreUrl(f"sqlite:///{tmp_path}/o.db")
    path = url.lock_file("trials:cnn3")
    with DatabaseLock(url, "trials:cnn3"):
        probe = os.open(path, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(probe)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # nothing beside the user's (future) database


def test_a_waiter_gets_the_lock_once_its_holder_releases_it(tmp_path):
    url = StoreUrl(f"sqlite:///{tmp_path}/o.db")
    order: list[str] = []
    first = DatabaseLock(url, "trials:s")
    acquired = threading.Event()

    def wait_for_it() -> None:
        with DatabaseLock(url, "trials:s"):
            order.append("second")
            acquired.set()

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    order.append("first")
    first.release()
    assert acquired.wait(30)
    waiter.join(30)
    assert order == ["first", "second"] and not url.lock_file("trials:s").exists()
