"""The cluster recipes under deploy/ (SLURM, Kubernetes, Docker Compose), as files.

Each recipe is parsed as its tool would read it, its worker command is handed to the real CLI
with `--cfg` (which resolves and checks the config, then exits without touching a storage or
network), and its structure and credentials are checked: the storage URL comes from the
environment (a file, a Secret, .env), never a literal password. The SLURM recipe also runs on a
real SLURM in tests/test_slurm.py; no Kubernetes cluster or Docker daemon runs here.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from helpers import ROOT, cli_env

DEPLOY = ROOT / "deploy"
SBATCH = DEPLOY / "slurm" / "search.sbatch"
JOB = DEPLOY / "kubernetes" / "search-job.yaml"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
RECIPE_FILES = [SBATCH, JOB, COMPOSE, ENV_EXAMPLE, COMPOSE_DIR / "Dockerfile",
                COMPOSE_DIR / "init-databases.sql", DEPLOY / "README.md"]

PLACEHOLDER = "CHANGE-ME"
# What the recipes' programs find in their environment when they run (a password included, to
# see that --cfg masks it).
STORAGE = "postgresql://search:pw@db:5432/optuna"
TRACKING = "http://mlflow:5000"
# Shell variables the sbatch command refers to, as the script sets them.
SBATCH_VALUES = {"data_dir": "/shared/datasets"}

# $NAME, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}: shell and compose syntax.
VARIABLE = re.compile(r"\$(?:\{(?P<braced>\w+)(?::?(?P<op>[-?])(?P<arg>[^}]*))?\}|(?P<plain>\w+))")
# scheme://user:password@host
URL_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@'\"]+:([^\s@/'\"]+)@")
# PASSWORD=value, PGPASSWORD: value, POSTGRES_PASSWORD=value, ...
ASSIGNED_PASSWORD = re.compile(r"\b\w*PASSWORD\w*[ \t]*[:=][ \t]*([^\s#]+)")
REFERENCE = re.compile(r"\$\{\w+(:?[-?][^}]*)?\}")


def expand(word: str, values: dict[str, str]) -> str:
    """Substitutes variables as the shell or compose would, from `values` or their default."""
    def one(match: re.Match) -> str:
        name = match["braced"] or match["plain"]
        if name in values:
            return values[name]
        assert match["op"] == "-", f"{word!r}: ${name} has no value here and no default"
        return match["arg"]
    return VARIABLE.sub(one, word)


def after_module(command: list[str], module: str) -> list[str]:
    """The arguments of `python -m MODULE ...` in a command (whatever comes before python)."""
    for index in range(len(command) - 2):
        if command[index].startswith("python") and command[index + 1:index + 3] == ["-m", module]:
            return command[index + 3:]
    raise AssertionError(f"no `python -m {module}` in {command}")


# ---------------------------------------------------------------- reading each recipe

def sbatch_lines() -> list[str]:
    """The script's logical lines: backslash continuations joined, comments and blanks dropped."""
    lines, current = [], ""
    for raw in SBATCH.read_text().splitlines():
        if not current and raw.lstrip().startswith("#"):  # a comment: no continuation
            continue
        if raw.endswith("\\"):
            current += raw[:-1] + " "
            continue
        line, current = (current + raw).strip(), ""
        if line:
            lines.append(line)
    return lines


def sbatch_options() -> list[str]:
    return [line.split(maxsplit=1)[1] for line in SBATCH.read_text().splitlines()
            if line.startswith("#SBATCH ")]


def sbatch_arrays() -> dict[str, list[str]]:
    """The script's bash arrays as first assigned (`name=(word ...)`), split as bash splits them."""
    arrays: dict[str, list[str]] = {}
    for line in sbatch_lines():
        if match := re.fullmatch(r"(\w+)=\((.*)\)", line):
            arrays.setdefault(match[1], shlex.split(match[2]))
    return arrays


def sbatch_args() -> list[str]:
    """The arguments of the srun line's `python -m search.run`, an array's words in its place
    (as sbatch runs the script: no words after the script's name)."""
    sruns = [shlex.split(line) for line in sbatch_lines()
             if line.split()[0] == "srun" or line.startswith("exec srun ")]
    assert len(sruns) == 1, f"expected one srun line in {SBATCH.name}, found {len(sruns)}"
    words = []
    for word in after_module(sruns[0], "search.run"):
        array = re.fullmatch(r"\$\{(\w+)\[@\]\}", word)
        words += sbatch_arrays()[array[1]] if array else [word]
    return [expand(word, SBATCH_VALUES) for word in words]


