"""The captioner expert: one synthetic caption per image, from a VLM server or a local BLIP/GIT model.

Two backends (registered in `infra.models.BACKENDS["captioner"]`), both built once per worker process by the
registry as `Class(endpoint=, model=, prompt=, max_tokens=, concurrency=, timeout=)`:

- `OpenAICaptioner` ("openai", the gpu profile's default): any OpenAI-compatible chat-completions server, e.g. vLLM
  serving a Qwen2-VL-class model. Each image is re-encoded as a bounded JPEG data URL and sent with the prompt;
  up to `concurrency` requests are in flight; transient failures (connection errors, timeouts, 429, 5xx and 408)
  are retried with exponential backoff, honouring Retry-After; other 4xx are not retried.
- `TransformersCaptioner` ("transformers"): a BLIP/GIT captioning model from a local folder via `transformers`
  (the `gpu` extra), batched `generate`, on CUDA when available. It captions unconditionally: the chat-style
  prompt is for VLMs and is not fed to BLIP/GIT (as a text prefix it would only be continued, not obeyed).

Which method the stage calls: `caption_batch(images) -> [(caption, error), ...]`, in input order, exactly one of the
pair set per image. A failure of one image (after retries) is recorded in its slot and never affects the others, so
one bad image does not fail a shard. `caption(images) -> [str, ...]` satisfies the `infra.models.Captioner`
protocol for callers that want all-or-nothing; it raises `CaptionError` if any image failed.

No captioning model runs offline on the CPU machines this project is built on, so the cpu profile has the
captioner off, and enabling it without an endpoint/model is a `ModelUnavailable` error. What was verified here:
the OpenAI protocol client against a local OpenAI-compatible stub server on 127.0.0.1 (tests/test_caption.py):
request shape, data URLs, ordering under concurrency, the concurrency bound, retries, timeouts, error mapping.
The transformers backend was run here only with tiny randomly initialised BLIP and GIT models built by the tests
(transformers 5.23 installed outside the project venv, on CPU); the CUDA/fp16 path and real checkpoints were not.
No real VLM or captioning model was run here; caption quality is unchecked.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image

from infra.models import ModelUnavailable
from tasks.lib.openai_http import (
    MAX_RETRY_AFTER,
    AttemptError,
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

API_KEY_ENV = "CAPFACTORY_CAPTIONER_API_KEY"
DEFAULT_PROMPT = "Describe this image in one detailed sentence."

CaptionOutcome = tuple[str | None, str | None]  # (caption, error): exactly one is set


class CaptionError(RuntimeError):
    """Raised by `caption()` when at least one image could not be captioned; `errors` maps index -> error."""

    def __init__(self, errors: dict[int, str], total: int):
        first = next(iter(errors.items()))
        super().__init__(
            f"{len(errors)} of {total} images could not be captioned (first: image {first[0]}: {first[1]})"
        )
        self.errors, self.total = errors, total

    def __reduce__(self):  # picklable across the task boundary
        return type(self), (self.errors, self.total)


def _outcome(text: str) -> CaptionOutcome:
    return (text, None) if text else (None, "empty: the model returned no caption text")


def _raise_on_errors(outcomes: list[CaptionOutcome]) -> list[str]:
    errors = {i: err for i, (_, err) in enumerate(outcomes) if err is not None}
    if errors:
        raise CaptionError(errors, len(outcomes))
    return [cap for cap, _ in outcomes]  # type: ignore[misc]


# ---- images ---------------------------------------------------------------------------------------------------


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any mode; transparency is composited over white (not black, which is what convert() gives)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def image_to_data_url(img: Image.Image, max_side: int = 768, quality: int = 90) -> str:
    """A `data:image/jpeg;base64,...` URL of `img`: RGB, longest side at most `max_side` (aspect kept, never
    upscaled), JPEG at `quality`."""
    if max_side < 1:
        raise ValueError("max_side must be >= 1")
    rgb = to_rgb(img)
    w, h = rgb.size
    if max(w, h) > max_side:
        scale = max_side / max(w, h)
        size = (max(1, min(max_side, round(w * scale))), max(1, min(max_side, round(h * scale))))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---- the OpenAI-compatible (vLLM) backend -----------------------------------------------------------------------


class OpenAICaptioner:
    """A VLM behind an OpenAI-compatible `POST {endpoint}/chat/completions` (vLLM, llama.cpp server, ...).

    `caption_batch` is the stage's entry point (per-image outcomes); `caption` is all-or-nothing. Both are sync and
    run their own event loop, so they work from a Dask worker thread. The keyword-only knobs after `timeout` are
    not part of the registry options; their defaults are the production values (tests shrink them).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        model: str | None = None,
        prompt: str = DEFAULT_PROMPT,
        max_tokens: int = 96,
        concurrency: int = 16,
        timeout: float = 60.0,
        *,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        max_retry_after: float = MAX_RETRY_AFTER,
        max_side: int = 768,
        quality: int = 90,
    ):
        if not endpoint or not model:
            raise ModelUnavailable(
                "captioner",
                "openai",
                "set extract.captioner.endpoint (e.g. http://vllm:8000/v1) and "
                "extract.captioner.model; no captioning model runs offline on CPU here",
            )
        self.endpoint = server_address(endpoint, "captioner", "openai", "extract.captioner.endpoint")
        if concurrency < 1 or max_tokens < 1 or timeout <= 0 or retries < 0:
            raise ValueError("concurrency and max_tokens must be >= 1, timeout > 0, retries >= 0")
        self.url = self.endpoint + "/chat/completions"
        self.model = model
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.max_side = max_side
        self.quality = quality
        self.model_id = f"openai:{model}"  # the model, not where it is served
        self._headers = json_headers(API_KEY_ENV)

    # -- public API --

    def caption_batch(self, images: Sequence[Image.Image]) -> list[CaptionOutcome]:
        """(caption, error) per image, in input order; exactly one of the two is set. Never raises for a failed
        image: HTTP errors, timeouts, empty or malformed replies become that image's error string, prefixed by a
        class (`http_400:`, `timeout:`, `connection:`, `empty:`, `bad_response:`, `encode:`)."""
        if not images:
            return []
        return run_sync(self._caption_all(list(images)))

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """Captions in input order; raises CaptionError if any image failed (see `caption_batch`)."""
        return _raise_on_errors(self.caption_batch(images))

    # -- internals --

    def request_body(self, data_url: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": self.prompt},
                        {"type": "image_url", "image_url": {"url": data_url}},
                    ],
                }
            ],
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }

    def health_check(self) -> None:
        """Fail now (ModelUnavailable, saying what to do) if the server is down, hangs or refuses."""
        check_server(self.endpoint, self.model, self._headers, role="captioner", api_key_env=API_KEY_ENV,
                     timeout=min(self.timeout, 30.0))

    async def _caption_all(self, images: list[Image.Image]) -> list[CaptionOutcome]:
        sem = asyncio.Semaphore(self.concurrency)
        breaker = CircuitBreaker()
        async with chat_session(self.concurrency, self.timeout, self._headers) as session:
            return list(await asyncio.gather(*(self._caption_one(session, sem, img, breaker) for img in images)))

    async def _caption_one(
        self, session: aiohttp.ClientSession, sem: asyncio.Semaphore, img: Image.Image, breaker: CircuitBreaker
    ) -> CaptionOutcome:
        async with sem:  # encoding inside the bound keeps at most `concurrency` encoded images in memory
            try:
                data_url = await asyncio.to_thread(image_to_data_url, img, self.max_side, self.quality)
            except Exception as e:  # a broken image object: this image's error, not the batch's
                return None, f"encode: {type(e).__name__}: {e}"
            body = json.dumps(self.request_body(data_url)).encode()
            del data_url
            caption, error, _ = await with_retries(
                lambda: self._post(session, body), retries=self.retries, backoff=self.backoff,
                max_backoff=self.max_backoff, max_retry_after=self.max_retry_after, breaker=breaker)
            return caption, error

    async def _post(self, session: aiohttp.ClientSession, body: bytes) -> str:
        text = message_text(await post_chat(session, self.url, body, self.timeout))
        if not text:
            raise AttemptError("empty: the model returned no caption text", transient=False)
        return text


