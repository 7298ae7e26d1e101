"""Saved final models and `python -m search.predict`: the file round trip (weights and card,
readable with `weights_only=True`), the input forms a person brings (a folder of PNG/JPEG, one
picture, an idx file, a CIFAR batch) and a clear error for each bad one."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from helpers import make_model, predict
from PIL import Image

from search.config.datasets import DATASETS
from search.training.classifier import (
    class_scores,
    load_classifier,
    save_classifier,
)
from search.training.images import load_split
from search.training.results import MODEL_FORMAT


def write_pictures(folder, images: torch.Tensor) -> list[str]:
    folder.mkdir(exist_ok=True)
    names = []
    for index, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()
        picture = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
        names.append(f"{index:02d}.png")
        picture.save(folder / names[-1])
    return names


def top1(model, images: torch.Tensor) -> list[str]:
    return [model.card.classes[i] for i in class_scores(model, images).argmax(1).tolist()]


def test_a_saved_model_loads_with_its_card_and_identical_outputs(tmp_path):
    model = make_model()
    path = save_classifier(model, tmp_path / "m.pt")
    saved = torch.load(path, weights_only=True)  # plain tensors and values: no code runs
    assert saved["card"]["classes"] == list(DATASETS["fake"].classes)
    loaded = load_classifier(path)
    assert loaded.card == model.card
    images = load_split("fake", "data", train=False).images[:20]
    assert torch.equal(class_scores(loaded, images), class_scores(model, images))
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, 32, 32\)"):
        loaded(images[:, :1])


def fixed_devices(graph: torch.fx.Graph) -> list[str]:
    """The graph's operations that name a device (`to(cpu)`, an assertion on the input's device):
    each would pin the exported model to the device it was exported on."""
    def devices(value) -> list[str]:
        if isinstance(value, torch.device):
            return [str(value)]
        if isinstance(value, (list, tuple)):
            return [d for item in value for d in devices(item)]
        if isinstance(value, dict):
            return [d for item in value.values() for d in devices(item)]
        return []
    return [f"{node.target}: {devices((node.args, node.kwargs))}" for node in graph.nodes
            if devices((node.args, node.kwargs))]


def test_the_exported_graph_follows_its_inputs_device():
    """The MLflow model is this `torch.export` graph (exported as MLflow 3 exports a "pt2"
    model: a dynamic batch dimension). It used to hold `to(cpu)`, so after `.to("cuda")` it
    failed on a device mismatch. No GPU here: the graph names no device, and it runs on the
    "meta" device, where a fixed CPU would fail the same way CUDA did."""
    model = make_model()
    example = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    exported = torch.export.export(model, (example,), dynamic_shapes=[{0: torch.export.Dim.AUTO}])
    assert fixed_devices(exported.graph) == []
    images = load_split("fake", "data", train=False).images[:5]
    graph = exported.module()
    assert torch.equal(graph(images), model(images))  # the same numbers as the model
    assert graph.to("meta")(images.to("meta")).shape == (5, 10)


def test_files_that_are_not_models_are_refused(tmp_path):
    from search.config.errors import SearchError

    (tmp_path / "notes.pt").write_text("not a model")
    with pytest.raises(SearchError, match="not a model saved by search"):
        load_classifier(tmp_path / "notes.pt")
    model = make_model()
    model.card = dataclasses.replace(model.card, format=MODEL_FORMAT + 1)
    with pytest.raises(SearchError, match="newer version of search"):
        load_classifier(save_classifier(model, tmp_path / "future.pt"))


def test_predict_classifies_a_folder_and_one_picture(tmp_path, capsys):
    model = make_model()
    path = save_classifier(model, tmp_path / "m.pt")
    images = load_split("fake", "data", train=False).images[:5]
    names = write_pictures(tmp_path / "pictures", images)
    (tmp_path / "pictures" / "readme.txt").write_text("not a picture: skipped")
    code, out, err = predict(capsys, f"model={path}", f"images={tmp_path / 'pictures'}", "top_k=2")
    assert code == 0, err
    assert out[0].startswith("model: cnn3 on fake") and "trial 7" in out[0]
    lines = dict(line.split(": ", 1) for line in out[1:])
    assert list(lines) == names
    expected = top1(model, images)  # PNG is lossless: the same pixels, the same answer
    for name, first in zip(names, expected):
        shown = lines[name].split(", ")
        assert len(shown) == 2 and shown[0].rsplit(" ", 1)[0] == first
    code, out, _ = predict(capsys, f"model={path}", f"images={tmp_path / 'pictures' / names[3]}",
                           "top_k=1")
    assert code == 0 and out[1].startswith(f"{names[3]}: {expected[3]} ")


def test_predict_reads_idx_and_cifar_files_and_grey_pictures(tmp_path, capsys):
    grey = make_model("fashion_mnist")
    grey_path = save_classifier(grey, tmp_path / "grey.pt")
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    idx = tmp_path / "t10k-images-idx3-ubyte"
    idx.write_bytes(bytes([0, 0, 8, 3]) + np.array([4, 28, 28], ">u4").tobytes()
                    + images.numpy().tobytes())
    code, out, err = predict(capsys, f"model={grey_path}", f"images={idx}", "top_k=1")
    assert code == 0, err
    assert [line.split(": ")[1].rsplit(" ", 1)[0] for line in out[1:]] == top1(grey, images)
    assert out[1].startswith("t10k-images-idx3-ubyte[0]: ")
    names = write_pictures(tmp_path / "grey", images)
    code, out, _ = predict(capsys, f"model={grey_path}", f"images={tmp_path / 'grey'}", "top_k=1")
    assert code == 0 and [line.split(": ")[1].rsplit(" ", 1)[0] for line in out[1:]] == top1(grey, images)
    assert len(names) == 4

    colour = make_model()
    colour_path = save_classifier(colour, tmp_path / "colour.pt")
    rgb = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    batch = tmp_path / "test_batch"
    batch.write_bytes(pickle.dumps({b"data": rgb.reshape(3, -1).numpy(), b"labels": [0, 1, 2]}))
    code, out, err = predict(capsys, f"model={colour_path}", f"images={batch}", "top_k=1")
    assert code == 0, err
    assert [line.split(": ")[1].rsplit(" ", 1)[0] for line in out[1:]] == top1(colour, rgb)


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    path = save_classifier(make_model(), tmp_path / "m.pt")
    grey_path = save_classifier(make_model("fashion_mnist"), tmp_path / "grey.pt")
    Image.new("RGB", (64, 48)).save(tmp_path / "big.png")
    (tmp_path / "broken.jpg").write_text("not a jpeg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "other.bin").write_bytes(b"\x00\x01\x02 random bytes")
    cases = [
        ([f"model={path}", f"images={tmp_path / 'big.png'}"], "is 64x48 pixels; this model takes 32x32"),
        ([f"model={path}", f"images={tmp_path / 'broken.jpg'}"], "not a readable image"),
        ([f"model={path}", f"images={tmp_path / 'missing'}"], "no such file or folder"),
        ([f"model={path}", f"images={tmp_path / 'empty'}"], "the folder has no pictures"),
        ([f"model={path}", f"images={tmp_path / 'other.bin'}"], "not a picture"),
        ([f"model={tmp_path / 'nope.pt'}", f"images={tmp_path}"], "model=.*no such file"),
        ([f"images={tmp_path}"], "no model given"),
        ([f"model={path}", f"images={tmp_path}", "top_k=0"], "top_k"),
        ([f"model={path}", f"images={tmp_path}", "topk=3"], "unknown key 'topk'"),
    ]
    idx = tmp_path / "small-idx3-ubyte"
    idx.write_bytes(bytes([0, 0, 8, 3]) + np.array([1, 20, 20], ">u4").tobytes() + bytes(400))
    cases.append(([f"model={grey_path}", f"images={idx}"], "holds images of 20x20 pixels"))
    for words, message in cases:
        code, out, err = predict(capsys, *words)
        assert code == 2 and out == [] and err.startswith("error: "), (words, out, err)
        assert __import__("re").search(message, err), (words, err)
