"""Study configuration: a YAML file under `studies/`, edited by `key=value` overrides, validated
into frozen dataclasses before anything touches a storage.

Every top-level key is one field of `StudyConfig`, declared there with its type, help, default
and constraint (`search.config.keys.key`); the keys of the `sampler:` and `pruner:` sections are
the fields of `SamplerConfig` and `PrunerConfig` (`search.config.strategies`), and every
hyperparameter is one `search.config.params.Param`. Validation, the defaults, --help and the
docs' key tables all read those declarations.

OmegaConf (not Hydra) does the merging and parses override values (YAML, plus numbers such as
`1e-3`): Hydra would own the process (working directory, logging, its own sweeper that hides the
trial and so cannot prune per epoch), while all we need is YAML, dotted keys and a resolved tree
we can check ourselves and print with `--cfg`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from search.config.datasets import DATASETS, DEFAULT_DATA_DIR
from search.config.devices import ALLOWED as DEVICES
from search.config.devices import device_word
from search.config.errors import SearchError, shown
from search.config.keys import (
    Flag,
    Function,
    GpuList,
    Key,
    OneOf,
    Optional,
    Seconds,
    StudyNames,
    Text,
    Whole,
    declare,
    declared,
    with_defaults,
)
from search.config.params import MODELS, known_params
from search.config.space import ENTRY_FIELDS, ParamSpec, check_baseline, parse_space
from search.config.strategies import PRUNERS, PrunerConfig, SamplerConfig
from search.config.urls import DEFAULTS, StoreUrl, store_url

MAX_SEED = 2**31 - 1  # numpy's and Optuna's samplers take 32-bit seeds; trial seeds add to it


@dataclass(frozen=True)
class StudyConfig:
    """A fully resolved, validated study: every top-level key of a study file, declared once
    (help, default, constraint; `search.config.keys`). `raw` keeps the merged tree for printing
    and hashing."""

    study: str = declare("study file under studies/ (or a path to a .yaml file)")
    model: str = declare(" | ".join(MODELS), check=OneOf(tuple(MODELS)))
    dataset: str = declare(" | ".join(DATASETS), check=OneOf(tuple(DATASETS)))
    data_dir: str = declare(
        "where datasets live / are downloaded to; only the default falls back to a system copy",
        str(DEFAULT_DATA_DIR), Text("a directory path"))
    val_size: int | None = declare(
        "validation images carved from the training set (default: 5000; fake: 256)",
        check=Optional(Whole(1, what="a whole number of images")))
    epochs: int = declare("most epochs a trial trains: the pruner's max resource", 10,
                          Whole(1, 100_000, "a whole number of epochs"))
    n_trials: int = declare("finished (complete + pruned) trials the study should have", 20,
                            Whole(1, 1_000_000, "a whole number of trials"))
    timeout: float | None = declare("seconds after which no new trial starts (default: none)",
                                    check=Optional(Seconds()))
    seed: int = declare("seeds the sampler, the validation split and every trial", 0,
                        Whole(0, MAX_SEED))
    device: str = declare("auto | cpu | cuda | cuda:N (auto: CUDA when present)", "auto",
                          Function(device_word, DEVICES))
    workers: int = declare("trial processes run at once against the same storage", 1,
                           Whole(1, 4096, what="a whole number of processes"))
    gpus: tuple[int, ...] | None = declare(
        "GPUs to place trial processes on, e.g. gpus=[0,1] or gpus=0,1: workers_per_gpu "
        "processes each, with CUDA_VISIBLE_DEVICES set", check=Optional(GpuList()))
    workers_per_gpu: int = declare("trial processes per GPU with gpus=", 1,
                                   Whole(1, 64, what="a whole number of processes"))
    storage: StoreUrl = declare(
        f"Optuna storage URL (default: $SEARCH_STORAGE, else {DEFAULTS['storage']})",
        check=Optional(Text("an Optuna storage URL such as sqlite:///path/to.db")))
    study_name: str = declare("name in the storage (default: the study file's name)",
                              check=Optional(Text("a non-empty name")))
    tracking_uri: StoreUrl = declare(
        f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {DEFAULTS['tracking_uri']}); "
        "none = off", check=Optional(Text("an MLflow tracking URI or 'none'")))
    max_params: int | None = declare(
        "size budget: a sampled model with more parameters is never trained and does not count "
        "toward n_trials; the sampler learns to avoid it (default: none)",
        check=Optional(Whole(1, what="a whole number of parameters")))
    warm_start: tuple[str, ...] | None = declare(
        "other studies in the same storage whose best configurations run first in a new study, "
        "e.g. warm_start=cnn3-fast or warm_start=[a,b]", check=Optional(StudyNames()))
    warm_start_top_k: int = declare("configurations taken from each warm_start study", 3,
                                    Whole(1, 1000, what="a whole number of configurations"))
    checkpoint_every: int | None = declare(
        "seconds between checkpoints of a running trial, from which its retry resumes if its "
        "process dies (0: every epoch; null: none)", 30,
        Optional(Whole(0, what="a whole number of seconds")))
    dry_run: bool = declare("true: build the smallest and largest model, push one batch, stop",
                            False, Flag())
    sampler: SamplerConfig = declare("the sampler", section=SamplerConfig)
    pruner: PrunerConfig = declare("the pruner", section=PrunerConfig)
    space: tuple[ParamSpec, ...] = declare(
        "the search space: space.NAME.FIELD edits an entry (low, high, log, step, choices); "
        "space.NAME=VALUE fixes a parameter", {})
    baselines: tuple[dict[str, Any], ...] = declare(
        "hand-tuned configurations run first in a new study", [])
    skipped_baselines: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def location_args(self, *, storage: bool = False) -> str:
        """`study=... [storage=...] [study_name=...]`: the words that find this study again, for
        the commands a run or a report prints (the storage always with `storage`, else only
        where it is not the default; the study file as given, a path included)."""
        words = [f"study={self.study}"]
        if storage or not self.storage.is_default:
            words.append(f"storage={self.storage}")
        if self.study_name != Path(self.study).stem:
            words.append(f"study_name={self.study_name}")
        return " ".join(words)

    @property
    def tracking_enabled(self) -> bool:
        return not self.tracking_uri.is_off

    def fingerprint_source(self) -> dict[str, Any]:
        """The values that must not change when a study is resumed."""
        return {key: self.raw[key] for key in FINGERPRINT_KEYS}

    def fingerprint(self) -> str:
        text = json.dumps(self.fingerprint_source(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# Every top-level key of a study, as StudyConfig declares it.
SETTINGS: dict[str, Key] = declared(StudyConfig)
# The sections whose fields are keys of their own (sampler.n_startup_trials, pruner.patience).
SECTIONS: dict[str, type] = {name: k.section for name, k in SETTINGS.items() if k.section}
SHORTHANDS = {section: f"{section}.name" for section in SECTIONS}  # sampler=random
# The part of the config that defines what a trial's value means; resuming with other values
# would mix incomparable trials in one study.
FINGERPRINT_KEYS = ("model", "dataset", "val_size", "epochs", "seed", "pruner", "space")


def defaults() -> dict[str, Any]:
    """Every top-level key with its default; sampler and pruner as their sections' defaults."""
    tree = {name: k.default for name, k in SETTINGS.items()}
    for section, record in SECTIONS.items():
        tree[section] = {name: k.default for name, k in declared(record).items()}
    return tree


