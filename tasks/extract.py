"""Vision experts over one ingested shard: OCR, objects (+ attributes), CLIP tags, a synthetic caption.

Models come from the registry (`infra.models`), loaded once per worker process and fed in batches. Each sample
gets a row keyed by `key`; a sample whose image failed ingest is `skipped`, a sample an expert fails on is
`error` with the reason, and the shard always completes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from PIL import Image

from infra.models import PROFILES, ModelUnavailable, backend_class, load_backend
from infra.settings import ExpertsConfig
from infra.store import open_store
from tasks.ingest import STAGE as RAW
from tasks.shards import read_marker, stage_key, write_marker

STAGE = "experts"
IMAGE_EXTS = (".jpg", ".jpeg", ".webp", ".png")

_OCR_LINE = pa.struct([("text", pa.string()), ("score", pa.float32()), ("box", pa.list_(pa.list_(pa.float32())))])
_OBJECT = pa.struct([("label", pa.string()), ("score", pa.float32()), ("box", pa.list_(pa.float32())),
                     ("color", pa.string()), ("size", pa.string()), ("position", pa.string())])
_TAG = pa.struct([("tag", pa.string()), ("score", pa.float32())])
EXPERTS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("status", pa.string()),  # ok | error | skipped (no image: ingest failed or filtered)
    ("error", pa.string()),
    ("ocr", pa.list_(_OCR_LINE)),
    ("ocr_text", pa.string()),
    ("objects", pa.list_(_OBJECT)),
    ("object_counts", pa.map_(pa.string(), pa.int32())),
    ("tags", pa.list_(_TAG)),
    ("caption_synthetic", pa.string()),
    ("provenance", pa.map_(pa.string(), pa.string())),
])


@dataclass(frozen=True)
class ExpertPlan:
    """Which backend (and options) each role uses for a config: resolved and checked before any task runs."""

    ocr: tuple[str, dict] | None
    detector: tuple[str, dict] | None
    clip: tuple[str, dict] | None
    captioner: tuple[str, dict] | None


def _resolve(role: str, explicit: str | None, profile: str, needed: bool) -> str | None:
    name = explicit or PROFILES[profile][role]
    if needed and name is None:
        raise ModelUnavailable(role, "none", f"the {profile} profile has no default {role}; set "
                               f"experts.{role}.backend (e.g. {PROFILES['gpu'][role]!r}) or leave this expert out")
    if name is not None:
        backend_class(role, name)  # an unknown backend name fails here, before any task is submitted
    return name if needed else None


def plan_experts(cfg: ExpertsConfig, models_dir: str) -> ExpertPlan:
    """Resolve backends by profile and overrides; raise ModelUnavailable early for what cannot run."""
    wanted = set(cfg.experts)
    ocr = _resolve("ocr", cfg.ocr.backend, cfg.profile, "ocr" in wanted)
    detector = _resolve("detector", cfg.detector.backend, cfg.profile, bool({"objects", "attributes"} & wanted))
    # CLIP tags are part of `attributes` when a CLIP model is configured (or the profile has one).
    has_clip = (cfg.clip.backend or PROFILES[cfg.profile]["clip"]) is not None
    clip = _resolve("clip", cfg.clip.backend, cfg.profile, "attributes" in wanted and has_clip)
    captioner = _resolve("captioner", cfg.captioner.backend, cfg.profile, "caption" in wanted)
    det_options = None
    if detector == "yolox-onnx":
        path = Path(cfg.detector.model)
        if not path.is_absolute():
            path = Path(models_dir) / path
        if not path.is_file():
            raise ModelUnavailable("detector", detector, f"no model file at {path}; put yolox_nano.onnx there "
                                   "(models folder: --models-dir / CAPFACTORY_MODELS_DIR) or set "
                                   "experts.detector.model")
        det_options = {"model_path": str(path.resolve()), "score_threshold": cfg.detector.score_threshold,
                       "nms_iou": cfg.detector.nms_iou, "input_size": cfg.detector.input_size}
    elif detector is not None:
        det_options = {"model": cfg.detector.model, "vocabulary": cfg.detector.vocabulary,
                       "score_threshold": cfg.detector.score_threshold}
    if captioner == "openai" and not (cfg.captioner.endpoint and cfg.captioner.model):
        raise ModelUnavailable("captioner", captioner, "set experts.captioner.endpoint (an OpenAI-compatible "
                               "server such as vLLM) and experts.captioner.model")
    c = cfg.captioner
    return ExpertPlan(
        ocr=(ocr, {"min_score": cfg.ocr.min_score, "lang": cfg.ocr.lang, "model_dir": cfg.ocr.model_dir})
        if ocr else None,
        detector=(detector, det_options) if detector else None,
        clip=(clip, {"model": cfg.clip.model, "pretrained": cfg.clip.pretrained}) if clip else None,
        captioner=(captioner, {"endpoint": c.endpoint, "model": c.model, "prompt": c.prompt,
                               "max_tokens": c.max_tokens, "concurrency": c.concurrency, "timeout": c.timeout})
        if captioner else None,
    )


def read_shard_images(store, dataset: str, shard: int) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="capfactory-") as tmp:
        local = Path(tmp) / "shard.tar"
        store.get_file(stage_key(dataset, RAW, shard, "tar"), local)
        with tarfile.open(local) as tar:
            return {m.name.rsplit(".", 1)[0]: tar.extractfile(m).read()
                    for m in tar if m.isfile() and m.name.lower().endswith(IMAGE_EXTS)}


def _empty_row(key: str, status: str, error: str | None) -> dict:
    return {"key": key, "status": status, "error": error, "ocr": None, "ocr_text": None, "objects": None,
            "object_counts": None, "tags": None, "caption_synthetic": None, "provenance": None}


class ExpertRunner:
    """The experts of one plan, applied to batches of images. Backends come from the per-process cache."""

    def __init__(self, plan: ExpertPlan, cfg: ExpertsConfig):
        self.cfg = cfg
        wanted = set(cfg.experts)
        self.ocr = load_backend("ocr", plan.ocr[0], **plan.ocr[1]) if plan.ocr else None
        self.detector = load_backend("detector", plan.detector[0], **plan.detector[1]) if plan.detector else None
        self.clip = load_backend("clip", plan.clip[0], **plan.clip[1]) if plan.clip else None
        self.captioner = (load_backend("captioner", plan.captioner[0], **plan.captioner[1])
                          if plan.captioner else None)
        self.with_objects = "objects" in wanted or "attributes" in wanted
        self.with_attributes = "attributes" in wanted
        self.provenance = {"config_hash": cfg.config_hash(), "profile": cfg.profile}
        for role in ("ocr", "detector", "clip", "captioner"):
            backend = getattr(self, role)
            if backend is not None:
                self.provenance[role] = backend.model_id

    def run(self, keys: list[str], images: list[Image.Image]) -> list[dict]:
        """Rows for one batch. Raises if a backend fails; the caller isolates the failing image."""
        from tasks.attributes import clip_tags, object_attributes

        n = len(images)
        ocr = self.ocr.read(images) if self.ocr else [None] * n
        dets = self.detector.detect(images) if self.detector and self.with_objects else [None] * n
        tags = clip_tags(self.clip, images, list(self.cfg.attributes.tags), self.cfg.attributes.top_k) \
            if self.clip and self.with_attributes else [None] * n
        captions = self.captioner.caption_batch(images) if self.captioner else [(None, None)] * n
        rows = []
        for i, key in enumerate(keys):
            row = _empty_row(key, "ok", None)
            if ocr[i] is not None:
                row["ocr"] = [{"text": ln.text, "score": ln.score, "box": ln.box} for ln in ocr[i].lines]
                row["ocr_text"] = ocr[i].full_text
            if dets[i] is not None:
                if self.with_attributes:
                    objects = object_attributes(images[i], dets[i])
                else:
                    objects = [{"label": d.label, "score": d.score, "box": d.box} for d in dets[i]]
                row["objects"] = objects
                row["object_counts"] = list(Counter(o["label"] for o in objects).items())
            if tags[i] is not None:
                row["tags"] = [{"tag": t, "score": s} for t, s in tags[i]]
            caption, error = captions[i]
            row["caption_synthetic"] = caption
            if error:
                row["status"], row["error"] = "error", f"captioner: {error}"
            row["provenance"] = list(self.provenance.items())
            rows.append(row)
        return rows


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


def extract_shard(store_uri: str, dataset: str, shard: int, cfg: ExpertsConfig, models_dir: str) -> dict:
    """Run the configured experts over one raw shard; write `<dataset>/experts/shard-NNNNN.parquet` and its
    done marker. Returns the shard's stats."""
    started = time.time()
    store = open_store(store_uri)
    raw_marker = read_marker(store, dataset, RAW, shard)
    if raw_marker is None:
        raise RuntimeError(f"raw shard {shard:05d} of {dataset} is not finished; run ingest first")
    raw = store.get_parquet(stage_key(dataset, RAW, shard, "parquet"), columns=["key", "status"])
    images = read_shard_images(store, dataset, shard)
    runner = ExpertRunner(plan_experts(cfg, models_dir), cfg)

    rows: dict[str, dict] = {}
    todo: list[tuple[str, Image.Image]] = []
    first_of: dict[bytes, str] = {}  # identical stored images in a shard go through the models once
    copies: dict[str, str] = {}
    for key, status in zip(raw.column("key").to_pylist(), raw.column("status").to_pylist(), strict=True):
        if status != "ok" or key not in images:
            rows[key] = _empty_row(key, "skipped", f"no image (ingest status {status})")
            continue
        data = images.pop(key)
        digest = hashlib.sha256(data).digest()
        if digest in first_of:
            copies[key] = first_of[digest]
            continue
        first_of[digest] = key
        try:
            todo.append((key, _decode(data)))
        except Exception as e:  # a stored image that no longer decodes: record it, keep going
            rows[key] = _empty_row(key, "error", f"cannot decode stored image: {e}")
    for start in range(0, len(todo), cfg.batch_size):
        batch = todo[start:start + cfg.batch_size]
        try:
            batch_rows = runner.run([k for k, _ in batch], [im for _, im in batch])
        except ModelUnavailable:
            raise
        except Exception:
            # Isolate the sample that breaks a backend: run the batch one image at a time.
            batch_rows = []
            for key, img in batch:
                try:
                    batch_rows += runner.run([key], [img])
                except ModelUnavailable:
                    raise
                except Exception as e:
                    batch_rows.append(_empty_row(key, "error", f"{type(e).__name__}: {e}"))
        rows.update((r["key"], r) for r in batch_rows)

    for key, original in copies.items():
        rows[key] = {**rows[original], "key": key}
    ordered = [rows[k] for k in raw.column("key").to_pylist()]
    store.put_parquet(stage_key(dataset, STAGE, shard, "parquet"), pa.Table.from_pylist(ordered, EXPERTS_SCHEMA))
    stats = {
        "shard": shard,
        "config_hash": cfg.config_hash(),
        "input_marker": _input_fingerprint(raw_marker),
        "samples": len(ordered),
        "images_run": len(todo),  # distinct images given to the models (identical ones share their result)
        "counts": dict(Counter(r["status"] for r in ordered)),
        "with_text": sum(1 for r in ordered if r["ocr_text"]),
        "objects": sum(len(r["objects"] or []) for r in ordered),
        "provenance": runner.provenance,
        "seconds": round(time.time() - started, 3),
    }
    write_marker(store, dataset, STAGE, shard, stats)
    return stats


def _input_fingerprint(raw_marker: dict) -> str:
    """What the experts ran on: a re-ingested raw shard invalidates its experts output."""
    return json.dumps([raw_marker.get("config_hash"), raw_marker.get("finished_at")])


def shards_to_extract(store, dataset: str, cfg: ExpertsConfig) -> tuple[list[int], list[int], list[int]]:
    """(to run, already done, raw shards not finished) for the dataset's raw shards."""
    from tasks.shards import planned_shards

    todo, done, waiting = [], [], []
    for shard in planned_shards(store, dataset):
        raw_marker = read_marker(store, dataset, RAW, shard)
        if raw_marker is None:
            waiting.append(shard)
            continue
        marker = read_marker(store, dataset, STAGE, shard)
        fresh = (marker is not None and marker.get("config_hash") == cfg.config_hash()
                 and marker.get("input_marker") == _input_fingerprint(raw_marker))
        (done if fresh else todo).append(shard)
    return todo, done, waiting
