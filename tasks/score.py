"""Scores over one shard: CLIP image-text similarity, NSFW probability and language ID; nothing is removed here.

- CLIP (open_clip; LAION-5B used ViT-B/32 >= 0.28 for English, multilingual CLIP >= 0.26 otherwise): cosine of the
  image embedding with the alt-text and, where the fuse stage ran, the fused short and dense captions. Translations
  (the translate stage's long table) are scored with a multilingual model: the main one when `multilingual`, or
  `clip_translations`, which also scores non-English alt-texts. Image embeddings are stored in
  `<dataset>/embeddings/` and reused (by image sha256 and model id) when captions change and a shard is re-scored.
- NSFW: open_nsfw (tasks/safety.py). Language: py3langid, with its normalised probability for the alt-text.

Every raw row gets a score row: `ok`, `skipped` (no image: the raw row failed) or `error` (the stored image could
not be decoded; the error is kept, the others in the shard are still scored).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from infra.models import PROFILES, ModelUnavailable, backend_class, load_backend, needs_gpu
from infra.settings import ClipConfig, ScoreConfig
from infra.store import open_store
from tasks.attributes import hub_offline
from tasks.lib.langid import detect_with_prob
from tasks.semdedup import semdedup_dataset
from tasks.shards import RAW, read_marker
from tasks.stage import ShardContext, ShardOutput, ShardStage, StagePlan, counts_line

EMBEDDINGS = "embeddings"
FUSE, TRANSLATE = "fuse", "translate"
CAPTION_FIELDS = {"short": "caption_short", "dense": "caption_dense"}

TRANSLATION_SCORE = pa.struct([("field", pa.string()), ("lang", pa.string()), ("score", pa.float32())])
SCORES_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("status", pa.string()),  # ok | skipped (no image) | error (image not decodable)
    ("error", pa.string()),
    ("clip_alt", pa.float32()),
    ("clip_short", pa.float32()),
    ("clip_dense", pa.float32()),
    ("clip_translations", pa.list_(TRANSLATION_SCORE)),
    ("nsfw", pa.float32()),
    ("lang_alt", pa.string()),
    ("lang_alt_prob", pa.float32()),
    ("lang_short", pa.string()),
    ("lang_dense", pa.string()),
    ("provenance", pa.map_(pa.string(), pa.string())),
])
EMBEDDINGS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("sha256", pa.string()),
    ("model", pa.string()),
    ("embedding", pa.list_(pa.float32())),
])
_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


# ---- planning: which models, and can they be provided -------------------------------------------------------------


def check_clip_weights(clip: ClipConfig) -> None:
    """Fail fast (before any task) when the CLIP weights cannot be had: an unknown architecture or tag, a missing
    checkpoint file, or hub weights absent from the local cache while HF_HUB_OFFLINE is set."""
    try:
        import open_clip
    except ImportError as e:
        raise ModelUnavailable("clip", "open_clip", f"{e.name} is not installed; pip install 'capfactory[clip]'") \
            from None
    if clip.model.startswith("local-dir:"):
        folder = Path(clip.model.removeprefix("local-dir:")).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ModelUnavailable("clip", "open_clip", f"{folder} has no open_clip_config.json")
        return
    if clip.model.startswith("hf-hub:"):
        return
    if clip.model not in open_clip.list_models():
        raise ModelUnavailable("clip", "open_clip", f"unknown open_clip architecture {clip.model!r}")
    if clip.pretrained is None or Path(clip.pretrained).expanduser().is_file():
        return
    tags = open_clip.list_pretrained_tags_by_model(clip.model)
    if clip.pretrained not in tags:
        raise ModelUnavailable("clip", "open_clip", f"{clip.pretrained!r} is neither a checkpoint file nor an "
                               f"open_clip tag for {clip.model} (known tags: {', '.join(tags) or 'none'})")
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        repo = open_clip.get_pretrained_cfg(clip.model, clip.pretrained).get("hf_hub", "").rstrip("/")
        if not repo or not any(isinstance(try_to_load_from_cache(repo, f), str) for f in _HF_WEIGHT_FILES):
            raise ModelUnavailable("clip", "open_clip", f"weights {clip.pretrained!r} of {clip.model} are not in the "
                                   "local Hugging Face cache and HF_HUB_OFFLINE is set; give score.clip.pretrained "
                                   "as a local checkpoint file (or --clip-pretrained PATH)")


@dataclass(frozen=True)
class ScorePlan:
    clip: tuple[str, dict] | None  # (backend, options)
    clip_translations: tuple[str, dict] | None
    nsfw: tuple[str, dict] | None

    @property
    def summary(self) -> dict[str, str]:
        def name(choice: tuple[str, dict] | None) -> str:
            return f"{choice[0]} {choice[1].get('model', '')} {choice[1].get('pretrained', '')}".strip() \
                if choice else "off"

        return {"clip": name(self.clip) if self.clip else "off (no CLIP weights in the cpu profile; set "
                "score.clip.backend: open_clip and score.clip.pretrained)",
                "clip_translations": name(self.clip_translations), "nsfw": name(self.nsfw)}


def _clip_choice(clip: ClipConfig, backend: str | None, batch_size: int, models_dir: str | None
                 ) -> tuple[str, dict] | None:
    if backend is None:
        return None
    backend_class("clip", backend)
    if models_dir and clip.pretrained and not Path(clip.pretrained).is_absolute():
        # A relative checkpoint path is looked up under the models folder first (like the detector's model file).
        candidate = Path(models_dir) / clip.pretrained
        if candidate.is_file():
            clip = clip.model_copy(update={"pretrained": str(candidate.resolve())})
    check_clip_weights(clip)
    return backend, {"model": clip.model, "pretrained": clip.pretrained, "batch_size": batch_size}


def plan_scores(cfg: ScoreConfig, models_dir: str | None = None) -> ScorePlan:
    """The models of a config; raises ModelUnavailable before anything runs when one cannot be provided."""
    clip = _clip_choice(cfg.clip, cfg.clip.backend or PROFILES[cfg.profile]["clip"], cfg.batch_size, models_dir)
    translations = None
    if cfg.clip_translations is not None:
        translations = _clip_choice(cfg.clip_translations, cfg.clip_translations.backend or "open_clip",
                                    cfg.batch_size, models_dir)
    elif cfg.multilingual:
        translations = clip
    nsfw = None
    if cfg.nsfw:
        name = PROFILES[cfg.profile]["nsfw"]
        backend_class("nsfw", name)
        nsfw = (name, {"batch_size": cfg.batch_size})
    return ScorePlan(clip, translations, nsfw)


# ---- one shard -------------------------------------------------------------------------------------------------


def _read_inputs(ctx: ShardContext) -> tuple[list[dict], dict[str, dict], dict[str, list[dict]]]:
    """Raw rows; fused captions by key (empty when fuse has not run); translations by key (likewise)."""
    store, dataset, shard = ctx.store, ctx.dataset, ctx.shard
    fused: dict[str, dict] = {}
    if read_marker(store, dataset, FUSE, shard) is not None:
        fused = {r["key"]: r for r in ctx.read_rows(FUSE, ["key", *CAPTION_FIELDS.values()])}
    translated: dict[str, list[dict]] = {}
    if read_marker(store, dataset, TRANSLATE, shard) is not None:
        for r in ctx.read_rows(TRANSLATE, ["key", "field", "lang", "text"]):
            if r["text"]:
                translated.setdefault(r["key"], []).append(r)
    return ctx.read_rows(RAW, ["key", "status", "alt_text", "sha256"]), fused, translated


def _previous_embeddings(ctx: ShardContext) -> dict[tuple[str, str], np.ndarray]:
    """(model id, image sha256) -> stored embedding."""
    return {(r["model"], r["sha256"]): np.asarray(r["embedding"], dtype=np.float32)
            for r in ctx.read_rows(EMBEDDINGS, missing_ok=True)}


class _Images:
    """The shard's decoded images by key, read from the raw tar only when a model needs pixels."""

    def __init__(self, ctx: ShardContext):
        self._ctx, self._bytes, self.errors = ctx, None, {}

    def get(self, keys: list[str]) -> dict[str, Image.Image]:
        if self._bytes is None:
            self._bytes = self._ctx.images()
        out = {}
        for key in keys:
            data = self._bytes.get(key)
            if data is None:
                self.errors[key] = "image missing from the raw tar"
                continue
            try:
                with Image.open(io.BytesIO(data)) as im:
                    out[key] = im.convert("RGB")
            except Exception as e:  # any decoder failure is this sample's error, not the shard's
                self.errors[key] = f"cannot decode image: {type(e).__name__}: {e}"
        return out


