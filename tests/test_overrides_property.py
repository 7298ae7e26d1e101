"""A property of the whole override grammar: whatever a person types after `study=cnn3`, the
config either loads, with every value of its space valid for its parameter, or is refused with
a `SearchError` (one paragraph, exit 2 at the command line). Never another exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search.config.errors import SearchError
from search.config.params import PARAMS
from search.config.keys import declared
from search.config.settings import SECTIONS, SETTINGS, StudyConfig, load_config

FIELDS = ("type", "low", "high", "log", "step", "choices", "when", "ranges",
          "ranges.optimizer", "ranges.optimizer.sgd")
KNOWN_KEYS = [
    *SETTINGS,
    *[f"{section}.{name}" for section, record in SECTIONS.items() for name in declared(record)],
    *[f"space.{name}" for name in PARAMS],
    *[f"space.{name}.{field}" for name in PARAMS for field in FIELDS],
]
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(min_size=0, max_size=30))

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["sgd", "adam", "relu", "cosine", "float", "int",
                                           "categorical", "tpe", "hyperband", "cpu", "fake"]))
# Values as YAML text a person could type: lists and maps nested, in flow style.
structured = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from([*FIELDS, "optimizer", "a"]),
                                                  inner, max_size=3)), max_leaves=8)
values = st.one_of(
    structured.map(json.dumps),                                   # JSON is YAML
    st.text(alphabet="0123456789", min_size=1, max_size=6000),    # up to 6000 digits
    st.integers(min_value=-(2**70), max_value=2**70).map(lambda n: f"-{n:#x}" if n < 0 else hex(n)),
    st.sampled_from(["", "null", "~", ".inf", "-.inf", ".nan", "1e-3", "1e400", "-0", "[",
                     "{", "[sgd,", "{a: [1, {b: 2}]}", "${x}", "[[1], [2]]", "é", "日本", "\x00"]),
    st.text(max_size=40),                                         # any unicode
)


def check(words: list[str]) -> None:
    try:
        config = load_config(["study=cnn3", *words])
    except SearchError as error:
        assert str(error).strip(), words
        return
    assert isinstance(config, StudyConfig)
    for spec in config.space:
        param = PARAMS[spec.name]
        produced = ([spec.value] if spec.kind == "fixed" else list(spec.choices)
                    if spec.kind == "categorical" else [b for pair in spec.all_bounds() for b in pair])
        assert all(param.problem(v) is None for v in produced), (words, spec)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=keys, value=values)
def test_any_single_override_loads_or_is_refused_cleanly(key, value):
    check([f"{key}={value}"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(words=st.lists(st.tuples(st.sampled_from(KNOWN_KEYS), values), min_size=2, max_size=4))
def test_several_overrides_load_or_are_refused_cleanly(words):
    check([f"{key}={value}" for key, value in words])


@pytest.mark.parametrize("word", [
    "space.dropout.high=1.5", "space.dropout.low=-0.5", "space.batch_size.choices=[0]",
    "space.momentum.high=5", "space.gamma.high=10", "space.lr.when={optimizer: [lbfgs]}",
    "space.lr=null", "space.lr=", "space.batch_size.choices=[a,b]", "epochs=2.5",
    "epochs=" + "9" * 5000, "seed=-1", "timeout=0", "space.lr.when={optimizer: []}",
    "space.width_1.choices=[100000]", "study_name=${x}",
])
def test_the_reported_bad_inputs_are_refused(word):
    with pytest.raises(SearchError):
        load_config(["study=cnn3", word])