# ---- the local transformers (BLIP/GIT) backend ---------------------------------------------------------------

_TRANSFORMERS_HOW = "pip install 'capfactory[gpu]' and set extract.captioner.model to a local model folder (BLIP/GIT)"
# Tried in order: the current auto class (BLIP, GIT and VLMs are image-text-to-text models), the deprecated one
# older transformers releases have, then causal LM (GIT in some releases).
_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM")


class TransformersCaptioner:
    """A BLIP/GIT captioning model from a local folder (no hub download at run time), batched `generate`.

    `endpoint`, `prompt`, `concurrency` and `timeout` are accepted (the registry passes them) and ignored: captions
    are unconditional, greedy, at most `max_tokens` new tokens. Images go through the model in chunks of
    `max_batch`; if a chunk fails, its images are retried one by one, so only the failing image gets an error.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        model: str | None = None,
        prompt: str = DEFAULT_PROMPT,
        max_tokens: int = 96,
        concurrency: int = 16,
        timeout: float = 60.0,
        *,
        device: str | None = None,
        max_batch: int = 32,
    ):
        del endpoint, prompt, concurrency, timeout  # not used by a local model
        if not model:
            raise ModelUnavailable(
                "captioner",
                "transformers",
                "extract.captioner.model is not set; " + _TRANSFORMERS_HOW + "; hub ids are not downloaded at run time",
            )
        path = Path(model).expanduser()
        if not path.is_dir():
            raise ModelUnavailable(
                "captioner",
                "transformers",
                f"model folder {str(path)!r} does not exist or is not a folder; "
                + _TRANSFORMERS_HOW
                + "; hub ids are not downloaded at run time",
            )
        try:
            transformers = importlib.import_module("transformers")  # first: fails fast, before torch's slow import
            torch = importlib.import_module("torch")
        except ImportError as e:
            raise ModelUnavailable("captioner", "transformers", f"{_TRANSFORMERS_HOW} (import failed: {e})") from None
        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.max_tokens = max_tokens
        self.max_batch = max(1, max_batch)
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            raise ModelUnavailable(
                "captioner",
                "transformers",
                f"cannot load a processor from {str(path)!r} ({type(e).__name__}: {e}); " + _TRANSFORMERS_HOW,
            ) from None
        self.model = self._load_model(transformers, path)
        self.model.to(self.device, dtype=self.dtype)
        self.model.eval()
        self.model_id = f"transformers:{path.resolve().name}"

    @staticmethod
    def _load_model(transformers: Any, path: Path) -> Any:
        errors = []
        for name in _AUTO_CLASSES:
            cls = getattr(transformers, name, None)
            if cls is None:
                continue
            try:
                return cls.from_pretrained(str(path), local_files_only=True)
            except (ValueError, KeyError) as e:  # "Unrecognized configuration class ... for this kind of AutoModel"
                errors.append(f"{name}: {str(e).splitlines()[0][:200]}")
            except OSError as e:  # no weights / config in the folder
                raise ModelUnavailable(
                    "captioner", "transformers", f"cannot load a model from {str(path)!r} ({e}); " + _TRANSFORMERS_HOW
                ) from None
        raise ModelUnavailable(
            "captioner",
            "transformers",
            f"{str(path)!r} is not an image-captioning model ({'; '.join(errors)}); " + _TRANSFORMERS_HOW,
        )

    def _generate(self, images: list[Image.Image]) -> list[str]:
        torch = self._torch
        inputs = self.processor(images=[to_rgb(img) for img in images], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, dtype=self.dtype)
        with torch.inference_mode():
            ids = self.model.generate(
                pixel_values=pixel_values, max_new_tokens=self.max_tokens, do_sample=False, num_beams=1
            )
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def caption_batch(self, images: Sequence[Image.Image]) -> list[CaptionOutcome]:
        """(caption, error) per image, in input order, with the same semantics as OpenAICaptioner's."""
        images = list(images)
        out: list[CaptionOutcome] = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            try:
                texts = self._generate(chunk)
            except Exception:
                out.extend(self._one_by_one(chunk))  # isolate the failing image(s)
                continue
            out.extend(_outcome(text) for text in texts)
        return out

    def _one_by_one(self, images: list[Image.Image]) -> list[CaptionOutcome]:
        out: list[CaptionOutcome] = []
        for img in images:
            try:
                (text,) = self._generate([img])
            except Exception as e:
                out.append((None, f"generate: {type(e).__name__}: {e}"))
            else:
                out.append(_outcome(text))
        return out

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """Captions in input order; raises CaptionError if any image failed."""
        return _raise_on_errors(self.caption_batch(images))
