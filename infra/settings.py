"""Process settings (env vars `CAPFACTORY_*`) and the YAML dataset spec, with errors that name the bad field."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STORE = "./capfactory-data"
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SpecError(ValueError):
    """A dataset spec or a command-line option that does not validate; the message names the field."""


class Settings(BaseSettings):
    """Where things live. Read from the environment (`CAPFACTORY_STORE`, `CAPFACTORY_S3_ENDPOINT`, ...)."""

    model_config = SettingsConfigDict(env_prefix="CAPFACTORY_", extra="ignore")

    store: str = DEFAULT_STORE
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_secure: bool = True
    s3_region: str | None = None
    dask_address: str | None = None
    dask_workers: int | None = Field(default=None, ge=1)
    models_dir: str = "./models"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DownloadConfig(_Strict):
    """How images are fetched. Only the opt-out and address policy fields change what lands in a shard."""

    concurrency: int = Field(default=64, ge=1, le=4096, description="requests in flight per shard task")
    per_host: int = Field(default=16, ge=1, le=1024, description="connections per host per shard task")
    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=10.0, gt=0)
    total_timeout: float = Field(default=30.0, gt=0)
    retries: int = Field(default=2, ge=0, le=10, description="retries on transient errors only")
    backoff: float = Field(default=0.5, ge=0, description="first retry delay in seconds, doubled each time")
    max_redirects: int = Field(default=5, ge=0, le=30)
    max_bytes: int = Field(default=20_000_000, gt=0, description="body size cap")
    user_agent_token: str = Field(default="capfactory", pattern=r"^[A-Za-z0-9_-]+$")
    respect_robots_txt: bool = True
    respect_x_robots_tag: bool = True
    disallowed_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex", "none")
    allow_cidrs: tuple[str, ...] = Field(
        default=(), description="private/loopback ranges opened explicitly, e.g. 127.0.0.0/8"
    )

    @field_validator("allow_cidrs")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as e:
                raise ValueError(f"{cidr!r} is not a CIDR range ({e})") from None
        return value

    @property
    def user_agent(self) -> str:
        return f"Mozilla/5.0 (compatible; {self.user_agent_token}/0.1; +https://github.com/capfactory/capfactory)"


ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]


class ImageConfig(_Strict):
    """What is done to each image; every field changes the output, so all of them are in the config hash."""

    image_size: int = Field(default=256, ge=8, le=16384)
    resize_mode: ResizeMode = "keep_ratio"
    resize_only_if_bigger: bool = False
    encode_format: Literal["jpg", "webp", "png"] = "jpg"
    encode_quality: int = Field(default=95, ge=1, le=100)
    min_image_size: int = Field(default=0, ge=0, description="smallest side of the original, in pixels")
    max_aspect_ratio: float | None = Field(default=None, ge=1.0)
    max_image_pixels: int = Field(default=50_000_000, gt=0, description="decompression-bomb limit")


class IngestConfig(_Strict):
    shard_size: int = Field(default=1000, ge=1, le=1_000_000)
    phash_threshold: int = Field(default=4, ge=0, le=16, description="near-duplicate Hamming distance")
    images: ImageConfig = ImageConfig()
    download: DownloadConfig = DownloadConfig()

    def config_hash(self) -> str:
        """Hash of the fields that change a shard's content (not the performance knobs)."""
        d = self.download
        relevant = {
            "images": self.images.model_dump(mode="json"),
            "optout": [d.respect_robots_txt, d.respect_x_robots_tag, sorted(d.disallowed_directives)],
            "allow_cidrs": sorted(d.allow_cidrs),
            "max_bytes": d.max_bytes,
            "max_redirects": d.max_redirects,
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


ExpertName = Literal["ocr", "objects", "attributes", "caption"]
DEFAULT_TAGS = (
    "indoor", "outdoor", "daytime", "night", "portrait", "landscape", "close-up", "aerial view", "text", "logo",
    "people", "animal", "vehicle", "food", "building", "nature", "water", "sky", "snow", "sports",
    "black and white photo", "illustration", "screenshot", "painting", "diagram",
)


class OCRConfig(_Strict):
    backend: str | None = Field(default=None, description="rapidocr | paddleocr (default: by profile)")
    min_score: float = Field(default=0.5, ge=0, le=1, description="drop recognised lines below this score")
    lang: str = "en"
    model_dir: str | None = Field(default=None, description="local model folder (PP-OCR ONNX files or PaddleOCR)")


class DetectorConfig(_Strict):
    backend: str | None = Field(default=None, description="yolox-onnx | owlv2 (default: by profile)")
    model: str = Field(default="detector/yolox_nano.onnx", description="file under models_dir, a path, or hub id")
    score_threshold: float = Field(default=0.3, ge=0, le=1)
    nms_iou: float = Field(default=0.45, gt=0, le=1)
    input_size: int = Field(default=416, ge=32, le=2048)
    vocabulary: tuple[str, ...] = Field(default=(), description="labels for open-vocabulary detectors")


class ClipConfig(_Strict):
    backend: str | None = Field(default=None, description="open_clip (default: off in the cpu profile)")
    model: str = "ViT-B-32"
    pretrained: str | None = Field(default="laion2b_s34b_b79k", description="open_clip tag or a local file")


class AttributesConfig(_Strict):
    tags: tuple[str, ...] = Field(default=DEFAULT_TAGS, description="CLIP zero-shot tag vocabulary")
    top_k: int = Field(default=5, ge=1, le=100)


class CaptionerConfig(_Strict):
    backend: str | None = Field(default=None, description="openai | transformers (default: off in the cpu profile)")
    endpoint: str | None = Field(default=None, description="OpenAI-compatible base URL, e.g. http://vllm:8000/v1")
    model: str | None = Field(default=None, description="served model name, or local path for transformers")
    prompt: str = "Describe this image in one detailed sentence."
    max_tokens: int = Field(default=96, ge=1, le=4096)
    concurrency: int = Field(default=16, ge=1, le=1024)
    timeout: float = Field(default=60.0, gt=0)


class ExpertsConfig(_Strict):
    profile: Literal["cpu", "gpu"] = "cpu"
    experts: tuple[ExpertName, ...] = ("ocr", "objects", "attributes")
    batch_size: int = Field(default=16, ge=1, le=4096)
    ocr: OCRConfig = OCRConfig()
    detector: DetectorConfig = DetectorConfig()
    clip: ClipConfig = ClipConfig()
    attributes: AttributesConfig = AttributesConfig()
    captioner: CaptionerConfig = CaptionerConfig()

    def config_hash(self) -> str:
        """Everything here changes the output except the batch size and the captioner's concurrency/timeout."""
        data = self.model_dump(mode="json", exclude={"batch_size": True,
                                                    "captioner": {"concurrency": True, "timeout": True}})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class FuseConfig(_Strict):
    """LLM fusion (FuseCap / CapsFusion): how the enriched captions are made and checked."""

    mode: Literal["experts", "capsfusion", "rank-and-fuse"] = "experts"
    profile: Literal["cpu", "gpu"] = "cpu"
    backend: str | None = Field(default=None, description="llamacpp | openai | vllm (default: by profile)")
    model: str | None = Field(default=None, description="GGUF file, served model name, or vLLM model id")
    endpoint: str | None = Field(default=None, description="OpenAI-compatible base URL for the openai backend")
    prompt_version: str = Field(default="v1", pattern=r"^[A-Za-z0-9_.-]+$")
    outputs: tuple[Literal["short", "dense"], ...] = ("short", "dense")
    temperature: float = Field(default=0.0, ge=0, le=2)
    max_tokens_short: int = Field(default=48, ge=8, le=1024)
    max_tokens_dense: int = Field(default=160, ge=8, le=4096)
    min_words: int = Field(default=4, ge=1)
    max_words_short: int = Field(default=30, ge=1)
    max_words_dense: int = Field(default=120, ge=1)
    max_unsupported: int = Field(default=0, ge=0, description="objects a caption may assert without support")
    language: str | None = Field(default="en", description="expected caption language (None: no check)")
    n_ctx: int = Field(default=2048, ge=256)
    seed: int = 0
    clip: ClipConfig = Field(default=ClipConfig(), description="the image-text scorer of rank-and-fuse")
    batch_size: int = Field(default=32, ge=1, le=100_000, description="prompts per backend call")
    concurrency: int = Field(default=16, ge=1, le=4096)
    timeout: float = Field(default=120.0, gt=0)

    def config_hash(self) -> str:
        data = self.model_dump(mode="json", exclude={"batch_size", "concurrency", "timeout"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


InputFormat = Literal["auto", "parquet", "csv", "tsv", "jsonl", "folder"]
Preset = Literal["auto", "laion", "cc3m", "wit", "generic"]


class InputSpec(_Strict):
    path: str
    format: InputFormat = "auto"
    preset: Preset = "auto"
    url_col: str | None = None
    caption_col: str | None = None


class DatasetSpec(_Strict):
    name: str
    store: str | None = None
    inputs: list[InputSpec] = []
    ingest: IngestConfig = IngestConfig()
    experts: ExpertsConfig = ExpertsConfig()
    fuse: FuseConfig = FuseConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not DATASET_NAME.match(value):
            raise ValueError("must be 1-128 characters of letters, digits, '.', '_' or '-'")
        return value


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source} is not valid:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
        lines.append(f"  {field}: {e['msg']}{shown}")
    return "\n".join(lines)


def build_spec(data: dict[str, Any], source: str = "dataset spec") -> DatasetSpec:
    try:
        return DatasetSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, source)) from None


def load_spec(path: str | Path) -> DatasetSpec:
    """Read and validate a YAML dataset spec; relative input paths are taken from the spec's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(f"cannot read dataset spec {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"dataset spec {path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"dataset spec {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"dataset spec {path} must be a YAML mapping, got {type(data).__name__}")
    for item in data.get("inputs") or []:
        if isinstance(item, dict) and isinstance(item.get("path"), str) and "://" not in item["path"]:
            item["path"] = str((path.parent / item["path"]).resolve())
    return build_spec(data, f"dataset spec {path}")
