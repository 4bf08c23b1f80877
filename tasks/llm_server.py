"""llama.cpp's own OpenAI-compatible server (`python -m llama_cpp.server`, the `llm` extra) as a child process on
loopback: the openai LLM and translator backends run (and are tested) against a real server on a CPU machine."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from infra.model_assets import smollm2_gguf
from infra.net import free_port


class LlamaCppServer:
    """`python -m llama_cpp.server` serving one GGUF on `host:port` (default: loopback, a free port chosen once, so
    a restart after `kill()` comes back on the same address).

    `start()` returns the base URL (`.../v1`) once `GET /v1/models` gets an HTTP answer (the app is built after the
    model is loaded); `kill()` is SIGKILL (a crash), `stop()` SIGTERM then SIGKILL. The server answers one request
    at a time (it holds a lock around its `Llama`); its log goes to `log_path` (a temporary file by default). The
    model is served under `alias`; llama.cpp's server answers requests for any model name with it. `extra_args` go
    to the server's command line as they are (e.g. `["--api_key", key]`).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        n_ctx: int = 2048,
        n_threads: int = 1,
        alias: str = "local-gguf",
        extra_args: Sequence[str] = (),
        python: str = sys.executable,
        log_path: str | Path | None = None,
        start_timeout: float = 60.0,
    ):
        self.model_path = Path(model_path) if model_path else smollm2_gguf()
        self.host, self.port = host, port or free_port(host)
        self.alias = alias
        self.url = f"http://{host}:{self.port}/v1"
        self.cmd = [
            python, "-m", "llama_cpp.server", "--model", str(self.model_path), "--model_alias", alias,
            "--host", host, "--port", str(self.port), "--n_ctx", str(n_ctx), "--n_threads", str(n_threads), *extra_args,
        ]  # fmt: skip
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy

    def start(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the server is already running")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited (rc={self.proc.returncode}): {self.log_tail()}")
            try:
                with self._opener.open(self.url + "/models", timeout=2):
                    return self.url
            except urllib.error.HTTPError:  # e.g. 401 with --api_key: it answers, so the model is loaded
                return self.url
            except OSError:  # not listening yet
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama.cpp server not ready within {self.start_timeout}s: {self.log_tail()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        self.kill()

    def log_tail(self, n_chars: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n_chars:].decode("utf-8", "replace")
        except OSError:
            return ""

    def __enter__(self) -> LlamaCppServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
