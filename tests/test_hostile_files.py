"""Files and words a careless user or an attacker would give: code in a pickle never runs,
declared sizes are checked before anything is allocated (real bomb files, memory measured in a
fresh process), a saved model whose weights do not fit its card is one line, a database kind
without its driver is a message, and no message shows a URL's password."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, SMALL_PARAMS, cli_env, make_model, predict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search.api import load_model
from search.config.command_line import main_guard
from search.config.errors import SearchError
from search.config.settings import load_config
from search.run import main as run_main
from search.training import file_formats
from search.training.classifier import save_classifier
from search.training.image_files import read_images
from search.training.images import load_split
from search.training.models import build_model

# ---------------------------------------------------------------- writers of hostile files


class Payload:
    """Unpickling this makes the folder `marker`: the proof that code in a file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


class HugeArray:
    """Pickles as numpy does an array, with a shape that claims far more than the bytes given."""

    def __init__(self, shape: tuple[int, ...], data: bytes) -> None:
        self.shape, self.data = shape, data

    def __reduce__(self):
        reconstruct = np.zeros(1).__reduce__()[0]
        return reconstruct, (np.ndarray, (0,), b"b"), (1, self.shape, np.dtype(np.uint8), False,
                                                       self.data)


def cifar_batch(data, labels=(0, 1), protocol: int = 2) -> bytes:
    return pickle.dumps({b"batch_label": b"x", b"labels": list(labels), b"data": data},
                        protocol=protocol)