def study_keys() -> dict[str, Key]:
    """Every key --help and the docs list, in order: a section as its name (`sampler`, which
    sets `sampler.name`) followed by its other fields (`sampler.n_startup_trials`)."""
    keys: dict[str, Key] = {}
    for name, k in SETTINGS.items():
        if k.section is None:
            keys[name] = k
            continue
        for field_name, field_key in declared(k.section).items():
            keys[name if field_name == "name" else f"{name}.{field_name}"] = field_key
    return keys


# ---------------------------------------------------------------- finding study files

def studies_dirs() -> list[Path]:
    """Where study files are looked up: ./studies first, then the one shipped beside the package."""
    candidates = [Path.cwd() / "studies", Path(__file__).resolve().parents[2] / "studies"]
    unique = []
    for path in candidates:
        if path.is_dir() and path.resolve() not in [p.resolve() for p in unique]:
            unique.append(path)
    return unique


def available_studies() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in studies_dirs():
        for path in sorted(directory.glob("*.yaml"), key=lambda p: p.stem):
            found.setdefault(path.stem, path)
    return found


def study_file(name: str) -> Path:
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise SearchError(f"study={name}: no such file.")
        return path
    studies = available_studies()
    if name not in studies:
        hint = difflib.get_close_matches(name, studies, n=1)
        raise SearchError(
            f"study={name}: unknown study" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f". Available studies: {', '.join(studies) or 'none found'} "
            f"(YAML files in {', '.join(str(d) for d in studies_dirs()) or './studies'}); "
            "a path to a .yaml file also works.")
    return studies[name]


