"""Process settings (env vars `CAPFACTORY_*`) and the YAML dataset spec, with errors that name the bad field."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.languages import PRESETS, canonical_language
from infra.stages import LEGACY_FOLDERS, ORDER, OUTPUT_STAGES

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
    # A crawl's head start (tasks/prefetch.py): the command fetches the first shards' URLs while the workers start.
    prefetch: bool = True


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Fields (a pydantic `exclude` spec) that do not change a stage's output: performance knobs, and settings read
    # by a later stage. Everything else is in the config hash that done markers carry.
    NOT_HASHED: ClassVar[set | dict] = set()
    # Fields (dotted paths) that say where a service lives, not what it computes: hashed as if unset, so the same
    # model behind another spelling of its address (localhost / 127.0.0.1, a moved server) recomputes nothing.
    LOCATION: ClassVar[tuple[str, ...]] = ()
    # New fields at these values reproduce the output made before they existed: hashed only when they differ (in
    # nested configs too), so a config that keeps them there keeps its old hash.
    LEGACY: ClassVar[dict] = {}

    def config_hash(self) -> str:
        data = self.model_dump(mode="json", exclude=self.NOT_HASHED)
        _drop_legacy(self, data)
        for dotted in self.LOCATION:
            *parents, leaf = dotted.split(".")
            node = data
            for p in parents:
                node = node[p]
            node[leaf] = None
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _drop_legacy(model: _Strict, data: dict) -> None:
    for name in list(data):
        value = getattr(model, name, None)
        if isinstance(value, _Strict) and isinstance(data[name], dict):
            _drop_legacy(value, data[name])
        elif name in model.LEGACY and data[name] == model.LEGACY[name]:
            del data[name]


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
    analysis_size: int | None = Field(
        default=2048, ge=0, le=16383,
        description="longest side of the analysis copy the experts read (KEY.analysis.<ext> beside the training "
                    "copy; the original bytes when already within it); 0: the original bytes as they came; null: "
                    "no analysis copy (the experts read the training copy)")
    skip_reencode: bool = Field(default=True, description="store the original bytes as the training copy when no "
                                "resize, rotation or conversion is needed and the format matches encode_format")

    LEGACY: ClassVar[dict] = {"analysis_size": None, "skip_reencode": False}

    def hashed(self) -> dict:
        data = self.model_dump(mode="json")
        _drop_legacy(self, data)
        return data


class IngestConfig(_Strict):
    shard_size: int = Field(default=1000, ge=1, le=1_000_000)
    phash_threshold: int = Field(default=4, ge=0, le=16, description="near-duplicate Hamming distance")
    images: ImageConfig = ImageConfig()
    download: DownloadConfig = DownloadConfig()

    def config_hash(self) -> str:
        """Hash of the fields that change a shard's content (not the performance knobs); its own selection, which
        existing datasets' markers carry."""
        d = self.download
        relevant = {
            "images": self.images.hashed(),
            "optout": [d.respect_robots_txt, d.respect_x_robots_tag, sorted(d.disallowed_directives)],
            "allow_cidrs": sorted(d.allow_cidrs),
            "max_bytes": d.max_bytes,
            "max_redirects": d.max_redirects,
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


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
    gate_side: int = Field(
        default=640, ge=0, le=4096,
        description="rapidocr: on images the full detector scales up (short side well under 736 px), a text gate "
                    "first runs the detector alone on a copy this long (never smaller than the image nor than 2/3 of "
                    "the full detector's input); where it finds no text the full read (detector, classifier, "
                    "recogniser) is skipped. 0: off, every image gets the full read")

    LEGACY: ClassVar[dict] = {"gate_side": 0}  # off: the output made before the gate existed


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


class ExtractConfig(_Strict):
    """The vision experts (tasks/extract.py): which experts run, and each role's backend."""

    profile: Literal["cpu", "gpu"] = "cpu"
    experts: tuple[str, ...] = Field(default=("ocr", "objects", "attributes"), min_length=1,
                                     description="expert plug-ins to run (tasks/experts; checked when planned)")
    batch_size: int = Field(default=16, ge=1, le=4096)
    ocr: OCRConfig = OCRConfig()
    detector: DetectorConfig = DetectorConfig()
    clip: ClipConfig = ClipConfig()
    attributes: AttributesConfig = AttributesConfig()
    captioner: CaptionerConfig = CaptionerConfig()

    NOT_HASHED: ClassVar[dict] = {"batch_size": True, "captioner": {"concurrency": True, "timeout": True}}
    LOCATION: ClassVar[tuple[str, ...]] = ("captioner.endpoint",)


class FuseConfig(_Strict):
    """LLM fusion (FuseCap / CapsFusion): how the enriched captions are made and checked."""

    mode: Literal["experts", "capsfusion", "rank-and-fuse"] = "experts"
    profile: Literal["cpu", "gpu"] = "cpu"
    backend: str | None = Field(default=None, description="llamacpp | openai | vllm (default: by profile)")
    model: str | None = Field(default=None, description="GGUF file, served model name, or vLLM model id")
    endpoint: str | None = Field(default=None, description="OpenAI-compatible base URL for the openai backend")
    prompt_version: str = Field(default="v2", pattern=r"^[A-Za-z0-9_.-]+$")
    outputs: tuple[Literal["short", "dense"], ...] = ("short", "dense")
    temperature: float = Field(default=0.0, ge=0, le=2)
    max_tokens_short: int = Field(default=48, ge=8, le=1024)
    max_tokens_dense: int = Field(default=160, ge=8, le=4096)
    min_words: int = Field(default=4, ge=1)
    max_words_short: int = Field(default=30, ge=1)
    max_words_dense: int = Field(default=120, ge=1)
    max_unsupported: int = Field(default=0, ge=0, description="objects a caption may assert without support")
    min_object_score: float = Field(default=0.6, ge=0, le=1, description="detections below this score are neither "
                                    "facts in the prompt nor support for a caption")
    language: str | None = Field(default="en", description="expected caption language (None: no check)")
    n_ctx: int = Field(default=2048, ge=256)
    seed: int = 0
    clip: ClipConfig = Field(default=ClipConfig(), description="the image-text scorer of rank-and-fuse")
    batch_size: int = Field(default=16, ge=1, le=100_000, description="prompts per backend call (progress is "
                            "reported per call; raise it for vLLM, whose offline engine batches what it is given)")
    concurrency: int = Field(default=16, ge=1, le=4096)
    timeout: float = Field(default=120.0, gt=0)

    NOT_HASHED: ClassVar[set] = {"batch_size", "concurrency", "timeout"}
    LOCATION: ClassVar[tuple[str, ...]] = ("endpoint",)


class TranslateConfig(_Strict):
    """Machine translation of captions (tasks/translate.py): which fields, into which languages (every sample into
    every language, or k languages per sample drawn reproducibly from a distribution such as mBLIP's mC4 shares),
    by which backend, and the quality-estimation thresholds a translation must pass."""

    fields: tuple[Literal["caption_short", "caption_dense", "alt_text"], ...] = Field(
        default=("caption_short",), min_length=1, description="source columns (caption_* need the fused stage)")
    source_language: str = "en"
    languages: tuple[str, ...] = Field(default=("pt",), min_length=1, description="ISO 639-1/-3 or NLLB codes")
    allocation: Literal["all", "sample"] = Field(default="all", description="all: every sample into every "
                                                 "language; sample: `per_sample` languages drawn per sample")
    per_sample: int = Field(default=1, ge=1, description="languages per sample when allocation is sample")
    distribution: str | dict[str, float] = Field(default="mc4", description="'mc4' (mBLIP's choice: mC4 shares, "
                                                 "restricted to `languages`), 'uniform', or {lang: weight}")
    seed: int = 0
    profile: Literal["cpu", "gpu"] = "cpu"
    backend: str | None = Field(default=None, description="bergamot | ctranslate2 | openai | llamacpp for every "
                                "language (default: by profile; cpu: bergamot where it has the pair, else llamacpp)")
    backends: dict[str, str] = Field(default_factory=dict, description="{lang: backend}: per language, over "
                                     "`backend` and the profile's routing")
    model: str | None = Field(default=None, description="CTranslate2 model folder (path or name under models_dir), "
                              "or the served model name for openai")
    llm_model: str | None = Field(default=None, description="the llamacpp translator's model: a name "
                                  "(smollm2-135m, qwen2.5-1.5b) or a GGUF file (default: the fusion default)")
    endpoint: str | None = Field(default=None, description="OpenAI-compatible base URL for the openai backend")
    segment: bool = Field(default=True, description="translate multi-sentence text sentence by sentence")
    drop_failed: bool = Field(default=True, description="leave flagged translations out of the published set "
                              "(translated/ always keeps them with their reasons)")
    min_length_ratio: float = Field(default=0.45, gt=0, description="translation/source characters, lower bound")
    max_length_ratio: float = Field(default=2.2, gt=0, description="upper bound")
    round_trip: bool = Field(default=False, description="translate back and score chrF against the source")
    llm_round_trip: bool = Field(default=True, description="the round trip for the languages the llamacpp "
                                 "translator translates, even with round_trip off")
    min_chrf: float = Field(default=35.0, ge=0, le=100, description="round-trip chrF below this is flagged")
    batch_size: int = Field(default=64, ge=1, le=100_000, description="segments per backend call")
    concurrency: int = Field(default=8, ge=1, le=4096, description="requests/threads in flight per shard task")
    timeout: float = Field(default=120.0, gt=0)

    @field_validator("source_language")
    @classmethod
    def _source(cls, value: str) -> str:
        return canonical_language(value)

    @field_validator("languages")
    @classmethod
    def _languages(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(canonical_language(v) for v in value))

    @field_validator("backends")
    @classmethod
    def _backends(cls, value: dict[str, str]) -> dict[str, str]:
        return {canonical_language(lang): name for lang, name in value.items()}

    @model_validator(mode="after")
    def _routed_languages(self) -> TranslateConfig:
        unknown = sorted(set(self.backends) - set(self.languages))
        if unknown:
            raise ValueError(f"translate.backends names {', '.join(unknown)}, not in translate.languages")
        return self

    @field_validator("distribution")
    @classmethod
    def _distribution(cls, value: str | dict[str, float]) -> str | dict[str, float]:
        if isinstance(value, str):
            if value not in PRESETS:
                raise ValueError(f"unknown preset {value!r} (known: {', '.join(PRESETS)}; or a {{lang: weight}} map)")
            return value
        if any(w < 0 for w in value.values()) or not any(w > 0 for w in value.values()):
            raise ValueError("weights must be >= 0 with at least one > 0")
        return {canonical_language(k): float(w) for k, w in sorted(value.items())}

    NOT_HASHED: ClassVar[set] = {"batch_size", "concurrency", "timeout", "drop_failed"}  # drop_failed: publish's
    LOCATION: ClassVar[tuple[str, ...]] = ("endpoint",)
    LEGACY: ClassVar[dict] = {"backends": {}, "llm_model": None, "llm_round_trip": True}



class ScoreConfig(_Strict):
    """The `score` stage: scores (CLIP, NSFW, language), semantic dedup and the filters applied as views
    (tasks/score.py, tasks/safety.py, tasks/semdedup.py, tasks/filters.py)."""

    class SemDedup(_Strict):
        """SemDeDup on the CLIP image embeddings: k-means, then near-duplicates inside each cluster."""

        enabled: bool = True
        clusters: int | None = Field(default=None, ge=1, description="k-means clusters (default: about sqrt(n))")
        eps: float = Field(default=0.05, gt=0, lt=1, description="duplicates: cosine similarity > 1 - eps")
        seed: int = 0
        iterations: int = Field(default=30, ge=1, le=1000)

    class Filters(_Strict):
        """Selection views applied at publish time; samples are never deleted, only marked."""

        clip_min: dict[Literal["alt", "short", "dense"], float] | Literal["laion"] | None = Field(
            default=None, description="{field: min CLIP score}, or 'laion' (alt-text >= 0.28 English, 0.26 else)")
        clip_top_percent: dict[Literal["alt", "short", "dense"], float] = Field(
            default={}, description="{field: percent}: keep the top k % by CLIP score (DataComp)")
        datacomp_basic: bool = Field(default=False, description="English alt-text, > 2 words, side >= 200, "
                                                                "aspect <= 3")
        min_size: int | None = Field(default=None, ge=1, description="smallest side of the original image")
        max_aspect: float | None = Field(default=None, ge=1.0)
        languages: tuple[str, ...] = Field(default=(), description="allowed alt-text languages (empty: any)")
        nsfw_max: float | None = Field(default=None, ge=0, le=1)
        drop_duplicates: bool = Field(default=True, description="drop ingest's exact / near duplicates")
        drop_semdedup: bool = Field(default=True, description="drop semantic duplicates")

        @field_validator("clip_top_percent")
        @classmethod
        def _percent(cls, value: dict) -> dict:
            for field, pct in value.items():
                if not 0 < pct <= 100:
                    raise ValueError(f"{field}: a percentage in (0, 100], got {pct}")
            return value

    profile: Literal["cpu", "gpu"] = "cpu"
    clip: ClipConfig = Field(default=ClipConfig(), description="image-text scorer (default: off in the cpu profile)")
    multilingual: bool = Field(default=False, description="the clip model is multilingual: it scores translations")
    clip_translations: ClipConfig | None = Field(
        default=None, description="a multilingual CLIP for translations and non-English alt-text, e.g. "
                                  "xlm-roberta-base-ViT-B-32 + laion5b_s13b_b90k")
    nsfw: bool = True
    language_id: bool = True
    semdedup: SemDedup = SemDedup()
    filters: Filters = Filters()
    batch_size: int = Field(default=32, ge=1, le=4096, description="images per model call")

    NOT_HASHED: ClassVar[set] = {"filters", "semdedup", "batch_size"}  # filters and semdedup: dataset-wide, after


class ValidateConfig(_Strict):
    """Great Expectations suites per stage output (expectations/, tasks/validate.py)."""

    on_failure: Literal["quarantine", "fail"] = Field(
        default="quarantine", description="quarantine: set failing rows aside; fail: the run fails")
    stages: tuple[Literal[OUTPUT_STAGES], ...] | None = Field(
        default=None, description="suites to run (one per stage output); default: every output present")
    caption_min_chars: int = Field(default=1, ge=1)
    caption_max_chars: int = Field(default=2000, ge=1)
    alt_text_max_chars: int = Field(default=4000, ge=1)
    translation_lang_match_mostly: float = Field(
        default=0.9, ge=0, le=1, description="share of translations whose detected language must be the target")
    drift_reference_shard: int | None = Field(
        default=None, ge=0, description="scores shard the drift checks compare with (default: the first one)")
    drift_tolerance: float = Field(default=0.1, gt=0, description="allowed shift of a score's mean and median")
    drift_max_kl: float = Field(default=0.5, gt=0, description="KL divergence bound against the reference")
    drift_min_rows: int = Field(default=30, ge=1, description="fewer scored rows in a shard: no drift check")
    data_docs: bool = Field(default=True, description="build GX data docs into <dataset>/validate/data_docs/")

    @field_validator("stages", mode="before")
    @classmethod
    def _legacy_suites(cls, value):
        # Suites were named after the old stage folders (raw, experts, fused, translated, scores).
        return None if value is None else [LEGACY_FOLDERS.get(v, v) for v in value]

    NOT_HASHED: ClassVar[set] = {"data_docs"}


class PublishConfig(_Strict):
    """The published dataset and its report (tasks/publish.py, tasks/report.py)."""

    caption_field: Literal["caption_short", "caption_dense", "alt_text"] = Field(
        default="caption_short", description="the caption in KEY.txt; the alt-text stands in where it is empty")
    shard_size: int = Field(default=1000, ge=1, le=1_000_000, description="samples per published tar")
    include_unselected_in_parquet: bool = Field(default=True, description="samples.parquet keeps filtered rows")
    license: str = Field(default="other", pattern=r"^[a-z0-9.-]+$",
                         description="dataset-card license id (the images keep their owners' rights)")
    description: str | None = Field(default=None, description="dataset-card summary paragraph")
    gallery_size: int = Field(default=24, ge=0, le=500, description="report: sample thumbnails shown")


StageName = Literal[ORDER]
# Spec sections named before every stage had one name, and their current names (`validation`, the old name of
# `validate`, is still the Python attribute and so is read as it is).
LEGACY_SECTIONS = {"experts": "extract", "quality": "score"}


InputFormat = Literal["auto", "parquet", "csv", "tsv", "jsonl", "folder"]
Preset = Literal["auto", "laion", "cc3m", "wit", "generic"]


class InputSpec(_Strict):
    path: str
    format: InputFormat = "auto"
    preset: Preset = "auto"
    url_col: str | None = None
    caption_col: str | None = None


class DatasetSpec(_Strict):
    """A dataset: its inputs, and one config section per stage, named as the stage (`validate` is `validation`
    in Python only, because pydantic models have a `validate` method)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str
    store: str | None = None
    inputs: list[InputSpec] = []
    ingest: IngestConfig = IngestConfig()
    extract: ExtractConfig = ExtractConfig()
    fuse: FuseConfig = FuseConfig()
    translate: TranslateConfig = TranslateConfig()
    score: ScoreConfig = ScoreConfig()
    validation: ValidateConfig = Field(default=ValidateConfig(), alias="validate")
    publish: PublishConfig = PublishConfig()
    stages: tuple[StageName, ...] = Field(default=ORDER, description="what `capfactory build` runs, in order")

    @model_validator(mode="before")
    @classmethod
    def _legacy_sections(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in LEGACY_SECTIONS.items():
            if old in data:
                if new in data:
                    raise ValueError(f"`{old}` is the old name of the `{new}` section: give only `{new}`")
                data[new] = data.pop(old)
        return data

    def section(self, stage: str) -> BaseModel:
        """The config section of a stage."""
        return self.validation if stage == "validate" else getattr(self, stage)

    def to_json(self) -> dict[str, Any]:
        """The spec as given (unset fields left out), with the current section names."""
        return self.model_dump(mode="json", exclude_unset=True, by_alias=True)

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
