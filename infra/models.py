"""The model registry: one interface per role, named backends, a `cpu` and a `gpu` profile.

A backend is a class with a `model_id` and a batch method; it is constructed by `load_backend(role, config)`,
which caches one instance per process (per Dask worker) and per configuration, so models load once per worker,
never per sample or per shard. A backend that cannot be provided raises `ModelUnavailable`, naming the role, the
backend and how to provide the model -- never a silent skip.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

# role -> backend name -> "module:Class"; modules are imported only when a backend is used.
BACKENDS: dict[str, dict[str, str]] = {
    "ocr": {"rapidocr": "tasks.ocr:RapidOCRBackend", "paddleocr": "tasks.ocr:PaddleOCRBackend"},
    "detector": {"yolox-onnx": "tasks.detect:YoloxOnnxDetector", "owlv2": "tasks.detect:Owlv2Detector",
                 "yolov3-tiny": "tasks.darknet:YoloV3TinyDetector"},  # the fallback where no YOLOX file exists
    "clip": {"open_clip": "tasks.attributes:OpenClipScorer"},
    "nsfw": {"open_nsfw": "tasks.safety:OpenNsfwClassifier"},
    "captioner": {"openai": "tasks.caption:OpenAICaptioner", "transformers": "tasks.caption:TransformersCaptioner"},
    "llm": {"llamacpp": "tasks.llm:LlamaCppLLM", "openai": "tasks.llm:OpenAILLM", "vllm": "tasks.llm:VllmLLM"},
    "translator": {"bergamot": "tasks.translators:BergamotTranslator",
                   "ctranslate2": "tasks.translators:CTranslate2Translator",
                   "openai": "tasks.translators:OpenAITranslator",
                   "llamacpp": "tasks.translators:LlamaCppTranslator"},
}
# The backend each role uses by default in each profile. None: the role is off unless configured.
PROFILES: dict[str, dict[str, str | None]] = {
    "cpu": {"ocr": "rapidocr", "detector": "yolox-onnx", "clip": None, "captioner": None, "llm": "llamacpp",
            "translator": "bergamot",
            "nsfw": "open_nsfw"},
    "gpu": {"ocr": "paddleocr", "detector": "owlv2", "clip": "open_clip", "captioner": "openai", "llm": "vllm",
            "translator": "ctranslate2",
            "nsfw": "open_nsfw"},
}

# The translator for the language pairs the profile's translator lacks (Bergamot has only en<->pt): the fusion LLM
# in process. The translate stage names per language which one it used.
TRANSLATOR_FALLBACK: dict[str, str | None] = {"cpu": "llamacpp", "gpu": None}

# Backends that cannot run without a CUDA device, and backends that never use one (HTTP clients of a server that
# has its own). Every other backend runs on the GPU worker when its stage's profile is `gpu`.
GPU_ONLY = frozenset({"vllm"})
NO_DEVICE = frozenset({"openai"})
# The cores a worker process may use for a model's own thread pool (llama.cpp's n_threads), set by infra.cluster.
WORKER_THREADS_ENV = "CAPFACTORY_THREADS_PER_WORKER"


def needs_gpu(profile: str, backends) -> bool:
    """The one GPU placement rule: a stage's tasks ask for `GPU=1` (and local workers advertise it) when one of its
    backends needs a GPU, or when its profile is `gpu` and one of them can use one."""
    names = [b for b in backends if b]
    return any(b in GPU_ONLY for b in names) or (profile == "gpu" and any(b not in NO_DEVICE for b in names))


class ModelUnavailable(RuntimeError):
    """A configured model cannot be loaded; the message says which role/backend and how to provide it."""

    def __init__(self, role: str, backend: str, how: str):
        super().__init__(f"{role} backend {backend!r} is unavailable: {how}")
        self.role, self.backend, self.how = role, backend, how

    def __reduce__(self):
        # It crosses process boundaries (a Dask worker's task -> the flow): pickle it with its own arguments.
        return type(self), (self.role, self.backend, self.how)


# ---- the data each role returns (plain dataclasses; stored as Parquet structs) ------------------------------

Box = list[float]  # [x0, y0, x1, y1] in the image's pixel coordinates


@dataclass(slots=True)
class OCRLine:
    text: str
    score: float
    box: list[list[float]]  # quadrilateral: 4 [x, y] points, clockwise from top-left


@dataclass(slots=True)
class OCRResult:
    lines: list[OCRLine] = field(default_factory=list)

    @property
    def full_text(self) -> str:
        """Lines in reading order (top to bottom, then left to right), joined by spaces."""
        return " ".join(line.text for line in self.lines)


@dataclass(slots=True)
class Detection:
    label: str
    score: float
    box: Box


# ---- the interfaces --------------------------------------------------------------------------------------------

class OCRBackend(Protocol):
    model_id: str

    def read(self, images: list[Image.Image]) -> list[OCRResult]: ...


class Detector(Protocol):
    model_id: str

    def detect(self, images: list[Image.Image]) -> list[list[Detection]]: ...


class ClipScorer(Protocol):
    model_id: str

    def image_embeddings(self, images: list[Image.Image]) -> Any: ...

    def scores(self, images: list[Image.Image], texts: list[str]) -> Any:
        """[len(images), len(texts)] cosine similarities."""


class Captioner(Protocol):
    model_id: str

    def caption(self, images: list[Image.Image]) -> list[str]: ...


Messages = list[dict[str, str]]  # OpenAI-style chat: [{"role": "system"|"user"|"assistant", "content": "..."}]


@dataclass(slots=True)
class Completion:
    text: str | None  # None when the request failed
    error: str | None = None


class LLMBackend(Protocol):
    model_id: str

    def generate(self, conversations: list[Messages], max_tokens: int, temperature: float = 0.0,
                 stop: list[str] | None = None) -> list[Completion]:
        """One completion per conversation, in order; a failed one carries its error, it never raises for it."""


# ---- loading ----------------------------------------------------------------------------------------------------

_cache: dict[tuple, Any] = {}
_lock = threading.RLock()  # reentrant: a backend may load another in its constructor (the llamacpp translator its LLM)


def backend_class(role: str, name: str) -> type:
    try:
        target = BACKENDS[role][name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS.get(role, {}))) or "none"
        raise ModelUnavailable(role, name, f"no such backend (known for {role}: {known})") from None
    module, cls = target.split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise ModelUnavailable(role, name, f"cannot import its code ({e}); install the extra it needs: "
                               "pip install 'capfactory[experts]' (cpu backends), '[clip]' or '[gpu]'") from e


def load_backend(role: str, name: str, **options: Any) -> Any:
    """The backend instance for (role, name, options), built once per process."""
    key = (role, name, tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _lock:
        if key not in _cache:
            _cache[key] = backend_class(role, name)(**options)
        return _cache[key]
