"""Study configuration: a YAML file under `studies/`, edited by `key=value` overrides, validated
into frozen dataclasses before anything touches a storage.

OmegaConf (not Hydra) does the merging: Hydra would own the process (working directory, logging,
its own sweeper that hides the trial and so cannot prune per epoch), while all we need is YAML,
dotted keys and a resolved tree we can check ourselves and print with `--cfg`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from search.errors import SearchError
from search.space import ParamSpec, check_baseline, parse_space

SAMPLERS = ("tpe", "random", "gp")
PRUNERS = ("hyperband", "median", "successive_halving", "patient", "none")
DEVICES = ("auto", "cpu", "cuda")
DATASET_NAMES = ("cifar10", "cifar100", "fashion_mnist", "fake")
MODEL_NAMES = ("cnn3", "resnet20")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
SCHEDULES = ("none", "cosine", "step")

# What the trainer understands in a trial's params (the model's own names are in MODEL_PARAMS).
TRAINER_PARAMS = (
    "lr", "weight_decay", "batch_size", "optimizer", "momentum", "nesterov", "beta1", "beta2",
    "alpha", "schedule", "step_size", "gamma", "augment", "label_smoothing",
)
MODEL_PARAMS = {
    "cnn3": ("kernel_size_1", "kernel_size_2", "kernel_size_3", "width_1", "width_2", "width_3",
             "hidden_1", "hidden_2", "dropout", "batch_norm", "activation"),
    "resnet20": ("width_multiplier", "stem_kernel_size", "dropout", "activation"),
}
# Categorical values the code understands, checked so a typo fails before the first trial.
KNOWN_VALUES = {
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "activation": ("relu", "leaky_relu", "silu", "swish", "gelu"),
}

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"

# Every top-level key a study file or an override may set, with its default. `study` names the file.
DEFAULTS: dict[str, Any] = {
    "study": None,
    "model": None,
    "dataset": None,
    "data_dir": "data",
    "val_size": None,
    "epochs": 10,
    "n_trials": 20,
    "timeout": None,
    "seed": 0,
    "device": "auto",
    "workers": 1,
    "direction": "maximize",
    "storage": None,
    "study_name": None,
    "tracking_uri": DEFAULT_TRACKING_URI,
    "dry_run": False,
    "sampler": {"name": "tpe", "n_startup_trials": 10},
    "pruner": {"name": "hyperband", "min_resource": 1, "reduction_factor": 3,
               "n_startup_trials": 5, "n_warmup_steps": 2, "patience": 5},
    "space": {},
    "baselines": [],
}
SHORTHANDS = {"sampler": "sampler.name", "pruner": "pruner.name"}
# The part of the config that defines what a trial's value means; resuming with other values
# would mix incomparable trials in one study.
FINGERPRINT_KEYS = ("model", "dataset", "val_size", "epochs", "seed", "pruner", "space")


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "tpe"
    n_startup_trials: int = 10


@dataclass(frozen=True)
class PrunerConfig:
    name: str = "hyperband"
    min_resource: int = 1
    reduction_factor: int = 3
    n_startup_trials: int = 5
    n_warmup_steps: int = 2
    patience: int = 5


@dataclass(frozen=True)
class StudyConfig:
    """A fully resolved, validated study. `raw` keeps the merged tree for printing and hashing."""

    study: str
    model: str
    dataset: str
    data_dir: str
    val_size: int | None
    epochs: int
    n_trials: int
    timeout: float | None
    seed: int
    device: str
    workers: int
    direction: str
    storage: str
    study_name: str
    tracking_uri: str
    dry_run: bool
    sampler: SamplerConfig
    pruner: PrunerConfig
    space: tuple[ParamSpec, ...]
    baselines: tuple[dict[str, Any], ...]
    skipped_baselines: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def tracking_enabled(self) -> bool:
        return self.tracking_uri.lower() != "none"

    def fingerprint_source(self) -> dict[str, Any]:
        """The values that must not change when a study is resumed."""
        return {key: self.raw[key] for key in FINGERPRINT_KEYS}

    def fingerprint(self) -> str:
        text = json.dumps(self.fingerprint_source(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- finding study files

def studies_dirs() -> list[Path]:
    """Where study files are looked up: ./studies first, then the one shipped beside the package."""
    candidates = [Path.cwd() / "studies", Path(__file__).resolve().parent.parent / "studies"]
    unique = []
    for path in candidates:
        if path.is_dir() and path.resolve() not in [p.resolve() for p in unique]:
            unique.append(path)
    return unique


def available_studies() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in studies_dirs():
        for path in sorted(directory.glob("*.yaml")):
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
    """Splits `key=value` words; values are YAML (`[sgd,adam]`, `1e-3`, `true`, `null`)."""
    overrides = []
    for arg in args:
        key, sep, text = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SearchError(f"'{arg}' is not an override: write key=value, e.g. epochs=5 "
                              "(see --help for the keys).")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
            raise SearchError(f"'{key}' is not a valid key: use dotted names like space.lr.high.")
        overrides.append((SHORTHANDS.get(key, key), _parse_value(key, text)))
    return overrides


def _parse_value(key: str, text: str) -> Any:
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        reason = str(error).splitlines()[0]
        raise SearchError(f"{key}={text}: malformed value ({reason}). Lists are written "
                          "[a,b,c], strings need no quotes.") from None
    if isinstance(value, str) and text.strip().startswith(("[", "{")):
        raise SearchError(f"{key}={text}: malformed list or mapping.")
    return _numbers_in(value)


def _numbers_in(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string; people mean a number."""
    if isinstance(value, list):
        return [_numbers_in(v) for v in value]
    if isinstance(value, str) and _FLOAT.fullmatch(value):
        return float(value)
    return value


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def valid_keys(tree: dict[str, Any]) -> list[str]:
    """Every dotted key an override may set, for the 'did you mean' hint and --help."""
    keys = []
    for key, value in tree.items():
        keys.append(key)
        if key in ("sampler", "pruner"):
            keys += [f"{key}.{k}" for k in asdict(SamplerConfig() if key == "sampler" else PrunerConfig())]
        elif key == "space":
            for name, entry in value.items():
                keys.append(f"space.{name}")
                if isinstance(entry, dict):
                    keys += [f"space.{name}.{f}" for f in ("type", "low", "high", "log", "step",
                                                          "choices", "when")]
    return keys