def _image_embeddings(scorer, ok: list[dict], images: _Images, previous: dict) -> tuple[dict[str, np.ndarray], int]:
    """sha256 -> embedding for the ok rows (stored ones reused); returns also how many images were embedded."""
    by_sha = {r["sha256"]: r["key"] for r in ok}
    found = {sha: previous[(scorer.model_id, sha)] for sha in by_sha if (scorer.model_id, sha) in previous}
    missing = [sha for sha in by_sha if sha not in found]
    decoded = images.get([by_sha[sha] for sha in missing]) if missing else {}
    todo = [sha for sha in missing if by_sha[sha] in decoded]
    if todo:
        found.update(zip(todo, scorer.image_embeddings([decoded[by_sha[sha]] for sha in todo]), strict=True))
    return found, len(todo)


def _cosines(scorer, emb: dict[str, np.ndarray], pairs: list[tuple[str, str]]) -> list[float]:
    """cos(image of sha256, text) for each (sha256, text) pair."""
    if not pairs:
        return []
    texts = scorer.text_embeddings([t for _, t in pairs])
    images = np.stack([emb[sha] for sha, _ in pairs])
    return [float(v) for v in np.clip((images * texts).sum(axis=1), -1.0, 1.0)]


class ScoreStage(ShardStage):
    name = "score"
    description = "CLIP, NSFW and language scores, then semantic dedup; the filters are views applied at publish."
    schema = SCORES_SCHEMA
    reads = (RAW, FUSE, TRANSLATE)  # where they exist: a re-fused or re-translated shard is re-scored
    published = tuple(n for n in SCORES_SCHEMA.names if n.startswith(("clip_", "nsfw", "lang_")))
    warm = ("tasks.score",)

    def plan(self) -> StagePlan:
        plan = plan_scores(self.config, self.models_dir)
        gpu = plan.clip is not None and needs_gpu(self.config.profile, [plan.clip[0]])
        return StagePlan(plan.summary, gpu, plan)

    def process(self, ctx: ShardContext) -> ShardOutput:
        cfg = self.config
        plan = plan_scores(cfg, self.models_dir)
        raw_rows, fused, translated = _read_inputs(ctx)
        images = _Images(ctx)
        ok = [r for r in raw_rows if r["status"] == "ok"]
        provenance = {"config_hash": self.config_hash}
        nsfw = _nsfw_scores(plan, ok, images, provenance)
        previous = _previous_embeddings(ctx) if plan.clip or plan.clip_translations else {}
        scorers, embeddings, embedded = {}, {}, 0
        for role, choice in (("clip", plan.clip), ("clip_translations", plan.clip_translations)):
            if choice:
                scorers[role] = load_backend("clip", choice[0], **choice[1])
                if scorers[role].model_id not in embeddings:
                    embeddings[scorers[role].model_id], n = _image_embeddings(scorers[role], ok, images, previous)
                    embedded += n
                provenance[role] = scorers[role].model_id
        if cfg.language_id:
            provenance["langid"] = "py3langid"
        rows, pending = [], {}
        for r in raw_rows:
            rows.append(_score_row(r, fused.get(r["key"], {}), translated.get(r["key"], []), nsfw, images, scorers,
                                   cfg, provenance, pending, len(rows)))
        _apply_similarities(rows, raw_rows, pending, scorers, embeddings)
        if embeddings:
            keep = [(r["key"], r["sha256"], model, emb[r["sha256"]].tolist()) for model, emb in embeddings.items()
                    for r in ok if r["sha256"] in emb]
            ctx.store.put_parquet(ctx.key(EMBEDDINGS), pa.Table.from_pylist(
                [dict(zip(EMBEDDINGS_SCHEMA.names, k, strict=True)) for k in keep], EMBEDDINGS_SCHEMA))
        stats = {"images_embedded": embedded, "embeddings_reused": sum(len(e) for e in embeddings.values()) - embedded,
                 "nsfw_scored": len(nsfw), "clip": "clip" in scorers, "provenance": provenance}
        return ShardOutput(rows, stats)

    def finish(self, store_uri: str, dataset: str, stats: list[dict], done: list[int], failed: list[int]) -> dict:
        """SemDeDup over the whole dataset's image embeddings, once every shard is scored."""
        store = open_store(store_uri)
        provenance = (stats[0] if stats else read_marker(store, dataset, self.name, done[0]) if done else {}) \
            .get("provenance", {})
        s = self.config.semdedup
        if not s.enabled:
            return {"semdedup": {"run": False, "reason": "semdedup is disabled"}}
        if failed or "clip" not in provenance:
            return {"semdedup": {"run": False, "reason": "shards failed" if failed else
                                 "no image embeddings (CLIP is off)"}}
        shards = sorted([*done, *(x["shard"] for x in stats)])
        return {"semdedup": {"run": True, **semdedup_dataset(store, dataset, provenance["clip"], shards, s.clusters,
                                                              s.eps, s.seed, s.iterations)}}

    def summary(self, result: dict) -> list[str]:
        return [counts_line("status", result.get("counts", {})),
                *(f"  {role}: {model}" for role, model in result.get("backends", {}).items()),
                f"  images embedded {result.get('images_embedded', 0)}, embeddings reused "
                f"{result.get('embeddings_reused', 0)}; semantic dedup: {result.get('semdedup')}"]


