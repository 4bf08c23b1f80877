"""Helpers shared by the benchmarks: a measured subprocess run, the loopback image server, machine info.

Measurement of one command (`run_measured`):
- wall seconds around `Popen` .. `wait`;
- CPU seconds two ways: the delta of `getrusage(RUSAGE_CHILDREN)` around the wait (user+sys of every descendant
  that was reaped, i.e. the command and the workers it waited for), and a psutil sample of the live process tree
  every `poll` seconds (last user+sys seen per pid, summed; misses a process's last < `poll` seconds);
- peak RSS: the max over the samples of the summed RSS of the tree (forked workers' shared pages count once per
  process, so this over-states real memory a little). (`ru_maxrss` is not used: for RUSAGE_CHILDREN it is a
  high-water mark over all children ever reaped, so it cannot be attributed to one run.)
The command runs in its own session; on timeout, and after it exits (leftover workers), its process group is killed.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import psutil
except ImportError:  # measurement degrades to rusage only
    psutil = None

MB = 1024 * 1024


@dataclass
class RunResult:
    """What one measured subprocess did."""

    cmd: list[str]
    returncode: int | None
    timed_out: bool
    wall_s: float
    cpu_s: float  # rusage delta (reaped descendants)
    cpu_user_s: float
    cpu_sys_s: float
    cpu_tree_sampled_s: float | None  # psutil samples of the live tree
    peak_rss_mb: float | None  # max over samples of the summed tree RSS
    max_procs: int | None
    log_tail: str = ""
    # Per-process RSS over time, one sample a second: [[seconds since start, {"pid name": MB}], ...]
    rss_series: list | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class TreeSampler:
    """Polls a process and its descendants: summed RSS (peak kept) and per-pid CPU times."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid) if psutil else None
        self.cpu_by_pid: dict[tuple[int, float], float] = {}
        self.peak_rss = 0
        self.max_procs = 0
        self.started = time.perf_counter()
        self.rss_series: list = []

    def sample(self) -> None:
        if self.root is None:
            return
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        rss = 0
        now = time.perf_counter() - self.started
        series = not self.rss_series or now - self.rss_series[-1][0] >= 1.0
        by_process: dict[str, float] = {}
        for p in procs:
            with contextlib.suppress(psutil.Error), p.oneshot():
                t = p.cpu_times()
                p_rss = p.memory_info().rss
                rss += p_rss
                self.cpu_by_pid[(p.pid, p.create_time())] = t.user + t.system
                if series:
                    by_process[f"{p.pid} {_role(p)}"] = round(p_rss / MB, 1)
        if series:
            self.rss_series.append([round(now, 1), by_process])
        self.peak_rss = max(self.peak_rss, rss)
        self.max_procs = max(self.max_procs, len(procs))

    def cpu_s(self) -> float | None:
        return sum(self.cpu_by_pid.values()) if self.root is not None else None

    def peak_rss_mb(self) -> float | None:
        return self.peak_rss / MB if self.root is not None else None


def _role(p) -> str:
    """A short name for a process of the tree: what it runs, not its whole command line."""
    cmd = p.cmdline()
    text = " ".join(cmd)
    for marker, role in (("spawn_main", "worker"), ("uvicorn", "prefect-server"), ("resource_tracker", "tracker")):
        if marker in text:
            return role
    return Path(cmd[1]).name if len(cmd) > 1 else p.name()


def kill_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM then SIGKILL the process group `pgid` (a session this module started)."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def tail(path: Path, n_chars: int = 3000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n_chars:].decode("utf-8", "replace")


def run_measured(
    cmd: list[str], *, env: dict, cwd: Path, timeout_s: float, log_path: Path, poll_s: float = 0.1
) -> RunResult:
    """Run `cmd` to completion (or kill it after `timeout_s`), measuring the whole process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    timed_out = False
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        sampler = TreeSampler(proc.pid)
        try:
            while True:
                sampler.sample()
                try:
                    proc.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    if time.perf_counter() - t0 > timeout_s:
                        timed_out = True
                        kill_group(proc.pid)
                        proc.wait()
                        break
        finally:
            wall = time.perf_counter() - t0
            kill_group(proc.pid, grace_s=2.0)  # workers left behind, if any
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, sys_ = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return RunResult(
        cmd=cmd,
        returncode=proc.returncode,
        timed_out=timed_out,
        wall_s=wall,
        cpu_s=user + sys_,
        cpu_user_s=user,
        cpu_sys_s=sys_,
        cpu_tree_sampled_s=sampler.cpu_s(),
        rss_series=sampler.rss_series if psutil else None,
        peak_rss_mb=sampler.peak_rss_mb(),
        max_procs=sampler.max_procs if psutil else None,
        log_tail=tail(log_path),
    )


class LoopbackServer:
    """`python -m infra.loopback_server` in its own process: yields its base URL, always stopped on exit."""

    def __init__(self, python: Path, images: Path, cwd: Path, log_path: Path, start_timeout_s: float = 60.0):
        self.cmd = [str(python), "-m", "infra.loopback_server", "--images", str(images), "--port", "0"]
        self.cwd, self.log_path, self.start_timeout_s = cwd, log_path, start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.base_url = ""

    def __enter__(self) -> str:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self.base_url = self._first_line().rstrip("/")
            if not self.base_url.startswith("http://127."):
                raise RuntimeError(f"loopback server printed {self.base_url!r}, not a loopback base URL")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        threading.Thread(target=self._drain, daemon=True).start()
        return self.base_url

    def _first_line(self) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=self.start_timeout_s):
            raise RuntimeError(f"loopback server printed nothing in {self.start_timeout_s} s: {tail(self.log_path)}")
        line = self.proc.stdout.readline().decode().strip()
        if not line:
            raise RuntimeError(f"loopback server exited (rc={self.proc.poll()}): {tail(self.log_path)}")
        return line

    def _drain(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for _ in self.proc.stdout:
                pass

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            kill_group(self.proc.pid)
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        self._log.close()


def machine_info() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    with contextlib.suppress(OSError, ValueError):
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    if psutil:
        info["memory_gb"] = round(psutil.virtual_memory().total / 1024**3, 1)
        info["psutil"] = psutil.__version__
    return info