# ---------------------------------------------------------------- overrides

def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """Splits `key=value` words; values are YAML as OmegaConf reads them (`[sgd,adam]`, `1e-3`,
    `true`, `null`). A key given twice is refused, as Hydra refuses it."""
    overrides = []
    for arg in args:
        key, sep, text = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SearchError(f"'{arg}' is not an override: write key=value, e.g. epochs=5 "
                              "(see --help for the keys).")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
            raise SearchError(f"'{key}' is not a valid key: use dotted names like space.lr.high.")
        full = SHORTHANDS.get(key, key)
        earlier = next((word for word, (k, _) in zip(args, overrides) if k == full), None)
        if earlier is not None:  # as Hydra does: taking the last one silently hides a typo
            raise SearchError(f"'{key}' is given twice ({earlier.strip()} and {arg.strip()}): "
                              "give each key once.")
        overrides.append((full, _parse_value(key, text)))
    return overrides


def _parse_value(key: str, text: str) -> Any:
    word = f"{key}={text if len(text) <= 60 else text[:57] + '...'}"
    if "${" in text:  # OmegaConf would resolve it against the config: a value is only a value
        raise SearchError(f"{word}: interpolations (${{...}}) are not supported in overrides; "
                          "write the value itself.")
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as error:
        # ValueError: a number of more than 4300 digits, which Python refuses to read
        reason = str(error).splitlines()[0][:200]
        raise SearchError(f"{word}: malformed value ({reason}). Lists are written [a,b,c], "
                          "strings need no quotes.") from None
    if isinstance(value, str) and text.strip().startswith(("[", "{")):
        raise SearchError(f"{word}: malformed list or mapping.")
    return value


def valid_keys(tree: dict[str, Any]) -> list[str]:
    """Every dotted key an override may set, for the 'did you mean' hint and --help."""
    keys = []
    for key, value in tree.items():
        keys.append(key)
        if key in SECTIONS:
            keys += [f"{key}.{name}" for name in declared(SECTIONS[key])]
        elif key == "space":
            for name, entry in value.items():
                keys.append(f"space.{name}")
                if isinstance(entry, dict):
                    # Any type's fields: an override may change the entry's type as well.
                    keys += [f"space.{name}.{f}" for f in dict.fromkeys(
                        f for fields in ENTRY_FIELDS.values() for f in fields)]
                    ranges = entry.get("ranges")
                    for parent, per_value in (ranges.items() if isinstance(ranges, dict) else ()):
                        keys += [f"space.{name}.ranges.{parent}"]
                        if isinstance(per_value, dict):
                            keys += [f"space.{name}.ranges.{parent}.{v}" for v in per_value]
    return keys