def _check_key(key: str, tree: dict[str, Any]) -> None:
    keys = valid_keys(tree)
    if key in keys:
        return
    head = key.split(".")[0]
    if head == "space" and key.count(".") >= 1:
        name = key.split(".")[1]
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
    unknown = [k for k in from_file if k not in DEFAULTS]
    if unknown:
        raise SearchError(f"{path}: unknown key '{unknown[0]}'; allowed: {', '.join(DEFAULTS)}.")
    tree = OmegaConf.merge(OmegaConf.create(DEFAULTS), from_file)
    tree.study = path.stem
    plain = OmegaConf.to_container(tree, resolve=True)
    for key, value in overrides:
        if key == "study":
            continue
        _check_key(key, plain)
        try:
            OmegaConf.update(tree, key, value, merge=False)
        except OmegaConfBaseException as error:
            raise SearchError(f"{key}={value!r}: cannot be set ({error.msg}).") from None
        plain = OmegaConf.to_container(tree, resolve=True)
    return plain


def _expect(key: str, value: Any, kind: type | tuple, allowed: str, *, minimum: float | None = None):
    if isinstance(value, bool) and kind is not bool:
        raise SearchError(f"{key}={value!r}: expected {allowed}.")
    if not isinstance(value, kind):
        raise SearchError(f"{key}={value!r}: expected {allowed}.")
    if minimum is not None and value < minimum:
        raise SearchError(f"{key}={value!r}: expected {allowed}.")
    return value


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        raise SearchError(f"{key}={value!r}: unknown value" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                          + f"; allowed: {', '.join(allowed)}.")
    return value


def _check_known_values(space: tuple[ParamSpec, ...]) -> None:
    for spec in space:
        allowed = KNOWN_VALUES.get(spec.name)
        if not allowed:
            continue
        values = spec.choices if spec.kind == "categorical" else (spec.value,)
        for value in values:
            _choice(f"space.{spec.name}", value, allowed)


