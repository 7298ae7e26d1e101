"""Each trial's learning-curve PNG, drawn in a helper process so that no trial waits on it.

matplotlib needs about 0.1 s for the figure: as long as a whole epoch of a small model on a GPU,
and all of it holding the GIL, so a drawing thread would slow the training loop that launches
the next trial's kernels (on 2 CPU cores it measurably did). `CurveDrawer` keeps one
`python -m search.tracking.curves` process for the length of a study run and sends it one JSON line per
curve; the process writes each PNG in place (atomically) and exits when its input closes.

This module imports matplotlib only when it draws: the helper starts in well under a second,
without torch, and a trial process that never draws never imports it.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


History = Sequence[Mapping[str, float | None]]  # per epoch: epoch, train_/val_ accuracy and loss
WAIT_SECONDS = 60  # at the end of a run, for the curves still being drawn


def plot_learning_curve(history: History, title: str) -> Figure:
    """Accuracy and loss per epoch, train and validation; a pruned trial simply ends early."""
    # matplotlib is imported here, by the helper process that draws, not by every trial process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # Fixed margins: matplotlib's constrained layout would double the time to draw.
    figure = Figure(figsize=(8, 3.2))
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.87, wspace=0.22)
    FigureCanvasAgg(figure)  # Agg, whatever backend pyplot would pick: no display needed
    accuracy, loss = figure.subplots(1, 2)
    epochs = [m["epoch"] for m in history]
    # Fixed legend corners where the curves rarely go ("best" searches for one on every draw).
    for axes, key, corner in ((accuracy, "accuracy", "lower right"), (loss, "loss", "upper right")):
        axes.plot(epochs, [m[f"train_{key}"] for m in history], "o-", label="train")
        val = [m.get(f"val_{key}") for m in history]
        if any(v is not None for v in val):
            axes.plot(epochs, [math.nan if v is None else v for v in val], "o-",
                      label="validation")
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(key)
        axes.grid(alpha=0.3)
        axes.legend(loc=corner)
    accuracy.set_ylim(0, 1)
    figure.suptitle(title)
    return figure


def save_learning_curve(history: History, title: str, path: Path) -> None:
    """Writes the PNG through a temporary file, so a reader never sees half of it."""
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as handle:
        plot_learning_curve(history, title).savefig(handle, format="png", dpi=100)
    os.replace(handle.name, path)


class CurveDrawer:
    """Draws learning curves in the helper process; `draw` returns at once.

    If the helper cannot be started or its pipe breaks, the remaining curves are drawn in this
    process instead (slower, but drawn); the helper prints its own failures on stderr.
    """

    def __init__(self) -> None:
        self._helper: subprocess.Popen | None = None
        self._broken = False

    def draw(self, history: History, title: str, path: Path) -> None:
        request = json.dumps({"history": [dict(m) for m in history], "title": title,
                              "path": str(path)})
        helper = self._start()
        if helper is not None:
            try:
                helper.stdin.write(request + "\n")
                helper.stdin.flush()
                return
            except (BrokenPipeError, OSError):
                self._broken = True
        save_learning_curve(history, title, path)

    def _start(self) -> subprocess.Popen | None:
        if self._helper is None and not self._broken:
            try:
                # Its own process group: Ctrl-C in the terminal stops the run, which then closes
                # the helper's input; the helper finishes the curves it was sent and exits.
                self._helper = subprocess.Popen([sys.executable, "-m", "search.tracking.curves"],
                                                stdin=subprocess.PIPE, text=True, process_group=0)
                atexit.register(self.wait)  # also when the run ends without `wait`
            except OSError:
                self._broken = True
        return None if self._broken else self._helper

    def wait(self) -> None:
        """Returns once every curve sent so far is on disk (the helper then exits)."""
        helper, self._helper = self._helper, None
        if helper is None:
            return
        try:
            helper.stdin.close()
        except OSError:
            pass
        try:
            helper.wait(timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            helper.kill()
            print(f"warning: learning curves still unfinished after {WAIT_SECONDS} s were "
                  "abandoned.", file=sys.stderr)


def main() -> int:
    """The helper: one JSON request per input line, until the input closes."""
    for line in sys.stdin:
        try:
            request = json.loads(line)
            save_learning_curve(request["history"], request["title"], Path(request["path"]))
        except Exception as error:  # noqa: BLE001 - one bad curve must not stop the others
            print(f"warning: could not draw a learning curve ({type(error).__name__}: {error}).",
                  file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
