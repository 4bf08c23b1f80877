"""Deployments for real, on loopback: a `prefect server start` (SQLite in a temporary PREFECT_HOME) and a process
worker started the way `capfactory serve` starts them, prefect.yaml's deployments registered on it, one run
triggered through the API and executed by the worker, its artifacts checked in the store and the run found in the
Prefect UI (headless Chromium). The run, the schedule and the CLI listings run once more on a Prefect server backed
by a real PostgreSQL server (tests/pg_server.py), the database docker-compose.yml gives it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from pg_server import postgres_server, server_bin_dir

from infra.deploy import PREFECT_FILE, DeployError, local_stack, register_deployments
from infra.loopback_server import ImageServer
from infra.net import free_port
from infra.stages import ORDER as STAGES

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO.parent / "shared" / "data" / "photos" / "images").glob("*.jpg"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path("/tmp/prefect-ui.png")
RUN_TIMEOUT = 400  # seconds for the worker to pick the run up, start it and finish it


def write_spec(folder: Path, urls: list[str]) -> Path:
    import pyarrow as pa

    pq.write_table(pa.table({"url": urls, "caption": [f"photo {i}" for i in range(len(urls))]}),
                   folder / "urls.parquet")
    spec = {"name": "deployed", "store": str(folder / "store"), "inputs": [{"path": "urls.parquet"}],
            "ingest": {"shard_size": 4, "download": {"allow_cidrs": ["127.0.0.0/8"], "retries": 0}},
            "stages": ["ingest"]}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def photo_server():
    with ImageServer(PHOTOS[:3]) as srv:
        yield srv


@contextlib.contextmanager
def serving(tmp: Path, photo_server: ImageServer, database_url: str | None = None):
    """Server + worker + deployments, as `capfactory serve --spec <tmp spec>` runs them; the server's database is
    SQLite in a temporary PREFECT_HOME, or `database_url`."""
    spec = write_spec(tmp, photo_server.image_urls(6))
    # The scheduler visits the schedules every 5 s instead of 60: a new schedule's runs appear sooner.
    env = {"PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url  # the setting docker-compose.yml gives the server
    with local_stack(port=free_port(), spec=spec, env=env, log_dir=tmp) as s:
        s.spec, s.tmp = spec, tmp
        yield s


@contextlib.contextmanager
def talking_to(stack):
    """Prefect clients in this block (get_client, run_deployment) use this stack's API."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
        yield