def build_config(tree: dict[str, Any]) -> StudyConfig:
    """Checks every value of a resolved tree; raises SearchError naming the key and what is allowed."""
    model = _choice("model", tree["model"], MODEL_NAMES)
    dataset = _choice("dataset", tree["dataset"], DATASET_NAMES)
    device = tree["device"]
    if not (isinstance(device, str) and (device in DEVICES or re.fullmatch(r"cuda:\d+", device))):
        raise SearchError(f"device={device!r}: unknown device; allowed: auto, cpu, cuda, cuda:N.")
    timeout = tree["timeout"]
    if timeout is not None:
        _expect("timeout", timeout, (int, float), "a number of seconds > 0, or null", minimum=1e-9)
    val_size = tree["val_size"]
    if val_size is not None:
        _expect("val_size", val_size, int, "a whole number of validation images >= 1", minimum=1)
    if tree["direction"] != "maximize":
        raise SearchError(f"direction={tree['direction']!r}: studies maximise validation accuracy; "
                          "allowed: maximize.")
    sampler, pruner = tree["sampler"], tree["pruner"]
    _choice("sampler", sampler.get("name"), SAMPLERS)
    _choice("pruner", pruner.get("name"), PRUNERS)
    for section, data, cls in (("sampler", sampler, SamplerConfig), ("pruner", pruner, PrunerConfig)):
        allowed = asdict(cls())
        for key, value in data.items():
            if key not in allowed:
                raise SearchError(f"{section}.{key}: unknown key; allowed: {', '.join(allowed)}.")
            if key != "name":
                _expect(f"{section}.{key}", value, int, "a whole number >= 1"
                        if key != "n_warmup_steps" else "a whole number >= 0",
                        minimum=0 if key == "n_warmup_steps" else 1)
    if pruner.get("name") in ("hyperband", "successive_halving") and pruner.get("reduction_factor", 2) < 2:
        raise SearchError(f"pruner.reduction_factor={pruner['reduction_factor']}: must be >= 2.")
    epochs = _expect("epochs", tree["epochs"], int, "a whole number of epochs >= 1", minimum=1)
    if pruner.get("min_resource", 1) > epochs:
        raise SearchError(f"pruner.min_resource={pruner['min_resource']}: must not exceed epochs={epochs}.")
    space = parse_space(tree["space"], TRAINER_PARAMS + MODEL_PARAMS[model])
    _check_known_values(space)
    baselines, skipped = _check_baselines(tree["baselines"], space)
    study_name = tree["study_name"] or tree["study"]
    _expect("study_name", study_name, str, "a non-empty name")
    storage = tree["storage"] or DEFAULT_STORAGE
    _expect("storage", storage, str, "an Optuna storage URL such as sqlite:///path/to.db")
    _expect("tracking_uri", tree["tracking_uri"], str, "an MLflow tracking URI or 'none'")
    _expect("data_dir", tree["data_dir"], str, "a directory path")
    return StudyConfig(
        study=tree["study"], model=model, dataset=dataset, data_dir=tree["data_dir"],
        val_size=val_size, epochs=epochs,
        n_trials=_expect("n_trials", tree["n_trials"], int, "a whole number of trials >= 1", minimum=1),
        timeout=float(timeout) if timeout is not None else None,
        seed=_expect("seed", tree["seed"], int, "a whole number"),
        device=device,
        workers=_expect("workers", tree["workers"], int, "a whole number of processes >= 1", minimum=1),
        direction="maximize", storage=storage, study_name=study_name,
        tracking_uri=tree["tracking_uri"],
        dry_run=_expect("dry_run", tree["dry_run"], bool, "true or false"),
        sampler=SamplerConfig(**sampler), pruner=PrunerConfig(**pruner),
        space=space, baselines=baselines, skipped_baselines=skipped, raw=tree,
    )


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


def to_yaml(config: StudyConfig) -> str:
    """The resolved config as YAML, for --cfg and as a tracked artifact."""
    tree = dict(config.raw)
    tree["study_name"], tree["storage"] = config.study_name, config.storage
    return yaml.safe_dump(tree, sort_keys=False)
