"""docker-compose.yml, its Dockerfiles and .env.example agree with each other and with prefect.yaml. No Docker
engine runs here, so the file is checked structurally (rendered with .env.example's values the way compose
interpolates), and `docker compose config` runs only where the compose plugin exists."""

from __future__ import annotations

import copy
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
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; `$$` escapes a literal `$`.
VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
# Images whose own default command is what we want.
RUNS_ITS_DEFAULT = {"postgres"}


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def referenced_vars(text: str) -> set[str]:
    return {m.group(1) for m in VAR.finditer(text)}


def render(text: str, env: dict[str, str]) -> dict:
    """The compose file as `docker compose` sees it with these variables (interpolation, then `$$` -> `$`)."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if (op in (":-", ":?") and not value) or (op in ("-", "?") and value is None):
            if op.endswith("?"):
                raise ValueError(f"{name} is required: {arg}")
            return arg
        return value or ""

    return yaml.safe_load(VAR.sub(sub, text).replace("$$", "$"))


def _host_ports(service: dict) -> list[str]:
    return [str(p).rsplit(":", 1)[0] for p in service.get("ports", []) if ":" in str(p)]


def compose_problems(compose: dict, pool: str) -> list[str]:
    """Everything wrong with a rendered compose file; empty when it is consistent."""
    problems = []
    services = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    seen_ports: dict[str, str] = {}
    for name, svc in services.items():
        if not (svc.get("image") or svc.get("build")):
            problems.append(f"{name}: neither image nor build")
        build = svc.get("build")
        if build:
            context = REPO / build["context"]
            if not context.is_dir() or not (context / build["dockerfile"]).is_file():
                problems.append(f"{name}: build context/dockerfile missing: {build}")
        if name not in RUNS_ITS_DEFAULT and not (svc.get("command") or svc.get("entrypoint")):
            problems.append(f"{name}: no command or entrypoint")
        for dep, spec in (svc.get("depends_on") or {}).items():
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
                continue
            condition = spec.get("condition") if isinstance(spec, dict) else None
            if condition == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name}: waits for {dep} to be healthy, which has no healthcheck")
            if condition == "service_completed_successfully" and services[dep].get("restart", "no") != "no":
                problems.append(f"{name}: waits for {dep} to complete, which restarts")
        for volume in svc.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if ":" in str(volume) and not source.startswith((".", "/", "~")) and source not in declared_volumes:
                problems.append(f"{name}: named volume {source} not declared")
        for port in _host_ports(svc):
            if port in seen_ports:
                problems.append(f"{name}: host port {port} also used by {seen_ports[port]}")
            seen_ports[port] = name
    gpu = services.get("dask-worker-gpu", {})
    devices = (((gpu.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    if not any("gpu" in d.get("capabilities", []) and d.get("driver") == "nvidia" for d in devices):
        problems.append("dask-worker-gpu: does not reserve an NVIDIA GPU")
    if "--resources GPU=1" not in " ".join(str(gpu.get("command", "")).split()):
        problems.append("dask-worker-gpu: does not advertise --resources GPU=1")
    worker = services.get("prefect-worker", {})
    env = worker.get("environment") or {}
    if env.get("CAPFACTORY_POOL") != pool or "--pool ${CAPFACTORY_POOL}" not in str(worker.get("command")):
        problems.append(f"prefect-worker: does not serve prefect.yaml's pool {pool!r}")
    bucket = services["minio-bucket"]["environment"]["CAPFACTORY_BUCKET"]
    for name in ("prefect-worker", "dask-worker-cpu", "dask-worker-gpu"):
        env = services.get(name, {}).get("environment") or {}
        if env.get("CAPFACTORY_S3_ENDPOINT") != "minio:9000" or not str(env.get("CAPFACTORY_STORE", "")).startswith(
                f"s3://{bucket}/"):
            problems.append(f"{name}: store is not the MinIO bucket {bucket}")
        if env.get("CAPFACTORY_DASK_ADDRESS") != "tcp://dask-scheduler:8786":
            problems.append(f"{name}: not attached to the compose Dask scheduler")
        if env.get("PREFECT_API_URL") != "http://prefect-server:4200/api":
            problems.append(f"{name}: does not report to the compose Prefect server")
    return problems


@pytest.fixture
def rendered() -> dict:
    return render(COMPOSE.read_text(), env_example())


def prefect_pool() -> str:
    pools = {d["work_pool"]["name"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    assert len(pools) == 1
    return pools.pop()


def test_compose_file_is_consistent(rendered):
    assert compose_problems(rendered, prefect_pool()) == []
    assert set(rendered["services"]) >= {"postgres", "prefect-server", "prefect-worker", "dask-scheduler",
                                         "dask-worker-cpu", "dask-worker-gpu", "minio", "minio-bucket", "vllm"}


def test_every_variable_is_in_env_example_and_every_entry_is_used():
    used = referenced_vars(COMPOSE.read_text())
    defined = set(env_example())
    assert used - defined == set(), "used in docker-compose.yml but missing from .env.example"
    assert defined - used == set(), "in .env.example but never used"
    with pytest.raises(ValueError, match="MINIO_ROOT_USER is required"):
        render(COMPOSE.read_text(), {k: v for k, v in env_example().items() if k != "MINIO_ROOT_USER"})


def test_the_checks_catch_a_broken_file(rendered):
    broken = copy.deepcopy(rendered)
    s = broken["services"]
    s["dask-worker-cpu"]["depends_on"]["minio-bucket"] = {"condition": "service_healthy"}
    s["dask-worker-gpu"]["command"] = "dask worker tcp://dask-scheduler:8786"
    del s["dask-worker-gpu"]["deploy"]
    s["prefect-worker"]["environment"]["CAPFACTORY_POOL"] = "elsewhere"
    s["dask-worker-cpu"]["environment"]["CAPFACTORY_S3_ENDPOINT"] = "s3.amazonaws.com"
    s["vllm"]["ports"] = ["4200:8000"]
    s["minio"]["volumes"] = ["undeclared:/data"]
    s["dask-scheduler"]["build"]["dockerfile"] = "infra/docker/Nope"
    s["prefect-worker"]["depends_on"]["ghost"] = {"condition": "service_started"}
    problems = "\n".join(compose_problems(broken, prefect_pool()))
    for expected in ("waits for minio-bucket to be healthy", "does not advertise --resources GPU=1",
                     "does not reserve an NVIDIA GPU", "pool 'capfactory'", "dask-worker-cpu: store is not",
                     "host port 4200", "named volume undeclared", "dask-scheduler: build context",
                     "unknown service ghost"):
        assert expected in problems


def test_the_gpu_services_are_opt_in_and_the_rest_start_without_a_gpu(rendered):
    for name, svc in rendered["services"].items():
        needs_gpu = "deploy" in svc
        assert needs_gpu == (svc.get("profiles") == ["gpu"]), name
    vllm = rendered["services"]["vllm"]
    command = " ".join(vllm["command"].split())
    assert f"--model {env_example()['VLLM_MODEL']}" in command and "--served-model-name capfactory-llm" in command


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


def _compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_accepts_the_file(tmp_path):
    command = _compose_command()
    if command is None:
        pytest.skip("neither the `docker compose` plugin nor docker-compose is installed here")
    done = subprocess.run([*command, "--env-file", str(ENV_EXAMPLE), "--profile", "gpu", "-f", str(COMPOSE),
                           "config", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