def _check_key(key: str, tree: dict[str, Any]) -> None:
    keys = valid_keys(tree)
    parts = key.split(".")
    if key in keys or (len(parts) in (4, 5) and parts[0] == "space" and parts[2] == "ranges"
                       and isinstance(tree["space"].get(parts[1]), dict)):
        return  # a range for a value not listed yet: space.lr.ranges.optimizer.adamw=[...]
    if parts[0] == "space" and len(parts) >= 2:
        name = parts[1]
        model = tree.get("model")
        if len(parts) == 2 and model in MODELS and name in known_params(model):
            return  # fixing a known parameter the study does not search: space.decoupled=true
        if name not in tree["space"]:
            hint = difflib.get_close_matches(name, list(tree["space"]), n=1)
            raise SearchError(
                f"{key}: '{name}' is not a parameter of this study's space"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f". Parameters: {', '.join(tree['space'])}.")
    hint = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    top = [k for k in keys if "." not in k]
    raise SearchError(f"unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                      + f". Valid keys: {', '.join(top)}, plus sampler.*, pruner.*, space.NAME.* "
                      "(see --help).")


def _check_not_replacing_a_section(key: str, value: Any, tree: dict[str, Any]) -> None:
    """space=0 would silently drop a whole search space: a section is set field by field
    (space.NAME=value is the exception: it fixes that parameter on purpose)."""
    parts = key.split(".")
    if len(parts) == 2 and parts[0] == "space":
        return
    current: Any = tree
    for part in parts:
        current = current.get(part) if isinstance(current, dict) else None
    removable = len(parts) > 1 and value is None  # space.lr.ranges=null drops the ranges
    if isinstance(current, dict) and not isinstance(value, dict) and not removable:
        fields_ = ", ".join(list(current)[:6])
        raise SearchError(f"{key}={shown(value)}: '{key}' is a section, not a value; set its "
                          f"fields instead ({key}.FIELD=..., fields: {fields_}).")


# ---------------------------------------------------------------- loading

def resolve_tree(overrides: list[tuple[str, Any]], default_study: str | None = None) -> dict[str, Any]:
    """Merges defaults, the study file and the overrides into one plain dict (not yet checked)."""
    given = dict(overrides)
    name = given.get("study", default_study)
    if not name:
        raise SearchError(f"no study given: add study=NAME (available: "
                          f"{', '.join(available_studies()) or 'none found'}).")
    path = study_file(str(name))
    try:
        from_file = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        raise SearchError(f"{path}: not a valid YAML study file ({error}).") from None
    if not isinstance(OmegaConf.to_container(from_file), dict):
        raise SearchError(f"{path}: a study file must be a YAML mapping.")
    unknown = [k for k in from_file if k not in SETTINGS]
    if unknown:
        raise SearchError(f"{path}: unknown key '{unknown[0]}'; allowed: {', '.join(SETTINGS)}.")
    try:
        tree = OmegaConf.merge(OmegaConf.create(defaults()), from_file)
        # The study as given: a name under studies/, or a path to a file (kept whole, so that the
        # commands printed for it find it again); its name in the storage is the file's stem.
        tree.study = str(name) if str(name).endswith((".yaml", ".yml")) else path.stem
        plain = OmegaConf.to_container(tree, resolve=True)
    except OmegaConfBaseException as error:
        raise SearchError(f"{path}: cannot be read ({str(error).splitlines()[0]}).") from None
    for key, value in overrides:
        if key == "study":
            continue
        _check_key(key, plain)
        _check_not_replacing_a_section(key, value, plain)
        try:
            OmegaConf.update(tree, key, value, merge=False)
            plain = OmegaConf.to_container(tree, resolve=True)
        except OmegaConfBaseException as error:
            reason = str(error).splitlines()[0]
            raise SearchError(f"{key}={shown(value)}: cannot be set ({reason}).") from None
    return plain


