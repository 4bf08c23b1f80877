"""The `score` flow end to end on a Dask LocalCluster: COCO photos ingested from a loopback server (two shards, a
repeated photo, a failed download), scored with the real open_nsfw model and a tiny open_clip model the test builds
(random weights), then semantic dedup over the dataset and the filters as a view. Also: a dataset with only the
ingest stage, and the CLI's clear error when CLIP weights are missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.loopback_server import ImageServer
from infra.settings import DatasetSpec, DownloadConfig, IngestConfig, InputSpec, ScoreConfig
from infra.store import LocalStore
from tasks.filters import apply_filters
from tasks.ingest import dedup_dataset, ingest_shard, plan_ingest
from tasks.score import EMBEDDINGS, ScoreStage
from tasks.semdedup import SEMDEDUP_KEY
from tasks.shards import stage_key

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "photos"


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[LocalStore, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("score_flow")
    captions = [json.loads(line) for line in (PHOTOS / "captions.jsonl").read_text().splitlines()][:7]
    images = {f"p{i}.jpg": (PHOTOS / c["file"]).read_bytes() for i, c in enumerate(captions)}
    images["again.jpg"] = images["p0.jpg"]
    alts = [c["captions"][0].strip() for c in captions] + ["the same photo again"]
    with ImageServer(images) as server:
        urls = [server.url(f"/img/{i}/{name}") for i, name in enumerate(images)]
        pq.write_table(pa.table({"url": [*urls, server.url("/fault/not-found-image.jpg")],
                                 "caption": [*alts, "never arrives"]}), tmp / "urls.parquet")
        store = LocalStore(tmp / "store")
        cfg = IngestConfig(shard_size=5, download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), retries=0))
        plan = plan_ingest(store, "coco", [InputSpec(path=str(tmp / "urls.parquet"))], cfg)
        for shard in plan.todo:
            ingest_shard(store.uri, "coco", shard, cfg)
        dedup_dataset(store, "coco", cfg.phash_threshold)
    raw = pa.concat_tables([store.get_parquet(stage_key("coco", "ingest", s, "parquet")) for s in (0, 1)])
    return store, {u.rsplit("/", 1)[-1]: k for u, k in zip(raw.column("url").to_pylist(),
                                                           raw.column("key").to_pylist(), strict=True)}


@pytest.mark.slow
def test_score_flow_then_semdedup_then_filters(coco, tiny_clip):
    from flows.stage import run_stage

    store, keys = coco
    cfg = ScoreConfig(clip={"backend": "open_clip", "model": tiny_clip, "pretrained": None},
                      semdedup={"eps": 1e-4, "clusters": 2}, batch_size=4)
    result = run_stage("score", DatasetSpec(name="coco", store=store.uri, score=cfg), workers=2)
    assert result["shards_run"] == [0, 1] and result["counts"] == {"ok": 8, "skipped": 1}
    # 8 good images; the repeated photo lands in the other shard (shard_size 5), so it is embedded there too.
    assert result["images_embedded"] == 8
    assert result["provenance"]["clip"].startswith("open_clip:local-dir:") and "nsfw" in result["provenance"]
    scores = pa.concat_tables([store.get_parquet(stage_key("coco", "score", s, "parquet")) for s in (0, 1)])
    rows = {r["key"]: r for r in scores.to_pylist()}
    assert len(rows) == 9 and all(r["clip_alt"] is not None and 0 <= r["nsfw"] <= 1 for r in rows.values()
                                  if r["status"] == "ok")
    emb = pa.concat_tables([store.get_parquet(stage_key("coco", EMBEDDINGS, s, "parquet")) for s in (0, 1)])
    assert emb.num_rows == 8 and len(emb.column("embedding")[0].values) == 32

    # Semantic dedup ran across both shards: the repeated photo (identical embedding) duplicates the first one.
    dedup = store.get_parquet(SEMDEDUP_KEY.format(dataset="coco"))
    marked = {k: d for k, d in zip(dedup.column("key").to_pylist(), dedup.column("semdedup_duplicate_of").to_pylist(),
                                   strict=True) if d}
    first, second = sorted([keys["p0.jpg"], keys["again.jpg"]])
    assert marked.get(second) == first and result["semdedup"]["samples"] == 8
    assert result["semdedup"]["duplicates"] == len(marked)

    # The filters as a view over raw + scores + semdedup: every sample stays, with the filters it failed.
    raw = pa.concat_tables([store.get_parquet(stage_key("coco", "ingest", s, "parquet")) for s in (0, 1)])
    by_key = {r["key"]: r for r in raw.to_pylist()}
    joined = pa.Table.from_pylist([{**by_key[k], **{c: v for c, v in rows[k].items() if c.startswith(("clip_alt",
                                   "nsfw", "lang_"))}, "semdedup_duplicate_of": marked.get(k)} for k in by_key])
    view, counts = apply_filters(joined, ScoreConfig(filters={"datacomp_basic": True, "nsfw_max": 0.9}))
    assert view.num_rows == 9 and counts["status"] == 1 and counts["duplicate"] >= 1 and counts["semdedup"] >= 1
    failed = dict(zip(view.column("key").to_pylist(), view.column("failed_filters").to_pylist(), strict=True))
    assert "status" in failed[keys["not-found-image.jpg"]] and "semdedup" in failed[second]

    # Nothing left to do on a re-run; a changed score config re-scores, reusing every stored embedding.
    assert ScoreStage(cfg).status(store, "coco") == ([], [0, 1], [])
    again = run_stage("score", DatasetSpec(name="coco", store=store.uri, score=cfg.model_copy(update={"nsfw": False})),
                      workers=1)
    assert again["images_embedded"] == 0 and again["embeddings_reused"] == 8


@pytest.mark.slow
def test_score_flow_on_an_ingest_only_dataset_with_the_cpu_profile(coco):
    """No fused/translated stages and CLIP off (the cpu default): NSFW and language only; no semdedup."""
    from flows.stage import run_stage

    store, keys = coco
    for shard in (0, 1):
        for ext in ("parquet", "stats.json"):
            store.delete(stage_key("coco", "score", shard, ext))
    result = run_stage("score", DatasetSpec(name="coco", store=store.uri, score=ScoreConfig()), workers=1)
    assert result["counts"] == {"ok": 8, "skipped": 1} and result["images_embedded"] == 0
    assert result["backends"]["clip"].startswith("off") and result["semdedup"]["run"] is False
    row = next(r for r in store.get_parquet(stage_key("coco", "score", 0, "parquet")).to_pylist()
               if r["key"] == keys["p1.jpg"])
    assert row["clip_alt"] is None and row["nsfw"] is not None and row["lang_alt"] == "en"


def test_cli_score_with_missing_clip_weights_exits_with_the_reason(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "score", "--dataset", "x", "--store", str(tmp_path),
                           "--clip-backend", "open_clip"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 2
    assert "clip backend 'open_clip'" in proc.stderr and "laion2b_s34b_b79k" in proc.stderr
    assert "--clip-pretrained" in proc.stderr
