"""Vision experts over one ingested shard: the extract stage (OCR, objects + attributes, CLIP tags, a synthetic
caption; the experts themselves are plug-ins in tasks/experts/).

The experts read each sample's analysis copy (KEY.analysis.<ext>: the original, or a copy bounded by
`ingest.images.analysis_size`), the training copy where it is the same image or where the shard was ingested
without analysis copies (counted and said once in the summary). Boxes (objects, OCR lines) are in the original
image's pixels (`original_width` x `original_height` of the ingest table, after EXIF rotation), whatever copy was read.

Models come from the registry (`infra.models`), loaded once per worker process and fed in batches. Each sample
gets a row keyed by `key`; a sample whose image failed ingest is `skipped`, a sample an expert fails on is
`error` with the reason, and the shard always completes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property

from PIL import Image

from infra.models import ModelUnavailable, backend_class, load_backend, needs_gpu
from infra.settings import ExtractConfig, Settings
from tasks.experts import Choice, Expert, experts_schema, published_columns, selected
from tasks.experts.objects import detector_fallback
from tasks.images import decode_rgb
from tasks.shards import RAW, read_marker, read_shard_images
from tasks.stage import ShardContext, ShardOutput, ShardStage, StagePlan, counts_line


@dataclass(frozen=True)
class ExpertPlan:
    """The experts to run and the backend (and options) of each role they use: resolved and checked before any
    task runs."""

    experts: tuple[type[Expert], ...]
    roles: dict[str, Choice]

    def __getitem__(self, role: str) -> Choice:
        return self.roles[role]

    def __contains__(self, role: str) -> bool:
        return role in self.roles


def plan_experts(cfg: ExtractConfig, models_dir: str) -> ExpertPlan:
    """Resolve backends by profile and overrides; raise ModelUnavailable early for what cannot run."""
    experts = selected(cfg.experts)
    roles: dict[str, Choice] = {}
    for expert in experts:
        roles.update({role: choice for role, choice in expert.plan(cfg, models_dir).items() if choice})
    return ExpertPlan(tuple(experts), roles)


CAPTIONER_ERROR = "captioner:"  # a captioner call that failed: the server's failure, not the image's


def _empty_row(key: str, status: str, error: str | None) -> dict:
    return {"key": key, "status": status, "error": error}  # the experts' columns are null unless they fill them


class ExpertRunner:
    """The experts of one plan, applied to batches of images. Backends come from the per-process cache."""

    def __init__(self, plan: ExpertPlan, cfg: ExtractConfig):
        models = {role: load_backend(role, name, **options) for role, (name, options) in plan.roles.items()}
        self.experts = [expert(models, cfg) for expert in plan.experts]
        self.provenance = {"config_hash": cfg.config_hash(), "profile": cfg.profile,
                           **{role: backend.model_id for role, backend in models.items()}}

    def run(self, keys: list[str], images: list[Image.Image]) -> list[dict]:
        """Rows for one batch. Raises if a backend fails; the caller isolates the failing image."""
        rows = [_empty_row(key, "ok", None) for key in keys]
        for expert in self.experts:
            expert.run(images, rows)
        for row in rows:
            row["provenance"] = list(self.provenance.items())
        return rows

    def run_isolated(self, batch: list[tuple[str, Image.Image]]) -> list[dict]:
        """A batch; when a backend fails on it, one image at a time, so that only the breaking image errs."""
        try:
            return self.run([k for k, _ in batch], [im for _, im in batch])
        except ModelUnavailable:
            raise
        except Exception:
            rows = []
            for key, img in batch:
                try:
                    rows += self.run([key], [img])
                except ModelUnavailable:
                    raise
                except Exception as e:
                    rows.append(_empty_row(key, "error", f"{type(e).__name__}: {e}"))
            return rows


def _scale_point(p, sx: float, sy: float) -> list[float]:
    return [p[0] * sx, p[1] * sy]


def to_original_coordinates(row: dict, read: tuple[int, int], original: tuple[int | None, int | None]) -> dict:
    """`row` with its boxes moved from the pixels of the copy the experts read (`read` = its size) to those of
    the original image; a new row, the shared one (identical images share results) is left as it is. A copy of
    another aspect ratio (an old shard's `center_crop` / `border` training copy) keeps its own pixels."""
    ow, oh = original
    if not ow or not oh or tuple(read) == (ow, oh):
        return row
    if abs(read[0] * oh - read[1] * ow) > max(ow, oh):
        return row  # another aspect ratio: a cropped or padded training copy, which no scaling maps back
    sx, sy = ow / read[0], oh / read[1]
    out = dict(row)
    if row.get("objects"):
        out["objects"] = [{**o, "box": [o["box"][0] * sx, o["box"][1] * sy, o["box"][2] * sx, o["box"][3] * sy]}
                          for o in row["objects"]]
    if row.get("ocr"):
        out["ocr"] = [{**ln, "box": [_scale_point(p, sx, sy) for p in ln["box"]]} for ln in row["ocr"]]
    return out


class ExtractStage(ShardStage):
    name = "extract"
    description = "Vision experts (OCR, objects, tags, synthetic caption) over the raw shards."
    warm = ("tasks.extract",)

    @property
    def schema(self):
        return experts_schema()

    @property
    def published(self):
        return published_columns()

    @cached_property
    def config_hash(self) -> str:
        """The config's hash, with the stand-in detector when YOLOv3-tiny replaces a missing YOLOX file: adding the
        file later recomputes the shards (and nothing changes for a config that names its detector). Once per
        stage instance: status() reads it for every shard."""
        base = self.config.config_hash()
        if not detector_fallback(self.config, self.models_dir or Settings().models_dir):
            return base
        return hashlib.sha256(f"{base}+detector=yolov3-tiny".encode()).hexdigest()[:16]

    def plan(self) -> StagePlan:
        plan = plan_experts(self.config, self.models_dir)
        return StagePlan({role: name for role, (name, _) in plan.roles.items()},
                         needs_gpu(self.config.profile, [name for name, _ in plan.roles.values()]), plan)

    def check_backends(self) -> None:
        captioner = plan_experts(self.config, self.models_dir).roles.get("captioner")
        if captioner and captioner[0] == "openai":
            backend_class("captioner", "openai")(**captioner[1]).health_check()

    def process(self, ctx: ShardContext) -> ShardOutput:
        cfg = self.config
        raw = ctx.read(RAW, ["key", "status", "original_width", "original_height"])
        keys = raw.column("key").to_pylist()
        originals = dict(zip(keys, zip(raw.column("original_width").to_pylist(),
                                       raw.column("original_height").to_pylist(), strict=True), strict=True))
        images = read_shard_images(ctx.store, ctx.dataset, ctx.shard, analysis=True)
        # A shard ingested before analysis copies (or with them off) has only the small training copy.
        has_analysis = (read_marker(ctx.store, ctx.dataset, RAW, ctx.shard) or {}).get("analysis") is not None
        runner = ExpertRunner(plan_experts(cfg, self.models_dir), cfg)
        rows: dict[str, dict] = {}
        todo: list[tuple[str, Image.Image]] = []
        read_size: dict[str, tuple[int, int]] = {}  # the size of the copy each distinct image was read at
        first_of: dict[bytes, str] = {}  # identical stored images in a shard go through the models once
        copies: dict[str, str] = {}
        for key, status in zip(keys, raw.column("status").to_pylist(), strict=True):
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
                image = decode_rgb(data)
            except Exception as e:  # a stored image that no longer decodes: record it, keep going
                rows[key] = _empty_row(key, "error", f"cannot decode stored image: {e}")
                continue
            todo.append((key, image))
            read_size[key] = image.size
        for start in range(0, len(todo), cfg.batch_size):
            rows.update((r["key"], r) for r in runner.run_isolated(todo[start:start + cfg.batch_size]))
            ctx.progress(min(start + cfg.batch_size, len(todo)), len(todo))
        for key, original in copies.items():
            rows[key] = {**rows[original], "key": key}
            if original in read_size:
                read_size[key] = read_size[original]
        ordered = [to_original_coordinates(rows[k], read_size[k], originals[k]) if k in read_size else rows[k]
                   for k in keys]
        return ShardOutput(ordered, {
            "images_run": len(todo),  # distinct images given to the models (identical ones share their result)
            "training_copy_images": 0 if has_analysis else len(todo),
            "with_text": sum(1 for r in ordered if r.get("ocr_text")),
            "objects": sum(len(r.get("objects") or []) for r in ordered),
            "provenance": runner.provenance,
        }, [r["error"] for r in ordered if (r["error"] or "").startswith(CAPTIONER_ERROR)])

    def input_markers(self, store, dataset: str, shard: int) -> set[str]:
        # Markers written before every stage shared upstream_fingerprint recorded the raw marker unwrapped.
        raw = read_marker(store, dataset, RAW, shard) or {}
        return super().input_markers(store, dataset, shard) | {json.dumps([raw.get("config_hash"),
                                                                            raw.get("finished_at")])}

    def summary(self, result: dict) -> list[str]:
        fallback = result.get("training_copy_images", 0)
        return [counts_line("status", result.get("counts", {})),
                f"  images with text: {result.get('with_text', 0)}; objects: {result.get('objects', 0)}",
                *(f"  {role}: {model}" for role, model in result.get("provenance", {}).items()),
                *([f"  note: {fallback} images were read from the small training copy: their ingest shards have no "
                   "analysis copy (ingested before analysis copies, or with ingest.images.analysis_size: null), so "
                   "OCR and detection saw fewer pixels; re-run ingest to add them"] if fallback else [])]
