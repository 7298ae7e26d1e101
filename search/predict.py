"""`python -m search.predict model=PATH|models:/NAME/VERSION images=FOLDER|FILE [top_k=3]`: classify
images with a final model (one that `search.report retrain=topN` or `search.train full=true`
saved, or the registered `<study_name>-best`)."""

from __future__ import annotations

import sys
import types

from search.config.command_keys import PREDICT as KEYS
from search.config.command_line import command_overrides, help_text, run_command
from search.config.errors import SearchError
from search.config.keys import checked, with_defaults

SUMMARY = ("Prints the top_k most probable classes of each image, with their probabilities, from "
           "a final model: a file under reports/<study_name>/models/ or an MLflow model URI such "
           "as models:/cnn3-best/1. Images are a folder of PNG/JPEG pictures, one picture, an idx "
           "file or a CIFAR batch file, of the size the model was trained on.")
EXAMPLES = ["model=reports/cnn3/models/trial-0007-seed-1.pt images=my_pictures/",
            "model=models:/cnn3-best/1 images=data/cifar-10-batches-py/test_batch top_k=1"]


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text("search.predict", SUMMARY, KEYS, EXAMPLES, options=()).replace(
            "study=NAME", "model=MODEL images=PATH", 1))
        return 0
    overrides = command_overrides(argv, "search.predict", KEYS)
    missing = [key for key in ("model", "images") if key not in overrides]
    if missing:
        raise SearchError(f"no {missing[0]} given: add {missing[0]}=... "
                          f"({KEYS[missing[0]].help}).")
    values = with_defaults(KEYS, checked(KEYS, overrides))
    from search.api import load_model, predict  # PyTorch loads here: --help stays fast

    model = load_model(str(values["model"]), device=str(values["device"]),
                       tracking_uri=values["tracking_uri"])
    predictions = predict(model, str(values["images"]), top_k=values["top_k"])
    print(f"model: {model.card.describe()}")
    for prediction in predictions:
        print(f"{prediction.image}: " + ", ".join(f"{name} {probability:.3f}"
                                                  for name, probability in prediction.classes))
    return 0


class _CommandModule(types.ModuleType):
    """Importing this command (`import search.predict`, as `python -m` and tests do) binds the
    name `search.predict` to the module, where the API's `search.predict(model, images)` is a
    function: called, the module is that function, so both spellings keep working."""

    def __call__(self, *args, **kwargs):
        from search.api import predict

        return predict(*args, **kwargs)


sys.modules[__name__].__class__ = _CommandModule

if __name__ == "__main__":
    run_command(main)
