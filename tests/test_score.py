"""Scores on one shard: the open_nsfw model on real photos, language ID, CLIP plumbing with a tiny open_clip model
the test builds (random weights: no CLIP weights exist on these machines), embeddings stored once and reused, bad
input (a failed download, an undecodable stored image), and clear errors for missing weights."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from infra.loopback_server import ImageServer
from infra.models import ModelUnavailable, load_backend
from infra.settings import DownloadConfig, IngestConfig, InputSpec, ScoreConfig
from infra.store import LocalStore
from tasks.fuse import FUSED_SCHEMA
from tasks.ingest import ingest_shard, plan_ingest
from tasks.lib.langid import detect_with_prob
from tasks.score import EMBEDDINGS, ScoreStage, plan_scores
from tasks.shards import stage_key, write_marker

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "photos"


# ---- NSFW and language ---------------------------------------------------------------------------------------------


def test_nsfw_scores_real_photos_deterministically_and_batching_changes_nothing(photos):
    model = load_backend("nsfw", "open_nsfw", batch_size=4)
    images = [Image.open(p).convert("RGB") for p in photos[:10]]
    scores = model.score(images)  # three batches
    assert scores.shape == (10,) and scores.dtype == np.float32
    assert np.all((scores >= 0) & (scores <= 1))
    assert np.median(scores) < 0.1  # everyday COCO photos
    assert np.array_equal(model.score(images), scores)
    singles = np.concatenate([model.score([im]) for im in images])
    assert np.allclose(singles, scores, atol=1e-5)
    assert model.model_id.startswith("open_nsfw:open-nsfw.onnx@") and model.score([]).shape == (0,)


def test_nsfw_missing_model_file_is_a_clear_error(tmp_path):
    from tasks.safety import OpenNsfwClassifier

    with pytest.raises(ModelUnavailable, match=r"nsfw backend 'open_nsfw'.*no ONNX model"):
        OpenNsfwClassifier(model_path=str(tmp_path / "missing.onnx"))


def test_language_of_alt_text():
    assert detect_with_prob("A dog sleeping on a red couch next to a cat.")[0] == "en"
    assert detect_with_prob("Um cachorro dormindo no sofá vermelho ao lado de um gato.")[0] == "pt"
    lang, prob = detect_with_prob("Ein Hund schläft auf dem roten Sofa neben einer Katze.")
    assert lang == "de" and 0.5 < prob <= 1.0
    assert detect_with_prob("  ") == (None, None) and detect_with_prob(None) == (None, None)


# ---- a real ingested shard -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[LocalStore, dict[str, str]]:
    """6 COCO photos (the first one twice) with a human caption as alt-text, one in Portuguese, a URL that fails to
    download, and one stored image corrupted after ingest. Returns (store, {name: key})."""
    tmp = tmp_path_factory.mktemp("score")
    captions = [json.loads(line) for line in (PHOTOS / "captions.jsonl").read_text().splitlines()][:6]
    images = {f"p{i}.jpg": (PHOTOS / c["file"]).read_bytes() for i, c in enumerate(captions)}
    images["again.jpg"] = images["p0.jpg"]
    alts = [c["captions"][0].strip() for c in captions] + [captions[0]["captions"][1].strip()]
    alts[2] = "Um homem andando de bicicleta na rua ao lado de um ônibus vermelho."
    with ImageServer(images) as server:
        urls = [server.url(f"/img/{i}/{name}") for i, name in enumerate(images)]
        pq.write_table(pa.table({"url": [*urls, server.url("/fault/not-found-image.jpg")],
                                 "caption": [*alts, "never arrives"]}), tmp / "urls.parquet")
        store = LocalStore(tmp / "store")
        cfg = IngestConfig(shard_size=100, download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), retries=0))
        plan_ingest(store, "coco", [InputSpec(path=str(tmp / "urls.parquet"))], cfg)
        ingest_shard(store.uri, "coco", 0, cfg)
    raw = store.get_parquet(stage_key("coco", "ingest", 0, "parquet")).to_pylist()
    keys = {r["url"].rsplit("/", 1)[-1]: r["key"] for r in raw}
    # Corrupt p5's stored image in the tar (as a bad disk or a truncated copy would).
    local = tmp / "shard.tar"
    store.get_file(stage_key("coco", "ingest", 0, "tar"), local)
    with tarfile.open(local) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(local, "w") as tar:
        for m, data in members:
            if m.name.startswith(keys["p5.jpg"] + ".") and m.name.endswith(".jpg"):
                data = data[:200]
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    store.put_file(stage_key("coco", "ingest", 0, "tar"), local)
    return store, keys


def rows_by_key(store: LocalStore) -> dict[str, dict]:
    return {r["key"]: r for r in store.get_parquet(stage_key("coco", "score", 0, "parquet")).to_pylist()}


def test_score_shard_on_ingest_only_with_clip_off(coco):
    """The cpu profile: CLIP off (no weights), NSFW and language on; every raw row gets a score row."""
    store, keys = coco
    cfg = ScoreConfig()
    assert plan_scores(cfg).clip is None and "off" in plan_scores(cfg).summary["clip"]
    stats = ScoreStage(cfg).run_shard(store.uri, "coco", 0)
    rows = rows_by_key(store)
    assert len(rows) == 8 and stats["counts"] == {"ok": 6, "error": 1, "skipped": 1}
    failed = rows[keys["not-found-image.jpg"]]
    assert failed["status"] == "skipped" and "raw status error" in failed["error"] and failed["nsfw"] is None
    corrupt = rows[keys["p5.jpg"]]
    assert corrupt["status"] == "error" and "cannot decode image" in corrupt["error"] and corrupt["nsfw"] is None
    for name in ("p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg", "p4.jpg", "again.jpg"):
        row = rows[keys[name]]
        assert row["status"] == "ok" and 0 <= row["nsfw"] <= 1 and row["clip_alt"] is None
        assert row["clip_short"] is None and row["lang_short"] is None  # no fused stage
    assert rows[keys["again.jpg"]]["nsfw"] == rows[keys["p0.jpg"]]["nsfw"]
    assert stats["nsfw_scored"] == 5  # the repeated photo is scored once
    assert rows[keys["p2.jpg"]]["lang_alt"] == "pt" and rows[keys["p1.jpg"]]["lang_alt"] == "en"
    assert 0.5 < rows[keys["p1.jpg"]]["lang_alt_prob"] <= 1
    assert not store.exists(stage_key("coco", EMBEDDINGS, 0, "parquet"))
    assert dict(rows[keys["p1.jpg"]]["provenance"])["nsfw"].startswith("open_nsfw:")
    assert ScoreStage(cfg).status(store, "coco") == ([], [0], [])


def add_fused(store: LocalStore, suffix: str) -> None:
    """A fused shard (as the fuse stage writes it) with captions ending in `suffix`, and its done marker."""
    raw = store.get_parquet(stage_key("coco", "ingest", 0, "parquet")).to_pylist()
    rows = [{**{n: None for n in FUSED_SCHEMA.names}, "key": r["key"], "status": "ok", "alt_text": r["alt_text"],
             "caption_short": f"{r['alt_text']} {suffix}", "caption_dense": f"A detailed view. {suffix}"}
            for r in raw]
    store.put_parquet(stage_key("coco", "fuse", 0, "parquet"), pa.Table.from_pylist(rows, FUSED_SCHEMA))
    write_marker(store, "coco", "fuse", 0, {"shard": 0, "config_hash": suffix})


def test_clip_embeddings_are_computed_once_and_reused_when_captions_change(coco, tiny_clip, monkeypatch):
    store, keys = coco
    cfg = ScoreConfig(clip={"backend": "open_clip", "model": tiny_clip, "pretrained": None}, nsfw=False,
                      batch_size=2)
    scorer = load_backend("clip", "open_clip", **plan_scores(cfg).clip[1])
    calls: list[int] = []
    original = scorer.image_embeddings
    monkeypatch.setattr(scorer, "image_embeddings", lambda images: calls.append(len(images)) or original(images))

    add_fused(store, "v1")
    first = ScoreStage(cfg).run_shard(store.uri, "coco", 0)
    assert calls == [5] and first["images_embedded"] == 5 and first["embeddings_reused"] == 0
    rows = rows_by_key(store)
    emb = store.get_parquet(stage_key("coco", EMBEDDINGS, 0, "parquet"))
    assert sorted(emb.column("key").to_pylist()) == sorted(keys[n] for n in ("p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg",
                                                                               "p4.jpg", "again.jpg"))
    assert set(emb.column("model").to_pylist()) == {scorer.model_id}
    vectors = {k: np.asarray(v) for k, v in zip(emb.column("key").to_pylist(), emb.column("embedding").to_pylist(),
                                                strict=True)}
    assert all(abs(np.linalg.norm(v) - 1) < 1e-4 for v in vectors.values())
    row = rows[keys["p1.jpg"]]
    expected = float(vectors[keys["p1.jpg"]] @ scorer.text_embeddings([row_alt(store, keys["p1.jpg"])])[0])
    assert row["clip_alt"] == pytest.approx(expected, abs=1e-5)
    assert row["clip_short"] is not None and row["clip_dense"] is not None and row["lang_short"] == "en"
    assert rows[keys["p5.jpg"]]["clip_alt"] is None and rows[keys["not-found-image.jpg"]]["clip_alt"] is None
    assert rows[keys["again.jpg"]]["clip_dense"] == rows[keys["p0.jpg"]]["clip_dense"]

    # Re-fused captions: the shard is due again; the images are not embedded again, only texts are.
    add_fused(store, "v2")
    assert ScoreStage(cfg).status(store, "coco")[0] == [0]
    second = ScoreStage(cfg).run_shard(store.uri, "coco", 0)
    assert calls == [5] and second["images_embedded"] == 0 and second["embeddings_reused"] == 5
    again = rows_by_key(store)
    assert again[keys["p1.jpg"]]["clip_alt"] == row["clip_alt"]
    assert again[keys["p1.jpg"]]["clip_short"] != row["clip_short"]
    assert ScoreStage(cfg).status(store, "coco")[0] == []


def row_alt(store: LocalStore, key: str) -> str:
    raw = store.get_parquet(stage_key("coco", "ingest", 0, "parquet")).to_pylist()
    return next(r["alt_text"] for r in raw if r["key"] == key)


def test_translations_are_scored_by_the_multilingual_model(coco, tiny_clip):
    """A second (here: the same tiny) model as `clip_translations` scores the translate stage's long table and the
    non-English alt-text; entries without text (failed translations) are not scored."""
    store, keys = coco
    rows = [{"key": keys["p1.jpg"], "field": "caption_short", "lang": "pt", "text": "Um cachorro no sofá."},
            {"key": keys["p1.jpg"], "field": "alt_text", "lang": "de", "text": "Ein Hund auf dem Sofa."},
            {"key": keys["p3.jpg"], "field": "caption_short", "lang": "pt", "text": None}]
    table = pa.table({"key": [r["key"] for r in rows], "field": [r["field"] for r in rows],
                      "lang": [r["lang"] for r in rows], "text": pa.array([r["text"] for r in rows], pa.string()),
                      "status": ["ok", "flagged", "error"]})
    store.put_parquet(stage_key("coco", "translate", 0, "parquet"), table)
    write_marker(store, "coco", "translate", 0, {"shard": 0, "config_hash": "t"})
    tiny = {"model": tiny_clip, "pretrained": None}
    cfg = ScoreConfig(clip={"backend": "open_clip", **tiny}, clip_translations=tiny, nsfw=False)
    stats = ScoreStage(cfg).run_shard(store.uri, "coco", 0)
    assert stats["images_embedded"] == 0  # same model id: the stored embeddings serve both roles
    out = rows_by_key(store)
    entries = out[keys["p1.jpg"]]["clip_translations"]
    assert [(e["field"], e["lang"]) for e in entries] == [("caption_short", "pt"), ("alt_text", "de")]
    assert all(-1 <= e["score"] <= 1 for e in entries)
    assert out[keys["p3.jpg"]]["clip_translations"] == []
    assert [(e["field"], e["lang"]) for e in out[keys["p2.jpg"]]["clip_translations"]] == [("alt_text", "pt")]
    assert out[keys["not-found-image.jpg"]]["clip_translations"] is None
    store.delete(stage_key("coco", "translate", 0, "stats.json"))


def test_missing_clip_weights_are_a_clear_error_at_plan_time(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ModelUnavailable, match=r"laion2b_s34b_b79k.*not in the local Hugging Face cache"):
        plan_scores(ScoreConfig(profile="gpu"))
    with pytest.raises(ModelUnavailable, match="neither a checkpoint file nor an open_clip tag"):
        plan_scores(ScoreConfig(clip={"backend": "open_clip", "pretrained": str(tmp_path / "vit.pt")}))
    with pytest.raises(ModelUnavailable, match="unknown open_clip architecture"):
        plan_scores(ScoreConfig(clip={"backend": "open_clip", "model": "ViT-Z-99"}))
    with pytest.raises(ModelUnavailable, match="no such backend"):
        plan_scores(ScoreConfig(clip={"backend": "siglip"}))
    with pytest.raises(ModelUnavailable, match=r"open_clip_config\.json"):
        plan_scores(ScoreConfig(clip={"backend": "open_clip", "model": f"local-dir:{tmp_path}"}))
    # A checkpoint file found under the models folder is used.
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "vit.pt").write_bytes(b"x")
    plan = plan_scores(ScoreConfig(clip={"backend": "open_clip", "pretrained": "clip/vit.pt"}), str(tmp_path))
    assert plan.clip[1]["pretrained"] == str((tmp_path / "clip" / "vit.pt").resolve())
