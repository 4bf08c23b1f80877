"""The captioner expert (tasks/caption.py).

No VLM can run on these machines, so the OpenAI-compatible protocol client is verified against a small real HTTP
server on 127.0.0.1 written here with aiohttp.web (`StubVLM`, implementing POST /v1/chat/completions). The stub
checks every request's shape (model, text prompt, image_url data URL that decodes to an RGB JPEG) and answers with
the decoded image's size, so each test proves that the right image reached the right slot. No real VLM was run;
caption quality is not tested. The transformers backend is tested for its errors when transformers/a model is
missing, and, only where transformers is installed, end to end with tiny randomly initialised BLIP/GIT models
built in the test (no download).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import random
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiohttp import web
from PIL import Image

from infra.models import ModelUnavailable, load_backend
from infra.settings import CaptionerConfig
from tasks.caption import (
    API_KEY_ENV,
    CaptionError,
    OpenAICaptioner,
    TransformersCaptioner,
    image_to_data_url,
)

MODEL = "Qwen/Qwen2-VL-2B-Instruct"
PROMPT = "Describe this image in one detailed sentence."


class StubVLM:
    """An OpenAI-compatible chat-completions stub on loopback, in its own thread and event loop.

    The reply for an image is decided by its size: `plan[(w, h)]` is a list of behaviours consumed one per request
    (the last one repeats); sizes without a plan get "ok". Behaviours: "ok" (caption "WxH"), "503", "429" (with
    Retry-After: `retry_after`), "400", "slow" (no reply before the client's timeout), "empty", "blank",
    "no_choices", "not_json", "parts" (content as a list of text parts), "padded" (a valid ~1 MB reply), "huge"
    (a reply over the client's size limit).
    """

    def __init__(self, *, max_delay: float = 0.0, retry_after: str = "0"):
        self.max_delay = max_delay
        self.retry_after = retry_after
        self.plan: dict[tuple[int, int], list[str]] = {}
        self.attempts: dict[tuple[int, int], list[float]] = defaultdict(list)  # arrival times per image size
        self.completed: list[tuple[int, int]] = []  # sizes in the order their "ok" replies were sent
        self.violations: list[str] = []
        self.auth: list[str | None] = []
        self.inflight = 0
        self.max_inflight = 0
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    # -- the handler --

    def _validate(self, body: object) -> tuple[int, int]:
        assert isinstance(body, dict), "body is not an object"
        assert body.get("model") == MODEL, f"model {body.get('model')!r}"
        assert body.get("temperature") == 0, "temperature must be 0"
        assert isinstance(body.get("max_tokens"), int) and body["max_tokens"] >= 1, "max_tokens"
        messages = body["messages"]
        assert len(messages) == 1 and messages[0]["role"] == "user", "one user message"
        parts = messages[0]["content"]
        texts = [p["text"] for p in parts if p["type"] == "text"]
        urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        assert texts == [PROMPT], f"text parts {texts!r}"
        assert len(urls) == 1, "exactly one image_url part"
        prefix = "data:image/jpeg;base64,"
        assert urls[0].startswith(prefix), "image_url is not a JPEG data URL"
        img = Image.open(io.BytesIO(base64.b64decode(urls[0][len(prefix) :], validate=True)))
        assert img.format == "JPEG" and img.mode == "RGB", f"{img.format} {img.mode}"
        img.load()
        return img.size

    async def _handle(self, request: web.Request) -> web.Response:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            self.auth.append(request.headers.get("Authorization"))
            try:
                size = self._validate(await request.json())
            except Exception as e:
                self.violations.append(f"{type(e).__name__}: {e}")
                return web.json_response({"error": {"message": str(e)}}, status=422)
            self.attempts[size].append(time.monotonic())
            plan = self.plan.get(size, ["ok"])
            behaviour = plan[min(len(self.attempts[size]), len(plan)) - 1]
            if self.max_delay:
                await asyncio.sleep(random.uniform(0, self.max_delay))
            return await self._reply(behaviour, size)
        finally:
            self.inflight -= 1

    async def _reply(self, behaviour: str, size: tuple[int, int]) -> web.Response:
        def completion(content: object) -> web.Response:
            return web.json_response(
                {
                    "id": "chatcmpl-stub",
                    "object": "chat.completion",
                    "model": MODEL,
                    "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
                    ],
                }
            )

        caption = f"{size[0]}x{size[1]}"
        if behaviour == "ok":
            self.completed.append(size)
            return completion(f"  {caption}\n")  # the client strips whitespace
        if behaviour == "parts":
            return completion([{"type": "text", "text": caption}])
        if behaviour in ("503", "400"):
            return web.json_response({"error": {"message": f"stub {behaviour}"}}, status=int(behaviour))
        if behaviour == "429":
            return web.json_response(
                {"error": {"message": "slow down"}}, status=429, headers={"Retry-After": self.retry_after}
            )
        if behaviour == "slow":
            assert self._stop is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 5)
            return completion("too late")
        if behaviour == "empty":
            return completion("")
        if behaviour == "blank":
            return completion(" \n\t ")
        if behaviour == "no_choices":
            return web.json_response({"choices": []})
        if behaviour == "padded":  # a valid reply large enough to arrive in many chunks
            self.completed.append(size)
            response = completion(caption)
            response.body = response.body[:-1] + b', "pad": "' + b"x" * 900_000 + b'"}'
            return response
        if behaviour == "huge":
            return web.json_response({"pad": "x" * (2 << 20)})
        if behaviour == "not_json":
            return web.Response(text="<html>gateway</html>", content_type="text/html")
        raise AssertionError(f"unknown behaviour {behaviour}")

    # -- lifecycle --

    def __enter__(self) -> StubVLM:
        started = threading.Event()

        async def main() -> None:
            self._stop = asyncio.Event()
            app = web.Application(client_max_size=64 << 20)
            app.router.add_post("/v1/chat/completions", self._handle)
            self._runner = web.AppRunner(app, shutdown_timeout=0.2)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = self._runner.addresses[0][1]
            self.base_url = f"http://127.0.0.1:{port}/v1"
            started.set()
            await self._stop.wait()
            await self._runner.cleanup()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(main())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert started.wait(10), "stub server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def stub():
    with StubVLM() as srv:
        yield srv
    assert not srv.violations, srv.violations


def make_images(n: int, start: int = 40) -> list[Image.Image]:
    """n RGB images with distinct sizes (so the stub's caption identifies each) and distinct colours."""
    return [Image.new("RGB", (start + i, start // 2 + 2 * i), (i * 7 % 256, 90, 200)) for i in range(n)]


def size_caption(img: Image.Image) -> str:
    return f"{img.width}x{img.height}"


def captioner(srv: StubVLM, **kw) -> OpenAICaptioner:
    kw.setdefault("timeout", 2.0)
    kw.setdefault("backoff", 0.01)
    return OpenAICaptioner(endpoint=srv.base_url, model=MODEL, prompt=PROMPT, **kw)


# ---- the OpenAI-compatible client ------------------------------------------------------------------------------


def test_order_preserved_under_concurrency_with_random_delays():
    with StubVLM(max_delay=0.05) as srv:
        images = make_images(40)
        got = captioner(srv, concurrency=8).caption(images)
    assert not srv.violations, srv.violations
    assert got == [size_caption(img) for img in images]
    assert srv.max_inflight > 1  # the requests really overlapped...
    assert srv.completed != [img.size for img in images]  # ...and finished out of order
    assert all(len(times) == 1 for times in srv.attempts.values())


def test_concurrency_bound_respected():
    with StubVLM(max_delay=0.03) as srv:
        images = make_images(30)
        outcomes = captioner(srv, concurrency=3).caption_batch(images)
    assert outcomes == [(size_caption(img), None) for img in images]
    assert 2 <= srv.max_inflight <= 3


def test_retries_transient_errors_then_succeeds(stub):
    a, b, c = make_images(3)
    stub.plan[a.size] = ["503", "503", "ok"]
    stub.plan[b.size] = ["429", "ok"]
    got = captioner(stub, retries=3).caption([a, b, c])
    assert got == [size_caption(a), size_caption(b), size_caption(c)]
    assert [len(stub.attempts[img.size]) for img in (a, b, c)] == [3, 2, 1]


def test_retry_after_is_honoured():
    with StubVLM(retry_after="0.4") as srv:
        (img,) = make_images(1)
        srv.plan[img.size] = ["429", "ok"]
        assert captioner(srv, retries=2, backoff=0.001).caption([img]) == [size_caption(img)]
    first, second = srv.attempts[img.size]
    assert second - first >= 0.35  # the 1 ms backoff alone would have retried at once


def test_retries_exhausted_is_that_images_error(stub):
    bad, good = make_images(2)
    stub.plan[bad.size] = ["503"]
    outcomes = captioner(stub, retries=2).caption_batch([bad, good])
    assert outcomes[1] == (size_caption(good), None)
    caption, error = outcomes[0]
    assert caption is None and error.startswith("http_503") and "after 3 attempts" in error
    assert len(stub.attempts[bad.size]) == 3


def test_client_error_is_not_retried(stub):
    (img,) = make_images(1)
    stub.plan[img.size] = ["400"]
    ((caption, error),) = captioner(stub, retries=3).caption_batch([img])
    assert caption is None and error.startswith("http_400") and "stub 400" in error
    assert len(stub.attempts[img.size]) == 1


def test_timeout_is_an_error_after_retries(stub):
    slow, fast = make_images(2)
    stub.plan[slow.size] = ["slow"]
    outcomes = captioner(stub, timeout=0.25, retries=1).caption_batch([slow, fast])
    assert outcomes[1] == (size_caption(fast), None)
    assert outcomes[0][0] is None and outcomes[0][1].startswith("timeout") and "after 2 attempts" in outcomes[0][1]
    assert len(stub.attempts[slow.size]) == 2


@pytest.mark.parametrize(
    ("behaviour", "error_class"),
    [
        ("empty", "empty"),
        ("blank", "empty"),
        ("no_choices", "bad_response"),
        ("not_json", "bad_response"),
        ("huge", "bad_response"),
    ],
)
def test_unusable_replies_are_errors_without_retry(stub, behaviour, error_class):
    (img,) = make_images(1)
    stub.plan[img.size] = [behaviour]
    ((caption, error),) = captioner(stub, retries=3).caption_batch([img])
    assert caption is None and error.startswith(error_class + ":")
    assert len(stub.attempts[img.size]) == 1


def test_large_valid_reply_is_read_whole(stub):
    (img,) = make_images(1)
    stub.plan[img.size] = ["padded"]
    assert captioner(stub).caption([img]) == [size_caption(img)]


def test_content_parts_are_joined(stub):
    (img,) = make_images(1)
    stub.plan[img.size] = ["parts"]
    assert captioner(stub).caption([img]) == [size_caption(img)]


def test_one_failing_image_does_not_affect_the_others(stub):
    images = make_images(8)
    stub.plan[images[3].size] = ["400"]
    stub.plan[images[5].size] = ["empty"]
    cap = captioner(stub, concurrency=4)
    outcomes = cap.caption_batch(images)
    for i, (img, (caption, error)) in enumerate(zip(images, outcomes, strict=True)):
        if i in (3, 5):
            assert caption is None and error
        else:
            assert (caption, error) == (size_caption(img), None)
    with pytest.raises(CaptionError) as info:  # caption() is all-or-nothing
        cap.caption(images)
    assert sorted(info.value.errors) == [3, 5]


def test_connection_refused_is_an_error():
    with StubVLM() as srv:
        endpoint = srv.base_url
    cap = OpenAICaptioner(endpoint=endpoint, model=MODEL, prompt=PROMPT, timeout=1.0, retries=1, backoff=0.01)
    ((caption, error),) = cap.caption_batch(make_images(1))
    assert caption is None and error.startswith("connection:")


def test_large_images_are_bounded_and_odd_modes_are_sent_as_rgb(stub):
    images = [
        Image.new("RGB", (2000, 1000), "red"),
        Image.new("RGBA", (50, 60), (0, 0, 0, 0)),
        Image.new("L", (70, 30), 128),
        Image.new("P", (33, 44)),
    ]
    got = captioner(stub).caption(images)
    assert got == ["768x384", "50x60", "70x30", "33x44"]


def test_empty_batch_makes_no_requests(stub):
    assert captioner(stub).caption_batch([]) == []
    assert stub.attempts == {}


def test_api_key_header(stub, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "sk-test")
    captioner(stub).caption(make_images(1))
    monkeypatch.delenv(API_KEY_ENV)
    captioner(stub).caption(make_images(1))
    assert stub.auth == ["Bearer sk-test", None]


def test_works_from_a_worker_thread_and_inside_a_running_loop(stub):
    cap = captioner(stub)
    images = make_images(3)
    expected = [size_caption(img) for img in images]
    with ThreadPoolExecutor(1) as pool:  # like a Dask worker thread: no event loop there
        assert pool.submit(cap.caption, images).result() == expected

    async def from_async_code() -> list[str]:
        return cap.caption(images)  # asyncio.run cannot nest; the client must cope

    assert asyncio.run(from_async_code()) == expected


def test_registry_builds_it_from_the_config(stub):
    cfg = CaptionerConfig(backend="openai", endpoint=stub.base_url + "/", model=MODEL, concurrency=2, timeout=5)
    cap = load_backend("captioner", cfg.backend, **cfg.model_dump(exclude={"backend"}))
    assert cap.model_id == f"openai:{MODEL}"  # the model, not where it is served
    assert cap.caption(make_images(2)) == [size_caption(img) for img in make_images(2)]


@pytest.mark.parametrize(
    "options",
    [
        {"endpoint": None, "model": MODEL},
        {"endpoint": "http://127.0.0.1:8000/v1", "model": None},
        {"endpoint": "", "model": ""},
    ],
)
def test_missing_endpoint_or_model_is_model_unavailable(options):
    with pytest.raises(ModelUnavailable) as info:
        OpenAICaptioner(**options, prompt=PROMPT, max_tokens=96, concurrency=16, timeout=60.0)
    assert info.value.role == "captioner" and info.value.backend == "openai"
    assert "extract.captioner.endpoint" in str(info.value) and "extract.captioner.model" in str(info.value)


def test_endpoint_must_be_an_http_url():
    with pytest.raises(ModelUnavailable, match="not an http"):
        OpenAICaptioner(endpoint="vllm:8000", model=MODEL)


# ---- image_to_data_url ---------------------------------------------------------------------------------------


def decode(url: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert url.startswith(prefix)
    img = Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))
    assert img.format == "JPEG"
    img.load()
    return img


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((2000, 1000), 768, (768, 384)),
        ((1000, 3000), 768, (256, 768)),
        ((300, 200), 768, (300, 200)),  # never upscaled
        ((5000, 7), 100, (100, 1)),  # extreme aspect: at least 1 pixel
    ],
)
def test_image_to_data_url_bounds_size(size, max_side, expected):
    assert decode(image_to_data_url(Image.new("RGB", size, "blue"), max_side=max_side)).size == expected


def test_image_to_data_url_converts_modes():
    transparent = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    img = decode(image_to_data_url(transparent))
    assert img.mode == "RGB" and min(img.getpixel((20, 20))) > 240  # transparent composites over white
    grey = decode(image_to_data_url(Image.new("L", (40, 30), 100)))
    assert grey.mode == "RGB" and grey.size == (40, 30) and all(95 <= v <= 105 for v in grey.getpixel((5, 5)))
    palette = Image.new("P", (20, 20))
    palette.info["transparency"] = 0
    assert decode(image_to_data_url(palette)).mode == "RGB"


def test_image_to_data_url_quality_changes_size():
    noisy = Image.effect_noise((256, 256), 64).convert("RGB")
    assert len(image_to_data_url(noisy, quality=30)) < len(image_to_data_url(noisy, quality=95))


# ---- the transformers backend --------------------------------------------------------------------------------


def test_transformers_missing_is_model_unavailable(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed (it is not, here)
    with pytest.raises(ModelUnavailable) as info:
        TransformersCaptioner(model=str(tmp_path))
    assert info.value.role == "captioner" and info.value.backend == "transformers"
    assert "pip install 'capfactory[gpu]'" in str(info.value) and "extract.captioner.model" in str(info.value)


@pytest.mark.parametrize("model", [None, "", "/nonexistent/blip-model", "Salesforce/blip-image-captioning-base"])
def test_transformers_needs_a_local_model_folder(model):
    with pytest.raises(ModelUnavailable) as info:
        TransformersCaptioner(endpoint=None, model=model, prompt=PROMPT, max_tokens=20, concurrency=1, timeout=1.0)
    assert info.value.backend == "transformers" and "extract.captioner.model" in str(info.value)


def _tiny_model_folder(kind: str, folder) -> None:
    """A randomly initialised BLIP or GIT captioning model + processor, saved like a hub snapshot (no download).

    The output layer's bias is pushed towards the word "photo", so greedy decoding deterministically yields
    "photo photo ..." -- proof that pixels went in, tokens came out and were decoded, with no real weights.
    """
    import torch
    import transformers as tf

    torch.manual_seed(0)
    words = ["a", "photo", "of", "dog", "cat", "red", "car", "on", "the", "grass", "street", "with"]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = tf.BertTokenizer(str(vocab))
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, "sep_token_id": 3}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        **ids,
    }
    vision = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 16,
    }
    if kind == "blip":
        model = tf.BlipForConditionalGeneration(tf.BlipConfig(text_config=text, vision_config=vision))
        head = model.text_decoder.get_output_embeddings()
        processor = tf.BlipProcessor(tf.BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    else:
        model = tf.GitForCausalLM(tf.GitConfig(vision_config=vision, **text))
        head = model.get_output_embeddings()
        image_processor = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = tf.GitProcessor(image_processor, tokenizer)
    with torch.no_grad():
        head.bias[tokenizer.convert_tokens_to_ids("photo")] += 100.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.mark.parametrize("kind", ["blip", "git"])
def test_transformers_tiny_random_model_end_to_end(tmp_path, kind):
    pytest.importorskip("transformers", reason="transformers is not installed here (the gpu extra)")
    _tiny_model_folder(kind, tmp_path)
    cap = TransformersCaptioner(model=str(tmp_path), max_tokens=4, device="cpu", max_batch=2)
    assert cap.model_id == f"transformers:{tmp_path.name}"
    images = make_images(5)
    outcomes = cap.caption_batch(images)
    assert len(outcomes) == 5
    for caption, error in outcomes:
        assert error is None and caption and set(caption.split()) == {"photo"}, (caption, error)
    # A broken input fails only its own slot (the chunk is retried image by image).
    broken = cap.caption_batch([images[0], object(), images[1]])
    assert broken[0][1] is None and broken[2][1] is None
    assert broken[1][0] is None and broken[1][1].startswith("generate:")
    assert cap.caption(images[:2]) == [outcomes[0][0], outcomes[1][0]]