@pytest.fixture(scope="module")
def stack(tmp_path_factory, photo_server):
    """The SQLite-backed stack; the module's default API."""
    with serving(tmp_path_factory.mktemp("stack"), photo_server) as s, talking_to(s):
        yield s


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server on loopback for this module; a missing server fails the tests, it never skips them."""
    try:
        server_bin_dir()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory, photo_server, postgres_url):
    with serving(tmp_path_factory.mktemp("pg-stack"), photo_server, postgres_url) as s:
        yield s


def _read(coro_fn):
    from prefect import get_client

    async def main():
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(main())


def test_every_deployment_of_prefect_yaml_is_registered_on_the_pool_with_the_spec(stack):
    from prefect.client.schemas.sorting import DeploymentSort

    deployments = _read(lambda c: c.read_deployments(limit=50, sort=DeploymentSort.NAME_ASC))
    by_name = {d.name: d for d in deployments}
    assert set(by_name) == {"build", "refresh", *STAGES}
    assert set(stack.deployments) == {f"build/{n}" for n in by_name}
    for name, d in by_name.items():
        assert d.entrypoint == "flows/build.py:build_flow"
        assert d.work_pool_name == "capfactory"
        assert d.parameters["spec"] == str(stack.spec)  # the --spec override, outside the project: absolute
        assert d.parameters.get("stages") == ([name] if name in STAGES else None)
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                 {"directory": "{{ $CAPFACTORY_PROJECT_DIR }}"}}]
        assert set(d.parameter_openapi_schema["properties"]) >= {"spec", "stages", "dask_address", "workers"}
    refresh = by_name["refresh"].schedules
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in refresh] == [("0 3 * * *", "UTC", True)]
    assert all(not by_name[n].schedules for n in by_name if n != "refresh")
    pool = _read(lambda c: c.read_work_pool("capfactory"))
    assert pool.type == "process"


def test_deploy_rejects_a_bad_spec_and_unknown_names_before_registering_anything(stack, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: ok\ningest: {shard_size: -1}\n")
    with pytest.raises(DeployError, match=r"ingest\.shard_size"):
        register_deployments(spec=bad)
    with pytest.raises(DeployError, match="cannot read dataset spec"):
        register_deployments(spec=tmp_path / "missing.yaml")
    with pytest.raises(DeployError, match="no deployment named"):
        register_deployments(names=["nope"])


def test_cli_deploy_creates_a_missing_pool_and_keeps_project_specs_relative(stack):
    env = {**os.environ, "PREFECT_API_URL": stack.api_url}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--spec", "examples/laion-sample.yaml",
                           "--pool", "other-pool", "--name", "build"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deployed build/build" in done.stdout
    d = _read(lambda c: c.read_deployment_by_name("build/build"))
    assert d.work_pool_name == "other-pool" and d.parameters["spec"] == "examples/laion-sample.yaml"
    assert _read(lambda c: c.read_work_pool("other-pool")).type == "process"
    no_api = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    refused = subprocess.run([sys.executable, "-m", "flows.cli", "deploy"], cwd=REPO, env=no_api,
                             capture_output=True, text=True, timeout=180)
    assert refused.returncode == 2 and "PREFECT_API_URL" in refused.stderr


def test_prefect_yaml_is_readable_by_prefect_deploy():
    from prefect.cli.deploy._models import PrefectYamlModel  # the model `prefect deploy` validates with

    model = PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_FILE.read_text()))
    assert {d.name for d in model.deployments} == {"build", "refresh", *STAGES}
    assert all(d.work_pool.name == "capfactory" for d in model.deployments)


def run_ingest(stack):
    """The `ingest` deployment run through the API by the worker, with a worker-sized cluster."""
    from prefect.deployments import run_deployment

    with talking_to(stack):
        return run_deployment("build/ingest", parameters={"workers": 1}, timeout=RUN_TIMEOUT, poll_interval=2)


@pytest.fixture(scope="module")
def finished_run(stack):
    return run_ingest(stack)


@pytest.fixture(scope="module")
def pg_finished_run(pg_stack):
    return run_ingest(pg_stack)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request):
    """(stack, its finished ingest run) on each database the Prefect server runs on here: SQLite (the local
    default) and PostgreSQL (docker-compose's)."""
    prefix = "" if request.param == "sqlite" else "pg_"
    return request.getfixturevalue(f"{prefix}stack"), request.getfixturevalue(f"{prefix}finished_run")


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 300)
def test_the_run_is_listed_in_the_prefect_ui(stack, finished_run):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{stack.ui_url}/runs", timeout=60_000)
            page.get_by_text(finished_run.name).first.wait_for(timeout=60_000)
            page.screenshot(path=str(SCREENSHOT))
            page.get_by_text(finished_run.name).first.click()
            page.wait_for_url(f"**/runs/flow-run/{finished_run.id}**", timeout=60_000)
            page.get_by_text("Completed").first.wait_for(timeout=60_000)
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 300)
def test_a_deployment_run_by_the_worker_lands_its_shards_in_the_store(served):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    stack, finished_run = served
    assert finished_run.state.is_completed(), (finished_run.state, (stack.tmp / "worker.log").read_text()[-4000:])
    raw = stack.tmp / "store" / "deployed" / "ingest"
    assert sorted(p.name for p in raw.glob("shard-*.stats.json")) == ["shard-00000.stats.json",
                                                                     "shard-00001.stats.json"]
    table = pq.read_table(raw / "shard-00000.parquet")
    assert table.num_rows == 4 and set(table.column("status").to_pylist()) == {"ok"}
    with talking_to(stack):
        children = _read(lambda c: c.read_flow_runs(
            limit=10, sort=FlowRunSort.START_TIME_ASC,
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[finished_run.id]))))
    assert [r.state.name for r in children] == ["Completed"]  # the ingest stage ran as a subflow