def job_documents() -> dict[str, dict]:
    documents = [d for d in yaml.safe_load_all(JOB.read_text()) if d]
    kinds = {d["kind"]: d for d in documents}
    assert sorted(kinds) == ["Job", "Secret"] and len(documents) == 2
    return kinds


def job_container() -> dict:
    (container,) = job_documents()["Job"]["spec"]["template"]["spec"]["containers"]
    return container


def job_args() -> list[str]:
    command = job_container()["command"]
    assert isinstance(command, list) and all(isinstance(word, str) for word in command)
    return after_module([*command, *job_container().get("args", [])], "search.run")


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def compose_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def words(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def compose_args(service: str, module: str) -> list[str]:
    """A service's command as it runs: compose substitutes .env (copied from .env.example)."""
    values = env_example()
    command = words(compose_services()[service]["command"])
    return [expand(word, values) for word in after_module(command, module)]


RECIPES = {"slurm": sbatch_args, "kubernetes": job_args, "compose": lambda: compose_args(
    "worker", "search.run")}


# ---------------------------------------------------------------- the command, by the real CLI

@pytest.mark.parametrize("recipe", list(RECIPES))
def test_worker_command_is_accepted_by_the_cli(recipe: str) -> None:
    args = RECIPES[recipe]()
    # The storage (and its password) comes from the environment, never the command line; and
    # every worker runs the same command, nothing per task.
    assert not [a for a in args if a.startswith(("storage=", "tracking_uri="))], args
    assert not [a for a in args if "$" in a or "TASK_ID" in a or "INDEX" in a], args
    done = subprocess.run([sys.executable, "-m", "search.run", *args, "--cfg"],
                          env={**cli_env(), "SEARCH_STORAGE": STORAGE,
                               "MLFLOW_TRACKING_URI": TRACKING},
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{recipe}: search.run {' '.join(args)}\n{done.stderr}"
    config = yaml.safe_load(done.stdout)
    assert config["study"] == "cnn3" and config["model"] == "cnn3"
    assert config["storage"] == "postgresql://search:***@db:5432/optuna"  # from SEARCH_STORAGE
    assert config["tracking_uri"] == TRACKING
    assert ":pw@" not in done.stdout + done.stderr
    for arg in args:  # each key=value of the recipe is what the config says
        key, _, value = arg.partition("=")
        if "." not in key:
            assert config[key] == yaml.safe_load(value), arg


# ---------------------------------------------------------------- SLURM

def test_sbatch_is_a_requeueable_gpu_array_with_the_storage_from_a_private_file() -> None:
    options = sbatch_options()
    assert any(o.startswith("--array=") for o in options)
    assert "--requeue" in options
    assert any(o.startswith(("--gres=gpu:", "--gpus")) for o in options)
    assert any(o.startswith("--time=") for o in options)
    text = SBATCH.read_text()
    lines = sbatch_lines()
    assert "export SEARCH_STORAGE" in text and "-perm /077" in text
    assert any(line.startswith("export MLFLOW_TRACKING_URI=") for line in lines)
    assert not any(re.match(r"set -\w*x", line) for line in lines)  # would log the URL
    if shutil.which("bash"):
        checked = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True,
                                 check=False)
        assert checked.returncode == 0, checked.stderr


def test_sbatch_refuses_a_storage_url_among_its_words(tmp_path) -> None:
    """The script itself, run by bash up to its words (the refusal comes before srun): a storage
    URL after the script's name would be shown by scontrol to everyone."""
    storage_file = tmp_path / "search-storage"
    storage_file.write_text(STORAGE + "\n")
    storage_file.chmod(0o600)
    env = {**cli_env(), "SLURM_SUBMIT_DIR": str(ROOT), "SEARCH_VENV": sys.prefix,
           "SEARCH_STORAGE_FILE": str(storage_file)}
    done = subprocess.run(["bash", str(SBATCH), "epochs=3", f"storage={STORAGE}"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "error: storage= on the command line" in done.stderr
    assert ":pw@" not in done.stdout + done.stderr


# ---------------------------------------------------------------- Kubernetes

def test_job_is_indexed_with_the_storage_from_a_secret() -> None:
    documents = job_documents()
    spec, secret = documents["Job"]["spec"], documents["Secret"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] > 1 and spec["completions"] >= spec["parallelism"]
    assert spec["backoffLimit"] >= 1
    assert spec["template"]["spec"]["restartPolicy"] == "OnFailure"
    container = job_container()
    env = {e["name"]: e for e in container["env"]}
    reference = env["SEARCH_STORAGE"]["valueFrom"]["secretKeyRef"]
    assert reference["name"] == secret["metadata"]["name"]
    assert reference["key"] in secret.get("stringData", secret.get("data", {}))
    assert urlsplit(secret["stringData"][reference["key"]]).password == PLACEHOLDER
    assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    # `kubectl apply -l app.kubernetes.io/component=worker` applies the Job, not the placeholder.
    labels = {kind: d["metadata"]["labels"]["app.kubernetes.io/component"]
              for kind, d in documents.items()}
    assert labels["Job"] != labels["Secret"]


# ---------------------------------------------------------------- Docker Compose

def test_compose_services_healthchecks_and_databases(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose_services()
    assert {"postgres", "mlflow", "dashboard", "worker"} <= set(services)
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(words(postgres["healthcheck"]["test"]))
    worker = services["worker"]
    assert worker["deploy"]["replicas"] >= 2
    for name in ("worker", "mlflow", "dashboard"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, service in services.items():
        if "build" in service:
            assert (COMPOSE_DIR / service["build"]["context"] / service["build"]["dockerfile"]).is_file()

    # The init script creates the database of each URL.
    init = next(v.split(":")[0] for v in postgres["volumes"] if "docker-entrypoint-initdb.d" in v)
    created = set(re.findall(r"CREATE DATABASE (\w+)", (COMPOSE_DIR / init).read_text()))
    mlflow = words(services["mlflow"]["command"])
    assert mlflow[:2] == ["mlflow", "server"]
    backend = mlflow[mlflow.index("--backend-store-uri") + 1]
    storage = worker["environment"]["SEARCH_STORAGE"]
    assert {urlsplit(backend).path.lstrip("/"), urlsplit(storage).path.lstrip("/")} == created
    assert "--artifacts-destination" in mlflow

    # The MLflow server answers only Host headers it allows: the one the workers send must be.
    host = urlsplit(worker["environment"]["MLFLOW_TRACKING_URI"]).netloc
    for values in (env_example(), {}):  # .env as copied from the example, and the default
        allowed = expand(mlflow[mlflow.index("--allowed-hosts") + 1], values).split(",")
        assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed), (host, allowed)

    # The dashboard and the one-shot data download name the study and data of the workers.
    from search.config.settings import load_config

    monkeypatch.chdir(ROOT)  # studies/ is read from the working directory
    dashboard = compose_args("dashboard", "search.dashboard")
    assert "host=0.0.0.0" in dashboard
    assert load_config([a for a in dashboard if not a.startswith(("host=", "port="))]).study == "cnn3"
    fetch = load_config(compose_args("fetch-data", "search.run"))
    work = load_config(compose_args("worker", "search.run"))
    assert fetch.dry_run and (fetch.dataset, fetch.data_dir) == (work.dataset, work.data_dir)


def test_compose_passwords_come_from_env_file() -> None:
    services = compose_services()
    for name, service in services.items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: environment as a mapping"
        for key, value in environment.items():
            if "PASSWORD" in key:
                assert REFERENCE.fullmatch(str(value)), f"{name}: {key}={value} is not a ${{...}}"
            assert urlsplit(str(value)).password is None, f"{name}: {key} carries a password"
    assert env_example()["POSTGRES_PASSWORD"] == PLACEHOLDER
    # The real .env stays out of version control and out of the image.
    assert ".env" in (COMPOSE_DIR / ".gitignore").read_text().split()
    assert "**/.env" in (COMPOSE_DIR / "Dockerfile.dockerignore").read_text().split()


# ---------------------------------------------------------------- every file

@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_no_literal_password(path: Path) -> None:
    text = path.read_text()
    for password in URL_PASSWORD.findall(text) + ASSIGNED_PASSWORD.findall(text):
        password = password.strip("'\",")
        # The placeholder, a ${...} reference, or a password as the program prints it (masked).
        assert password in (PLACEHOLDER, "***") or password.startswith("${"), \
            f"{path.name}: {password!r}"
