"""Learning curves drawn by the helper process (search.tracking.curves), and the fallback without it."""

from __future__ import annotations

import sys

from search.tracking.curves import CurveDrawer

PNG = b"\x89PNG\r\n\x1a\n"


def _history(epochs: int) -> list[dict]:
    return [{"epoch": e, "train_loss": 2.0 / e, "train_accuracy": 0.2 * e, "val_loss": 2.1 / e,
             "val_accuracy": 0.18 * e} for e in range(1, epochs + 1)]


def test_the_helper_draws_every_curve_before_wait_returns(tmp_path):
    drawer = CurveDrawer()
    paths = [tmp_path / f"curve-{n}" for n in range(4)]
    for n, path in enumerate(paths):
        path.touch()  # the empty placeholder the dashboard registers first
        drawer.draw(_history(n + 1), f"trial {n}", path)
    drawer.wait()
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG) and data.endswith(b"IEND\xaeB`\x82")
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]  # no temp files


def test_a_bad_curve_warns_and_the_next_is_still_drawn(tmp_path, capfd):
    drawer = CurveDrawer()
    drawer.draw([{"epoch": 1}], "no metrics", tmp_path / "bad")
    drawer.draw(_history(3), "fine", tmp_path / "good")
    drawer.wait()
    assert (tmp_path / "good").read_bytes().startswith(PNG)
    assert not (tmp_path / "bad").exists()
    assert "could not draw a learning curve (KeyError" in capfd.readouterr().err


def test_without_a_helper_the_curve_is_drawn_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python-here"))
    drawer = CurveDrawer()
    drawer.draw(_history(2), "in process", tmp_path / "curve")
    assert (tmp_path / "curve").read_bytes().startswith(PNG)  # before any wait
    drawer.wait()
