"""Config loading and every kind of bad input: each is a SearchError naming the key and what is allowed."""

from __future__ import annotations

import pytest
import yaml
from helpers import ROOT

from search.config.errors import SearchError
from search.config.settings import (
    available_studies,
    load_config,
    to_yaml,
)


def test_shipped_studies_load_with_their_baselines():
    assert {"cnn3", "resnet20", "cnn3-fashion"} <= set(available_studies())
    for name in ("cnn3", "resnet20", "cnn3-fashion"):
        config = load_config([f"study={name}"])
        assert config.model == name.split("-")[0]
        assert config.storage.is_default and str(config.storage) == "sqlite:///mlruns/optuna.db"
        assert config.study_name == name
        assert len(config.baselines) == 1 and not config.skipped_baselines
        names = [spec.name for spec in config.space]
        assert {"lr", "weight_decay", "batch_size", "optimizer", "momentum", "dropout",
                "schedule", "augment"} <= set(names)


def test_cnn3_space_covers_kernels_widths_and_head():
    names = {spec.name for spec in load_config(["study=cnn3"]).space}
    assert {f"kernel_size_{i}" for i in (1, 2, 3)} <= names
    assert {f"width_{i}" for i in (1, 2, 3)} <= names
    assert {"hidden_1", "hidden_2"} <= names


def test_resnet20_space_has_width_multiplier_and_stem():
    names = {spec.name for spec in load_config(["study=resnet20"]).space}
    assert {"width_multiplier", "stem_kernel_size"} <= names


def test_overrides_reach_every_level():
    config = load_config(["study=cnn3", "epochs=4", "n_trials=7", "sampler=random", "pruner=median",
                          "pruner.n_warmup_steps=0", "space.lr.ranges.optimizer.adam=[1e-5,0.05]",
                          "space.optimizer.choices=[sgd,adam]", "space.dropout=0.2",
                          "timeout=30", "study_name=other", "storage=sqlite:///x.db",
                          "space.decoupled=true"])  # a known parameter the study does not list
    by_name = {spec.name: spec for spec in config.space}
    assert (config.epochs, config.n_trials, config.timeout) == (4, 7, 30.0)
    assert config.sampler.name == "random" and config.pruner.name == "median"
    assert config.pruner.n_warmup_steps == 0
    assert by_name["lr"].bounds({"optimizer": "adam"}) == (1e-5, 0.05) and by_name["lr"].log
    assert by_name["lr"].bounds({"optimizer": "sgd"}) == (0.01, 0.3)  # the study file's
    assert by_name["optimizer"].choices == ("sgd", "adam")
    assert by_name["dropout"].kind == "fixed" and by_name["dropout"].value == 0.2
    assert by_name["decoupled"].kind == "fixed" and by_name["decoupled"].value is True
    assert (config.study_name, config.storage.raw) == ("other", "sqlite:///x.db")


def test_baseline_outside_an_edited_space_is_skipped_with_a_reason():
    config = load_config(["study=cnn3", "space.optimizer.choices=[sgd]"])
    assert config.baselines == ()
    assert "optimizer='adam'" in config.skipped_baselines[0]


def test_cfg_yaml_round_trips():
    config = load_config(["study=cnn3", "epochs=3"])
    tree = yaml.safe_load(to_yaml(config))
    assert tree["epochs"] == 3 and tree["space"]["lr"]["log"] is True


def test_fingerprint_follows_what_defines_a_trial():
    base = load_config(["study=cnn3"]).fingerprint()
    assert load_config(["study=cnn3", "n_trials=99", "timeout=5"]).fingerprint() == base
    assert load_config(["study=cnn3", "epochs=3"]).fingerprint() != base
    assert load_config(["study=cnn3", "space.lr.ranges.optimizer.sgd=[0.01,0.1]"]).fingerprint() != base