def _section(name: str, data: Any) -> Any:
    """`sampler` or `pruner`: each of its keys checked as its record declares it (`name` is
    quoted as the section itself: `sampler=...`); keys it leaves out take their defaults."""
    record = SECTIONS[name]
    if not isinstance(data, dict):
        raise SearchError(f"{name}={shown(data)}: expected a name or a mapping of {name} settings.")
    keys = declared(record)
    values = {}
    for field_name, value in data.items():
        if field_name not in keys:
            raise SearchError(f"{name}.{field_name}: unknown key; allowed: {', '.join(keys)}.")
        values[field_name] = keys[field_name].check(
            name if field_name == "name" else f"{name}.{field_name}", value)
    return record(**with_defaults(keys, values))


def build_config(tree: dict[str, Any]) -> StudyConfig:
    """Checks every value of a resolved tree; raises SearchError naming the key and what is allowed."""
    values = {key: setting.check(key, tree[key]) for key, setting in SETTINGS.items()
              if setting.check is not None}
    sampler, pruner = _section("sampler", tree["sampler"]), _section("pruner", tree["pruner"])
    if "reduction_factor" in PRUNERS[pruner.name].reads and pruner.reduction_factor < 2:
        raise SearchError(f"pruner.reduction_factor={pruner.reduction_factor}: must be >= 2.")
    if pruner.min_resource > values["epochs"]:
        raise SearchError(f"pruner.min_resource={pruner.min_resource}: must not exceed "
                          f"epochs={values['epochs']}.")
    space = parse_space(tree["space"], values["model"])
    baselines, skipped = _check_baselines(tree["baselines"], space)
    values["study_name"] = values["study_name"] or Path(tree["study"]).stem
    # URLs with credentials can stay out of the command line (and shell history).
    values["storage"] = store_url("storage", values["storage"])
    values["tracking_uri"] = store_url("tracking_uri", values["tracking_uri"])
    if values["gpus"] is not None:
        slots = len(values["gpus"]) * values["workers_per_gpu"]
        if values["workers"] not in (1, slots):
            raise SearchError(f"workers={values['workers']}: with gpus= the number of processes "
                              f"is len(gpus) x workers_per_gpu = {slots}; leave workers out.")
        values["workers"] = slots
    return StudyConfig(study=tree["study"], **values, sampler=sampler, pruner=pruner, space=space,
                       baselines=baselines, skipped_baselines=skipped, raw=tree)


def _check_baselines(raw: Any, space: tuple[ParamSpec, ...]) -> tuple[tuple[dict, ...], tuple[str, ...]]:
    """Baselines that no longer fit an edited space are skipped with a reason, not an error:
    narrowing `space.optimizer.choices` should not force the user to also edit the baselines."""
    if not isinstance(raw, list) or not all(isinstance(b, dict) for b in raw):
        raise SearchError("baselines: must be a list of parameter mappings.")
    kept, skipped = [], []
    for index, baseline in enumerate(raw):
        reason = check_baseline(index, baseline, space)
        (skipped.append(reason) if reason else kept.append(dict(baseline)))
    return tuple(kept), tuple(skipped)


def load_config(args: list[str], default_study: str | None = None) -> StudyConfig:
    """The one entry point: CLI words in, validated config out."""
    return build_config(resolve_tree(parse_overrides(args), default_study))


def shown_tree(config: StudyConfig) -> dict[str, Any]:
    """The resolved tree as it may be shown and stored: names and URLs resolved, passwords in
    URLs masked (the study's user attributes, config.yaml and --cfg are readable by others)."""
    tree = dict(config.raw)
    tree["study_name"] = config.study_name
    tree["storage"], tree["tracking_uri"] = str(config.storage), str(config.tracking_uri)
    return tree


def to_yaml(config: StudyConfig) -> str:
    """The resolved config as YAML, for --cfg and as a tracked artifact."""
    return yaml.safe_dump(shown_tree(config), sort_keys=False)
