"""Deployments from prefect.yaml, and a local Prefect server + process worker for people without Docker.

prefect.yaml stays the single source of truth: `register_deployments` reads its deployments and pull steps and
creates them through the Prefect client (what `prefect deploy --all` does), with the dataset spec and the work pool
overridable per call, which `prefect deploy --all` cannot do for several deployments at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import yaml

from infra.settings import SpecError, load_spec

PROJECT_DIR = Path(__file__).resolve().parents[1]
PREFECT_FILE = PROJECT_DIR / "prefect.yaml"
DEFAULT_POOL = "capfactory"
SERVER_START_TIMEOUT = 180.0
STOP_TIMEOUT = 20.0
# A schedule entry of prefect.yaml: exactly one kind plus these options.
SCHEDULE_KINDS = ("cron", "interval", "rrule")
SCHEDULE_OPTIONS = ("timezone", "anchor_date", "active", "day_or")


class DeployError(RuntimeError):
    """prefect.yaml or a deploy option is unusable; the message says which entry and why."""


def load_project(prefect_file: Path = PREFECT_FILE) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The deployments and the project-level pull steps of a prefect.yaml."""
    try:
        data = yaml.safe_load(prefect_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DeployError(f"cannot read {prefect_file}: {e}") from None
    deployments = data.get("deployments") if isinstance(data, dict) else None
    if not deployments:
        raise DeployError(f"{prefect_file} has no `deployments:` list")
    for i, d in enumerate(deployments):
        if not (isinstance(d, dict) and d.get("name") and d.get("entrypoint")):
            raise DeployError(f"{prefect_file}: deployments[{i}] needs a `name` and an `entrypoint`")
    _check_stage_deployments(prefect_file, deployments)
    return deployments, list(data.get("pull") or [])


def _check_stage_deployments(prefect_file: Path, deployments: list[dict[str, Any]]) -> None:
    """The stage deployments are the stage registry's: one per stage, named as it, running just that stage."""
    from infra.stages import ORDER

    staged = {d["name"]: (d.get("parameters") or {}).get("stages") for d in deployments
              if (d.get("parameters") or {}).get("stages")}
    wrong = [f"{name} (stages: {stages})" for name, stages in staged.items() if stages != [name]]
    missing = [name for name in ORDER if name not in staged]
    if wrong or missing:
        raise DeployError(f"{prefect_file}: a stage deployment must be named as its stage and run only it "
                          f"(infra/stages.py); wrong: {', '.join(wrong) or '-'}; missing: {', '.join(missing) or '-'}")


def spec_parameter(spec: str | Path, project_dir: Path = PROJECT_DIR) -> str:
    """Validate a dataset spec now (not at the first scheduled run) and return the path to store: relative to
    the project when it lies inside it (so a worker with the project elsewhere, e.g. in a container, finds it),
    absolute otherwise."""
    path = Path(spec).resolve()
    load_spec(path)
    try:
        return str(path.relative_to(project_dir.resolve()))
    except ValueError:
        return str(path)


def _schedules(entry: dict[str, Any]) -> list:
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import construct_schedule

    out = []
    for item in entry.get("schedules") or []:
        kinds = [k for k in SCHEDULE_KINDS if k in item]
        unknown = set(item) - set(SCHEDULE_KINDS) - set(SCHEDULE_OPTIONS)
        if len(kinds) != 1 or unknown:
            raise DeployError(f"deployment {entry['name']!r}: a schedule needs exactly one of {SCHEDULE_KINDS} "
                              f"and only {SCHEDULE_OPTIONS}; got {sorted(item)}")
        schedule = construct_schedule(**{k: item[k] for k in (*kinds, "timezone", "anchor_date") if k in item})
        if "day_or" in item:
            schedule = schedule.model_copy(update={"day_or": item["day_or"]})
        out.append(DeploymentScheduleCreate(schedule=schedule, active=item.get("active", True)))
    return out


async def ensure_work_pool(client, name: str) -> None:
    """Create `name` as a process work pool unless it exists (whatever its type: the user's choice)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        await client.read_work_pool(name)
    except ObjectNotFound:
        pool = WorkPoolCreate(name=name, type="process",
                              base_job_template=ProcessWorker.get_default_base_job_template())
        with suppress(ObjectAlreadyExists):  # created meanwhile by another deploy
            await client.create_work_pool(pool)


async def _register(prefect_file: Path, spec: str | None, pool: str | None, names: list[str] | None) -> dict:
    from prefect import get_client
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    deployments, pull = load_project(prefect_file)
    if names:
        missing = set(names) - {d["name"] for d in deployments}
        if missing:
            raise DeployError(f"no deployment named {sorted(missing)} in {prefect_file}")
        deployments = [d for d in deployments if d["name"] in names]
    project_dir = prefect_file.resolve().parent
    flows: dict[str, Any] = {}
    ids: dict[str, UUID] = {}
    async with get_client() as client:
        for entry in deployments:
            work_pool = entry.get("work_pool") or {}
            pool_name = pool or work_pool.get("name") or DEFAULT_POOL
            await ensure_work_pool(client, pool_name)
            entrypoint = entry["entrypoint"]
            if entrypoint not in flows:  # the flow's name and parameter schema come from its code
                flows[entrypoint] = load_flow_from_entrypoint(str(project_dir / entrypoint))
            flow = flows[entrypoint]
            parameters = dict(entry.get("parameters") or {})
            if spec is not None:
                parameters["spec"] = spec
            flow_id = await client.create_flow_from_name(flow.name)
            ids[f"{flow.name}/{entry['name']}"] = await client.create_deployment(
                flow_id=flow_id, name=entry["name"], description=entry.get("description") or flow.description,
                tags=list(entry.get("tags") or []), parameters=parameters, entrypoint=entrypoint,
                work_pool_name=pool_name, work_queue_name=work_pool.get("work_queue_name"),
                job_variables=work_pool.get("job_variables") or {}, schedules=_schedules(entry),
                pull_steps=entry.get("pull", pull), paused=entry.get("paused"),
                parameter_openapi_schema=parameter_schema(flow).model_dump(exclude_unset=True),
                enforce_parameter_schema=entry.get("enforce_parameter_schema", True),
            )
    return ids


def register_deployments(prefect_file: Path = PREFECT_FILE, spec: str | Path | None = None, pool: str | None = None,
                         names: list[str] | None = None) -> dict[str, UUID]:
    """Create or update the deployments of `prefect_file` on the configured Prefect API; returns
    {"flow/deployment": id}. `spec` replaces every deployment's `spec` parameter, `pool` their work pool."""
    try:
        spec_value = spec_parameter(spec, prefect_file.resolve().parent) if spec is not None else None
    except SpecError as e:
        raise DeployError(str(e)) from None
    return asyncio.run(_register(prefect_file, spec_value, pool, names))


# ---- a local server + worker (`capfactory serve`) ----------------------------------------------------------------

@dataclass
class LocalStack:
    api_url: str
    ui_url: str
    server: subprocess.Popen
    worker: subprocess.Popen
    deployments: dict[str, UUID]


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def _spawn(cmd: list[str], env: dict[str, str], log: Path | None) -> subprocess.Popen:
    # A session of its own: stopping it reaches the children (the server's uvicorn, the worker's flow runs and
    # their Dask workers), and a Ctrl-C in the terminal reaches only us, who stop them in order.
    out = open(log, "ab") if log else None  # noqa: SIM115 - the child holds it; closed when we return
    try:
        return subprocess.Popen(cmd, env=env, cwd=PROJECT_DIR, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
    finally:
        if out:
            out.close()


def stop_process_group(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process's group, then SIGKILL what is left after `timeout`."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, even once its leader exited
    proc.wait()


def wait_for_api(proc: subprocess.Popen, api_url: str, timeout: float = SERVER_START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"the Prefect server exited with code {proc.returncode} before answering")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise DeployError(f"the Prefect server did not answer on {api_url} within {timeout:.0f} s")


@contextmanager
def local_stack(host: str = "127.0.0.1", port: int = 4200, pool: str = DEFAULT_POOL, spec: str | Path | None = None,
                prefect_file: Path = PREFECT_FILE, env: dict[str, str] | None = None,
                log_dir: Path | None = None) -> Iterator[LocalStack]:
    """A Prefect server (SQLite under $PREFECT_HOME, UI on) on host:port, the deployments registered on it, and a
    process worker on `pool`; everything is stopped (process groups) on exit. `env`: extra environment for both
    processes; `log_dir`: write their output to server.log / worker.log there instead of this terminal."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api_url = f"http://{host}:{port}/api"
    base = {**os.environ, **(env or {})}
    base.pop("PREFECT_API_URL", None)
    with ExitStack() as stack:
        server = _spawn(_prefect("server", "start", "--host", host, "--port", str(port)),
                        # The UI's own API address defaults to port 4200; on any other port it must be told.
                        {"PREFECT_UI_API_URL": api_url, **base, "PREFECT_UI_ENABLED": "true",
                         "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
                        log_dir / "server.log" if log_dir else None)
        stack.callback(stop_process_group, server)
        wait_for_api(server, api_url)
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            ids = register_deployments(prefect_file, spec=spec, pool=pool)
        worker_env = {**base, "PREFECT_API_URL": api_url,
                      "CAPFACTORY_PROJECT_DIR": str(prefect_file.resolve().parent)}
        worker = _spawn(_prefect("worker", "start", "--pool", pool, "--type", "process"), worker_env,
                        log_dir / "worker.log" if log_dir else None)
        stack.callback(stop_process_group, worker)  # runs first: no new flow runs while the server stops
        yield LocalStack(api_url=api_url, ui_url=f"http://{host}:{port}", server=server, worker=worker,
                         deployments=ids)