def _nsfw_scores(plan: ScorePlan, ok: list[dict], images: _Images, provenance: dict) -> dict[str, float]:
    """image sha256 -> NSFW probability (each distinct image once)."""
    if not plan.nsfw:
        return {}
    model = load_backend("nsfw", plan.nsfw[0], **plan.nsfw[1])
    by_sha = {r["sha256"]: r["key"] for r in ok}
    decoded = images.get(list(by_sha.values()))
    shas = [sha for sha, key in by_sha.items() if key in decoded]
    provenance["nsfw"] = model.model_id
    return dict(zip(shas, (float(v) for v in model.score([decoded[by_sha[s]] for s in shas])), strict=True))


def _score_row(r: dict, captions: dict, translations: list[dict], nsfw: dict, images: _Images, scorers: dict,
               cfg: ScoreConfig, provenance: dict, pending: dict, i: int) -> dict:
    """One score row; the texts CLIP must score are queued in `pending` (role -> (row, column, text, lang))."""
    row = {name: None for name in SCORES_SCHEMA.names}
    row.update(key=r["key"], provenance=list(provenance.items()))
    if cfg.language_id:
        row["lang_alt"], row["lang_alt_prob"] = detect_with_prob(r["alt_text"])
        row["lang_short"] = detect_with_prob(captions.get("caption_short"))[0]
        row["lang_dense"] = detect_with_prob(captions.get("caption_dense"))[0]
    if r["status"] != "ok":
        row["status"], row["error"] = "skipped", f"no image (raw status {r['status']})"
        return row
    if r["key"] in images.errors:
        row["status"], row["error"] = "error", images.errors[r["key"]]
        return row
    row["status"], row["nsfw"] = "ok", nsfw.get(r["sha256"])
    if "clip" in scorers:
        texts = [("clip_alt", r["alt_text"])] + [(f"clip_{f}", captions.get(c)) for f, c in CAPTION_FIELDS.items()]
        pending.setdefault("clip", []).extend((i, col, t, None) for col, t in texts if t)
    if "clip_translations" in scorers:
        items = [(i, t["field"], t["text"], t["lang"]) for t in translations]
        if cfg.clip_translations is not None and r["alt_text"] and row["lang_alt"] not in (None, "en"):
            items.append((i, "alt_text", r["alt_text"], row["lang_alt"]))
        pending.setdefault("clip_translations", []).extend(items)
        row["clip_translations"] = []
    return row


def _apply_similarities(rows: list[dict], raw_rows: list[dict], pending: dict, scorers: dict, embeddings: dict) -> None:
    for role, items in pending.items():
        scorer = scorers[role]
        sims = _cosines(scorer, embeddings[scorer.model_id], [(raw_rows[i]["sha256"], text) for i, _, text, _ in items])
        for (i, column, _, lang), sim in zip(items, sims, strict=True):
            if role == "clip":
                rows[i][column] = sim
            else:
                rows[i]["clip_translations"].append({"field": column, "lang": lang, "score": sim})