@pytest.mark.slow
def test_the_postgresql_backed_server_keeps_its_state_in_postgresql(pg_stack, pg_finished_run, postgres_url):
    """Not SQLite by accident: the deployments and the run are rows of the PostgreSQL database."""
    import asyncpg

    async def main():
        db = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            names = {r["name"] for r in await db.fetch("SELECT name FROM deployment")}
            state = await db.fetchval("SELECT state_type FROM flow_run WHERE id = $1", pg_finished_run.id)
            return names, state
        finally:
            await db.close()

    names, state = asyncio.run(main())
    assert names == {"build", "refresh", *STAGES}
    assert state == "COMPLETED"
    assert not list((pg_stack.tmp / "prefect-home").glob("*.db"))


@pytest.mark.slow
def test_prefect_cli_listings_work_against_the_projects_server(served):
    """`prefect deployment|flow|flow-run|work-pool ls`: fastapi >= 0.151 made the server answer 422 to the CLI's
    `limit: null` (pinned below it)."""
    stack, _ = served
    env = {**os.environ, "PREFECT_API_URL": stack.api_url, "COLUMNS": "250"}  # wide tables: names not cut
    prefect = str(Path(sys.executable).with_name("prefect"))
    outputs = {}
    for what in ("deployment", "flow", "flow-run", "work-pool"):
        done = subprocess.run([prefect, what, "ls"], env=env, capture_output=True, text=True, timeout=180)
        # Not a bare "422": run ids in the table may contain it.
        assert done.returncode == 0 and "Unprocessable" not in done.stdout + done.stderr, (what, done.stderr[-2000:])
        outputs[what] = done.stdout
    assert "build/ingest" in outputs["deployment"] and "capfactory" in outputs["work-pool"]
    assert "build" in outputs["flow"] and "Completed" in outputs["flow-run"].title()


def test_a_short_schedule_is_fired_by_the_scheduler_and_run_by_the_worker(served):
    """Not only registered: the server's scheduler creates the runs (SQLAlchemy 2.1 broke it) and the worker runs
    them."""
    import time
    from datetime import timedelta

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.schedules import IntervalSchedule

    stack, _ = served
    with talking_to(stack):
        deployment = _read(lambda c: c.read_deployment_by_name("build/ingest"))
        [schedule] = _read(lambda c: c.create_deployment_schedules(
            deployment.id, [(IntervalSchedule(interval=timedelta(seconds=10)), True)]))
        only = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        try:
            deadline, fired = time.monotonic() + RUN_TIMEOUT, []
            while time.monotonic() < deadline and not fired:
                time.sleep(3)
                runs = _read(lambda c: c.read_flow_runs(deployment_filter=only))
                fired = [r for r in runs if r.auto_scheduled and r.state and r.state.is_completed()]
            assert fired, [(r.name, r.auto_scheduled, r.state_name) for r in runs]
        finally:
            _read(lambda c: c.delete_deployment_schedule(deployment.id, schedule.id))


def test_capfactory_serve_prints_the_ui_and_stops_everything_on_ctrl_c(tmp_path):
    import signal

    import httpx
    import psutil

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    children: list = []
    try:
        lines = []
        for line in serve.stdout:  # bounded by the server's start timeout inside `serve`
            lines.append(line)
            if line.startswith("Prefect UI:"):
                break
        assert lines and lines[-1].startswith(f"Prefect UI: http://127.0.0.1:{port}"), "".join(lines)[-3000:]
        assert httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=10).status_code == 200
        children = psutil.Process(serve.pid).children(recursive=True)
        assert len(children) >= 2  # the server and the worker, each in a session of its own
        os.killpg(serve.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends to the foreground group
        assert serve.wait(timeout=120) == 0
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == []
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGINT)
            try:
                serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
