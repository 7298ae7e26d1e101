"""Every command's keys (`search.report`, `search.train`, `search.predict`, `search.sync`,
`search.dashboard`), declared once like a study's (`search.config.keys`): --help, the checks
and the docs' key tables are generated from these. A key a command shares with a study
(`storage`, `study_name`, `device`, ...) is the study's own declaration.

The docs' tables are written between `<!-- keys: NAME -->` and `<!-- end of keys -->` in the
pages of `TABLES`; `python -m search.config.command_keys` rewrites them from the declarations,
and tests/test_keys.py fails when a written one differs.
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

from search.config.keys import Flag, Key, Text, TopN, Whole, markdown_table
from search.config.settings import SETTINGS, study_keys

# Where a study is, for a command that reads one (`search.storage.reading.open_source`).
LOCATION = {name: SETTINGS[name] for name in ("study", "storage", "study_name")}
# Where things are on this machine, not what the study is: a command reading a study may point
# them elsewhere (another data folder, another device, another MLflow); else as the study ran.
LOCAL = {
    "data_dir": Key("where the dataset is (default: as the study ran)",
                    check=SETTINGS["data_dir"].check),
    "device": replace(SETTINGS["device"], default=None),
    "tracking_uri": Key("MLflow tracking URI for the final runs; none = off (default: as the "
                        "study ran)", check=SETTINGS["tracking_uri"].check),
}
LOCAL_KEYS = tuple(LOCAL)
LOCATION_KEYS = (*LOCATION, *LOCAL)

SEEDS = Whole(1, 1000)  # training runs per configuration, for the report, search.train, the API

REPORT = {
    "study": Key("study file(s); several, comma-separated, are compared: study=cnn3,resnet20"),
    "storage": LOCATION["storage"],
    "study_name": Key("name(s) in the storage, comma-separated like study= (default: the file "
                      "names)"),
    "top_k": Key("configurations in the top table", 5, Whole(1)),
    "retrain": Key("none | topN: retrain the N best (and the baseline) on train+val, test them",
                   "none", TopN()),
    "seeds": Key("seeds per configuration in the final evaluation", 3, SEEDS),
    "out": Key("folder for the reports", "reports"),
    "device": replace(LOCAL["device"], help=LOCAL["device"].help + "; for retraining"),
    "data_dir": LOCAL["data_dir"],
    "tracking_uri": LOCAL["tracking_uri"],
}
TRAIN = {
    "study": LOCATION["study"],
    "trial": Key("the trial number to train again (required)", check=Whole(0)),
    "storage": LOCATION["storage"],
    "study_name": LOCATION["study_name"],
    "seeds": Key("training runs with different seeds; the first is the trial's own", 1, SEEDS),
    "full": Key("true: train on train + validation, evaluate on the test set, keep the models",
                False, Flag()),
    "out": Key("with full=true, models are saved in OUT/<study_name>/models/", "reports"),
    "device": LOCAL["device"],
    "data_dir": LOCAL["data_dir"],
}
PREDICT = {
    "model": Key("a saved model file, or an MLflow model URI (models:/NAME/VERSION, "
                 "runs:/ID/model)"),
    "images": Key("a folder of pictures (.png, .jpg, ...), one picture, an idx file or a CIFAR "
                  "batch"),
    "top_k": Key("classes shown per image", 3, Whole(1)),
    "device": replace(SETTINGS["device"], default="cpu"),
    "tracking_uri": replace(SETTINGS["tracking_uri"], help="the MLflow store of a model URI "
                            "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)"),
}
SYNC = {name: SETTINGS[name] for name in ("study", "storage", "study_name", "tracking_uri")}
# The server's own keys; the others are a study's (`search.config.settings.load_config`).
SERVER = {
    "port": Key("port to listen on", 8080, Whole(1, 65535, words="a port number from 1 to 65535")),
    "host": Key("address to bind (0.0.0.0 to reach it from other machines)", "127.0.0.1",
                Text("an address such as 127.0.0.1 or 0.0.0.0")),
}
DASHBOARD = {**LOCATION, **SERVER}

# The docs' key tables: (page under docs/, table name) -> its keys.
TABLES = {
    ("studies.md", "search.run"): study_keys(),
    ("reports.md", "search.report"): REPORT,
    ("reports.md", "search.train"): TRAIN,
    ("models.md", "search.predict"): PREDICT,
    ("tracking.md", "search.sync"): SYNC,
    ("tracking.md", "search.dashboard"): DASHBOARD,
}
# A table: its opening marker, its rows (each line starting with `|`), its closing marker.
_TABLE = re.compile(r"(<!-- keys: (\S+) -->\n)(?:\|.*\n)*(<!-- end of keys -->)")


def rendered(page: str, text: str) -> str:
    """A docs page with each key table replaced by the one generated from the declarations."""
    def table(match: re.Match) -> str:
        keys = TABLES[(page, match.group(2))]
        return match.group(1) + markdown_table(keys.items()) + "\n" + match.group(3)
    return _TABLE.sub(table, text)


def tables_in(text: str) -> list[str]:
    """The names of the key tables a page holds."""
    return [match.group(2) for match in _TABLE.finditer(text)]


def main(docs: Path = Path(__file__).resolve().parents[2] / "docs") -> int:
    """Rewrites every key table of the docs from the declarations; prints the pages changed."""
    for page in sorted({page for page, _ in TABLES}):
        path = docs / page
        text = path.read_text()
        new = rendered(page, text)
        if new != text:
            path.write_text(new)
            print(f"rewrote the key tables of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