def png(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def png_bomb(side: int = 20000) -> bytes:
    """A real, valid grey PNG of side x side black pixels: 1.7 MB that decode to side^2 bytes."""
    compressor = zlib.compressobj(1)
    rows = b"\0" * ((side + 1) * 100)  # a filter byte and the pixels, a hundred rows at a time
    return png(side, side, b"".join(compressor.compress(rows) for _ in range(side // 100))
               + compressor.flush())


def idx_header(*dims: int) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def gzip_bomb(head: bytes, inflated_gb: float) -> bytes:
    """gzip members written one after another read as one stream: a header, then 64 MB of zeros
    compressed once (65 KB) and repeated, so inflated_gb of data costs no time to make."""
    zeros = gzip.compress(b"\0" * 2**26, compresslevel=9)
    return gzip.compress(head) + zeros * int(inflated_gb * 16)


# ---------------------------------------------------------------- code in a data file never runs


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_code_in_a_cifar_batch_never_runs(tmp_path, capsys, protocol):
    marker = tmp_path / "the-code-ran"
    rows = np.zeros((2, 3072), np.uint8)
    hostile = {
        "a global call": cifar_batch(Payload(marker), protocol=protocol),
        "an object array": cifar_batch(np.array([Payload(marker)], dtype=object),
                                       protocol=protocol),
        "a label": cifar_batch(rows, labels=[0, Payload(marker)], protocol=protocol),
    }
    model = save_classifier(make_model(), tmp_path / "m.pt")
    for case, content in hostile.items():
        folder = tmp_path / case / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (folder / name).write_bytes(content)
        with pytest.raises(SearchError, match="data_batch_1"):
            load_split("cifar10", folder.parent, train=True, download=False)
        code, out, err = predict(capsys, f"model={model}", f"images={folder / 'test_batch'}")
        assert code == 2 and out == [] and "test_batch" in err, (case, err)
        assert "this model takes 32x32 pixels with 3 channel(s)" in err, (case, err)
        assert not marker.exists(), f"code in {case} ran"
    # The same reader still takes a real batch, whatever protocol wrote it.
    (tmp_path / "good").write_bytes(cifar_batch(rows + 7, protocol=protocol))
    images, names = read_images(tmp_path / "good", channels=3, image_size=32)
    assert images.shape == (2, 3, 32, 32) and int(images[1, 2, 31, 31]) == 7
    assert names == ["good[0]", "good[1]"]


def test_a_pickle_that_names_any_other_global_is_refused_by_name(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": torch.zeros(2)}))  # torch's rebuild functions
    with pytest.raises(SearchError, match=r"names torch\..*which a data file does not hold"):
        file_formats.read_cifar_pickle(path)


# ---------------------------------------------------------------- declared sizes


def test_idx_dimensions_that_multiply_past_2_64_are_refused_from_the_header(tmp_path):
    path = tmp_path / "wrap-idx3-ubyte"
    path.write_bytes(idx_header(2**31, 2**31, 4) + bytes(16))  # 2^64: numpy's product wraps to 0
    with pytest.raises(SearchError, match="header declares 2147483648x2147483648x4 bytes"):
        file_formats.read_idx(path, ndim=3)


def test_a_gzip_idx_that_inflates_past_its_header_is_refused_after_the_declared_bytes(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip_bomb(idx_header(10, 28, 28), inflated_gb=0.1))
    with pytest.raises(SearchError, match="the data runs past that"):
        file_formats.read_idx(path, ndim=3, item_shape=(28, 28))


def test_other_idx_misfits_are_named(tmp_path):
    plain = tmp_path / "x-idx3-ubyte"
    plain.write_bytes(idx_header(3, 28, 28) + bytes(3 * 784 - 1))
    with pytest.raises(SearchError, match="holds 2351 bytes of data"):
        file_formats.read_idx(plain, ndim=3)
    plain.write_bytes(idx_header(3, 28, 20) + bytes(3 * 560))
    with pytest.raises(SearchError, match=r"items of shape \(28, 20\), not \(28, 28\)"):
        file_formats.read_idx(plain, ndim=3, item_shape=(28, 28))
    short = tmp_path / "y-idx3-ubyte.gz"
    short.write_bytes(gzip.compress(idx_header(3, 28, 28) + bytes(100)))
    with pytest.raises(SearchError, match="the data ends after 100"):
        file_formats.read_idx(short, ndim=3)
    (tmp_path / "fifo").mkdir()
    with pytest.raises(SearchError, match="not a regular file"):
        file_formats.read_idx(tmp_path / "fifo", ndim=3)


# Read in a fresh process, so that its peak memory is its own: each bomb is refused with one
# message, and the peak stays within 500 MB of the process's size after its imports.
MEMORY_PROBE = """
import json, resource, sys
from search.config.errors import SearchError
from search.training.image_files import read_images
import search.training.images, PIL.Image, PIL.PngImagePlugin
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = {}
for path, channels, size in json.loads(sys.argv[1]):
    try:
        read_images(path, channels=channels, image_size=size)
        results[path] = "read"
    except SearchError as error:
        results[path] = str(error)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grown_mb": (peak - before) / 1024, "results": results}))
"""


@pytest.mark.slow
def test_bomb_files_are_refused_in_bounded_memory(tmp_path):
    bombs = {
        "bomb.png": (png_bomb(), 3, 32),
        # 2 GB of zeros behind a header that declares 10 images: read up to the 10th image only.
        "small-header-idx3-ubyte.gz": (gzip_bomb(idx_header(10, 28, 28), 2), 1, 28),
        # The same zeros behind a header that declares them all: refused from the header.
        "big-header-idx3-ubyte.gz": (gzip_bomb(idx_header(2_700_000, 28, 28), 2), 1, 28),
        "wrap-idx3-ubyte": (idx_header(2**31, 2**31, 4) + bytes(64), 1, 28),
        # An array whose shape claims 3 TB, over 6 KB of rows.
        "huge-shape-batch": (cifar_batch(HugeArray((10**9, 3072), bytes(6144))), 3, 32),
        # Millions of small objects from a few MB of pickle.
        "many-objects-batch": (cifar_batch(np.zeros((2, 3072), np.uint8),
                                           labels=[0] * 3_000_000), 3, 32),
    }
    cases = []
    for name, (content, channels, size) in bombs.items():
        (tmp_path / name).write_bytes(content)
        cases.append([str(tmp_path / name), channels, size])
    assert (tmp_path / "small-header-idx3-ubyte.gz").stat().st_size < 3 * 2**20
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, json.dumps(cases)], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    messages = {Path(path).name: text for path, text in report["results"].items()}
    expected = {
        "bomb.png": "exceeds limit",
        "small-header-idx3-ubyte.gz": "the data runs past that",
        "big-header-idx3-ubyte.gz": "header declares 2700000x28x28 bytes",
        "wrap-idx3-ubyte": "holds images of 2147483648x4 pixels with 1 channel",
        "huge-shape-batch": "not a CIFAR batch file",
        "many-objects-batch": "more than 1,000,000 pickle operations",
    }
    for name, fragment in expected.items():
        assert fragment in messages[name], (name, messages[name])
        assert messages[name].startswith(f"images={tmp_path / name}: "), messages[name]
    assert report["grown_mb"] < 500, report


# ---------------------------------------------------------------- arbitrary bytes: SearchError only

ACCEPTED_KINDS = [".png", ".jpg", ".gif", ".bmp", ".webp", "-idx3-ubyte", "-idx3-ubyte.gz",
                  "_batch"]
VALID_PREFIXES = [png(32, 32, zlib.compress(b"\0" * 33 * 32)), idx_header(2, 28, 28),
                  gzip.compress(idx_header(2, 28, 28)),
                  cifar_batch(np.zeros((2, 3072), np.uint8))[:40], b"GIF89a", b"BM", b"\xff\xd8\xff"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(ACCEPTED_KINDS), prefix=st.sampled_from([b"", *VALID_PREFIXES]),
       tail=st.binary(max_size=600), channels=st.sampled_from([1, 3]))
def test_arbitrary_bytes_under_any_accepted_kind_give_only_a_search_error(
        tmp_path, kind, prefix, tail, channels):
    path = tmp_path / f"input{kind}"
    path.write_bytes(prefix + tail)
    size = 28 if channels == 1 else 32
    try:
        images, names = read_images(path, channels=channels, image_size=size)
    except SearchError as error:
        assert str(error).startswith(f"images={path}"), str(error)
    else:
        assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == (channels, size, size)
        assert len(names) == len(images)


# ---------------------------------------------------------------- saved models that do not fit


def test_weights_that_do_not_fit_their_card_are_one_line(tmp_path, capsys):
    model = make_model()
    edited = tmp_path / "edited.pt"
    saved = {"card": {**model.card.as_dict(), "params": {**SMALL_PARAMS, "width_1": 12}},
             "state_dict": model.network.state_dict()}
    torch.save(saved, edited)
    other = tmp_path / "other.pt"
    resnet = build_model("resnet20", {}, in_channels=3, image_size=32, num_classes=10)
    torch.save({"card": model.card.as_dict(), "state_dict": resnet.state_dict()}, other)
    huge = tmp_path / "huge.pt"
    torch.save({"card": {**model.card.as_dict(), "image_size": 10**6},
                "state_dict": model.network.state_dict()}, huge)
    cases = {edited: "is 8x3x3x3 float32 in the file, 12x3x3x3 float32 in cnn3",
             other: "is missing from the file", huge: "the card's sizes disagree"}
    for path, fragment in cases.items():
        code, out, err = predict(capsys, f"model={path}", f"images={tmp_path}")
        assert code == 2 and out == [] and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: model={path}: its weights do not fit its card (")
        assert fragment in err, err
        with pytest.raises(SearchError, match="do not fit its card") as raised:
            load_model(path)
        assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_a_model_file_with_code_in_it_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "the-code-ran"
    path = tmp_path / "m.pt"
    torch.save({"card": Payload(marker), "state_dict": {}}, path)
    with pytest.raises(SearchError, match="not a model saved by search"):
        load_model(path)
    assert not marker.exists()


# ---------------------------------------------------------------- URLs


@pytest.mark.parametrize("url, driver", [("mysql://search:PW-7@127.0.0.1/optuna", "MySQLdb"),
                                         ("mssql://search:PW-7@127.0.0.1/optuna", "pyodbc")])
def test_a_database_kind_without_its_driver_is_a_message(tmp_path, monkeypatch, capsys, url, driver):
    monkeypatch.chdir(tmp_path)
    code = main_guard(run_main, ["study=cnn3", "dataset=fake", f"storage={url}"])
    err = capsys.readouterr().err
    assert code == 2 and f"needs its driver {driver}, which is not installed" in err, err
    assert "PW-7" not in err and "search:***@127.0.0.1" in err
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


def test_no_message_shows_a_password(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    words = ["study=cnn3", "storage=postgresql://u:SECRET-1@db/optuna", "storage=sqlite:///x.db"]
    with pytest.raises(SearchError, match="SECRET-1"):  # raised with it; shown without it
        load_config(words)
    assert main_guard(run_main, words) == 2
    err = capsys.readouterr().err
    assert "given twice" in err and "SECRET-1" not in err and "u:***@db" in err

    def fails(_argv):
        raise SearchError("could not use tracking_uri=http://me:SECRET-2@host:5000/x nor "
                          "postgresql://me:SECRET-3@db/y")

    assert main_guard(fails, []) == 2
    err = capsys.readouterr().err
    assert "SECRET" not in err and "http://me:***@host:5000/x" in err and "me:***@db/y" in err


def test_links_pipes_and_non_images_are_named_with_what_the_model_takes(tmp_path, capsys):
    model = save_classifier(make_model("fashion_mnist"), tmp_path / "m.pt")
    os.symlink(tmp_path / "loop-a", tmp_path / "loop-b")
    os.symlink(tmp_path / "loop-b", tmp_path / "loop-a")
    folder = tmp_path / "pictures"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")  # reading it would block forever
    (tmp_path / "notes.txt").write_text("not an image")
    takes = "this model takes 28x28 pixels with 1 channel(s)."
    cases = {tmp_path / "loop-a": "a broken link or a link loop",
             folder: "pipe.png: not a regular file", tmp_path / "notes.txt": "not a picture"}
    for path, fragment in cases.items():
        code, out, err = predict(capsys, f"model={model}", f"images={path}")
        assert code == 2 and out == [] and fragment in err and err.strip().endswith(takes), err


def test_search_predict_is_the_api_function_even_once_the_command_is_imported(tmp_path):
    import search
    import search.predict  # noqa: F401 - binds the name search.predict to the command module

    model = make_model()
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(pictures / "black.png")
    [prediction] = search.predict(model, pictures, top_k=2)
    assert prediction.image == "black.png" and len(prediction.classes) == 2
