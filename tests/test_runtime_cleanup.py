"""Nothing the flow runtime starts outlives its process (issue 15): a process inside `flow_runtime()` (a temporary
Prefect server and a LocalCluster) is sent SIGTERM or SIGKILL, and within seconds the server's port is closed, no
process it started is left, and the server's own database folder is gone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
GONE_WITHIN = 20.0  # seconds; measured here: about 1-3 s

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SCRIPT = """
import os, time
from infra.runtime import flow_runtime, stop_on_sigterm

stop_on_sigterm()
with flow_runtime(n_workers=1):
    print("READY", os.environ["PREFECT_API_URL"], flush=True)
    time.sleep(600)
"""


def _children() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            parents[int(entry)] = int(ppid)
    return parents


def _descendants(root: int) -> set[int]:
    parents = _children()
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def _server_home(pids: set[int]) -> Path:
    """The server's database folder: the argument after the parent pid in the server's command line."""
    for pid in pids:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if len(argv) > 4 and b"PR_SET_PDEATHSIG" in argv[2]:
            return Path(argv[4].decode())
    raise AssertionError(f"no temporary Prefect server among {pids}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_runtime_leaves_nothing_running(tmp_path: Path, sig: signal.Signals) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    started: set[int] = set()
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), f"the runtime did not start (exit code {proc.poll()})"
        url = urlsplit(line.split()[1])
        started |= _descendants(proc.pid)
        home = _server_home(started)
        assert (home / "prefect.db").exists()  # its own database, not $PREFECT_HOME/prefect.db
        assert _port_open(url.hostname, url.port)
        assert len(started) >= 2  # the server and the Dask worker process (and whatever they started)

        proc.send_signal(sig)
        proc.wait(timeout=GONE_WITHIN)
        deadline = time.monotonic() + GONE_WITHIN
        while time.monotonic() < deadline and (any(map(_alive, started)) or _port_open(url.hostname, url.port)):
            time.sleep(0.2)
        assert not [pid for pid in started if _alive(pid)], "processes left running"
        assert not _port_open(url.hostname, url.port)
        assert not home.exists()
        if sig == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM  # it unwound (SystemExit), not killed by the signal
    finally:
        proc.kill()
        proc.wait()
        for pid in filter(_alive, started):  # what a failed check left behind
            os.kill(pid, signal.SIGKILL)


EARLY_THEN_FAIL = """
import sys
from infra import prefect_server

prefect_server.start_early()
proc, url = prefect_server._early[0]
prefect_server.wait_until_healthy(proc, url)
print(proc.pid, proc.home, url, flush=True)
sys.exit(2)  # as a command whose checks failed after it started the server
"""

EARLY_THEN_RUNTIME = """
import os
from distributed import Client
from infra import cluster, prefect_server
from infra.runtime import flow_runtime

prefect_server.start_early()
early_pid, early_url = prefect_server._early[0][0].pid, prefect_server._early[0][1]
cluster.start_early(1, False, ("tasks.ingest",), prefect_server.early_url())
early_cluster = cluster._early[0]
with flow_runtime(n_workers=1, warm=("tasks.ingest",)) as runner:
    assert runner.address == early_cluster.result().scheduler_address  # the cluster started early, taken over
    with Client(runner.address) as client:
        [worker_url] = client.run(lambda: os.environ.get("PREFECT_API_URL")).values()
    assert worker_url == early_url, worker_url
    print(early_pid, early_url, os.environ["PREFECT_API_URL"], flush=True)
    input()
"""


def _servers(pids: set[int]) -> list[int]:
    """The temporary Prefect servers among `pids` (a process that exited meanwhile is none)."""
    found = []
    for pid in pids:
        try:
            if b"PR_SET_PDEATHSIG" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def test_a_server_started_early_and_never_used_is_stopped_at_exit(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", EARLY_THEN_FAIL], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=GONE_WITHIN * 3)
    assert proc.returncode == 2, proc.stderr[-2000:]
    pid, home, url = proc.stdout.split()
    assert not _alive(int(pid)) and not Path(home).exists()
    assert not _port_open("127.0.0.1", urlsplit(url).port)


def test_the_runtime_takes_over_the_server_and_cluster_started_early(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-c", EARLY_THEN_RUNTIME], cwd=tmp_path, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        early_pid, early_url, api_url = proc.stdout.readline().split()
        assert api_url == early_url  # the flows and the workers use it: no second server
        assert _servers(_descendants(proc.pid)) == [int(early_pid)]
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=GONE_WITHIN * 3) == 0
        assert not _alive(int(early_pid))
    finally:
        proc.kill()
        proc.wait()


def test_an_early_cluster_started_for_other_settings_is_closed_not_taken() -> None:
    from distributed.core import Status

    from infra import cluster

    cluster.start_early(1, False, (), None)
    early = cluster._early[0]
    assert cluster.take_early(1, True, ()) is None  # a GPU run must not get workers that advertise none
    assert early.result().status == Status.closed
    assert cluster.take_early(1, False, ()) is None  # and it is gone