@pytest.mark.parametrize("args, expected", [
    (["study=cnn3", "epoch=3"], ["unknown key 'epoch'", "did you mean 'epochs'"]),
    (["study=cnn3", "space.lrr.high=1"], ["'lrr' is not a parameter", "did you mean 'lr'"]),
    (["study=cnn3", "space.lr.hihg=1"], ["space.lr.hihg", "did you mean 'space.lr.high'"]),
    (["study=cnn3", "epochs=abc"], ["epochs", "whole number"]),
    (["study=cnn3", "space=0"], ["'space' is a section", "space.FIELD"]),
    (["study=cnn3", "space.width_multiplier=2"], ["'width_multiplier' is not a parameter"]),
    (["study=cnn3", "space.lr.ranges=3"], ["'space.lr.ranges' is a section"]),
    (["study=cnn3", "epochs=0"], ["epochs", ">= 1"]),
    (["study=cnn3", "n_trials=2.5"], ["n_trials"]),
    (["study=cnn3", "space.optimizer.choices=[sgd,"], ["malformed value"]),
    (["study=cnn3", "space.lr.low=0.5", "space.lr.high=0.1"], ["space.lr", "low=0.5 is greater than high=0.1"]),
    (["study=cnn3", "space.weight_decay.low=0"], ["space.weight_decay", "log range needs low > 0"]),
    (["study=cnn3", "space.lr.low=0.001"], ["space.lr", "give both low and high"]),
    (["study=cnn3", "space.lr.low=0.001", "space.lr.high=0.1"], ["low and high are not used"]),
    (["study=cnn3", "space.lr.ranges.optimizer.lbfgs=[0.1,1]"], ["lbfgs", "which it never is"]),
    (["study=cnn3", "space.lr.ranges.optimizer.sgd=[0.1,0.01]"], ["empty range for optimizer=sgd"]),
    (["study=cnn3", "space.momentum.ranges={optimizer: {sgd: [0.5, 2]}}", "space.momentum.low=0",
      "space.momentum.high=0.9"], ["space.momentum", "2 is out of range"]),
    (["study=cnn3", "space.weight_decay.low=-1"], ["space.weight_decay", "low > 0"]),
    (["study=cnn3", "space.optimizer.choices=[]"], ["space.optimizer", "non-empty"]),
    (["study=cnn3", "space.optimizer.choices=[sgd,lion]"], ["lion", "sgd, adam, adamw, rmsprop, adagrad"]),
    (["study=cnn3", "dataset=imagenet"], ["dataset", "cifar10, cifar100, fashion_mnist, fake"]),
    (["study=cnn3", "model=vgg"], ["model", "cnn3, resnet20"]),
    (["study=cnn3", "sampler=cmaes"], ["sampler", "tpe, random, gp"]),
    (["study=cnn3", "pruner=hyperbnd"], ["did you mean 'hyperband'", "successive_halving"]),
    (["study=cnn3", "device=tpu"], ["device", "auto, cpu, cuda"]),
    (["study=cifar"], ["unknown study", "cnn3", "resnet20"]),
    ([], ["no study given", "cnn3"]),
    (["study=cnn3", "epochs"], ["not an override", "key=value"]),
    (["study=cnn3", "space.dropout.low=0.9"], ["space.dropout", "greater than high"]),
    (["study=cnn3", "space.width_1.step=2"], ["unknown field 'step'"]),
    (["study=cnn3", "space.batch_size.type=float"], ["space.batch_size", "for a float parameter"]),
    (["study=cnn3", "pruner.reduction_factor=1"], ["reduction_factor", ">= 2"]),
    (["study=cnn3", "pruner.min_resource=50", "epochs=5"], ["min_resource", "epochs=5"]),
    (["study=cnn3", "timeout=-1"], ["timeout"]),
])
def test_bad_input_names_the_key_and_what_is_allowed(args, expected):
    with pytest.raises(SearchError) as caught:
        load_config(args)
    for fragment in expected:
        assert fragment in str(caught.value)


def test_study_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: cnn3\ndataset: fake\nspace: {lr: {type: float, low: 1, high: 2}}\nepoch: 3\n")
    with pytest.raises(SearchError, match="unknown key 'epoch'"):
        load_config([f"study={bad}"])
    bad.write_text("model: cnn3\ndataset: fake\nspace: {learning_rate: {type: float, low: 1, high: 2}}\n")
    with pytest.raises(SearchError, match="unknown parameter.*did you mean 'lr'"):
        load_config([f"study={bad}"])
    bad.write_text("model: cnn3\ndataset: fake\nspace: {momentum: {type: float, low: 0, high: 1, "
                   "when: {optimizer: sgd}}, optimizer: sgd}\n")
    with pytest.raises(SearchError, match="defined before 'momentum'"):
        load_config([f"study={bad}"])


def test_a_key_given_twice_is_refused_naming_both_words():
    with pytest.raises(SearchError, match=r"'epochs' is given twice \(epochs=3 and epochs=4\)"):
        load_config(["study=cnn3", "epochs=3", "epochs=4"])
    with pytest.raises(SearchError, match="'sampler.name' is given twice"):  # a shorthand too
        load_config(["study=cnn3", "sampler=random", "sampler.name=tpe"])
    assert load_config(["study=cnn3", "space.dropout.low=0.0", "space.dropout.high=0.3"]).space


def test_a_study_given_as_a_path_is_found_again_by_the_commands_printed_for_it(tmp_path):
    path = tmp_path / "reports" / "x" / "next-study.yaml"
    path.parent.mkdir(parents=True)
    path.write_text((ROOT / "studies" / "cnn3.yaml").read_text())
    config = load_config([f"study={path}", "dataset=fake"])
    assert config.study_name == "next-study" and config.study == str(path)
    assert config.location_args() == f"study={path}"
    assert config.location_args(storage=True) == f"study={path} storage={config.storage}"
    named = load_config(["study=cnn3", "study_name=cnn3-lr", "storage=sqlite:///x.db"])
    assert named.location_args() == "study=cnn3 storage=sqlite:///x.db study_name=cnn3-lr"
